"""The thinking methods, one folder each: quietstar/ (Quiet-STaR), plain/ (the plain LM), distill/ (a thinking
teacher distilled into a plain student), explicit/ (rationales written out: STaR, RFT, V-STaR, TPO, CPO,
Constitutional AI, System-2 distillation). registry.py names them; docs/architecture.md adds one as a worked
example. (Package __init__ files import nothing, so that importing one method loads no other.)"""
