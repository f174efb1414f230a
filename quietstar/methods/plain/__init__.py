"""The plain language model (thought.enabled=false): the same module and checkpoints as Quiet-STaR, trained on
next-token NLL alone. It pretrains a random-init model, and it is the matched no-thought baseline.

  model.py  PlainLM, its registry entry (`build`), and reset_thought_embeddings for a Quiet-STaR run that starts
            from a plain stage
"""
