"""The loss and gradients of one training step of a source tree, as exact digests (a helper of
tests/test_step_bitwise.py, run as a script with the tree first on sys.path).

    python tests/step_digest.py TREE

Prints one JSON line last: for each case, the loss as float.hex and the SHA-256 of every parameter's gradient
bytes. The tiny preset, seeded; the same code runs against a tree from before the methods/ folder existed
(quietstar.thinker) and after (quietstar.methods.quietstar.thinker).
"""

import hashlib
import importlib
import json
import os
import sys

tree = sys.argv[1]
sys.path.insert(0, tree)

import torch  # noqa: E402

torch.set_num_threads(1)
model = importlib.import_module("quietstar.model")
new = os.path.isdir(os.path.join(tree, "quietstar", "methods"))
thinker = importlib.import_module("quietstar.methods.quietstar.thinker" if new else "quietstar.thinker")
plain = importlib.import_module("quietstar.methods.plain.model" if new else "quietstar.plain")

CASES = {
    "official": dict(n_ahead=5, n_ahead_talk=2, n_thoughts=2),
    "rlp_ema": dict(n_ahead=5, n_ahead_talk=2, n_thoughts=3, objective="rlp", ema_decay=0.99),
    "where_entropy": dict(n_ahead=4, n_ahead_talk=1, n_thoughts=2, where="entropy", think_fraction=0.5),
    "plain": dict(enabled=False),
}


def digest(name: str, kw: dict) -> dict:
    torch.manual_seed(0)
    base = model.Transformer(model.ModelConfig.from_preset("tiny"))
    base.grad_checkpointing = False  # (no memory plan to print)
    cls = plain.PlainLM if name == "plain" else thinker.QuietStar
    qs = cls(base, None, thinker.ThoughtConfig(**kw))
    x = torch.randint(0, base.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    out = qs(x, generator=torch.Generator().manual_seed(2))
    out.loss.backward()
    grads = {k: hashlib.sha256(p.grad.detach().contiguous().numpy().tobytes()).hexdigest()
             for k, p in qs.named_parameters() if p.grad is not None}
    return {"loss": float(out.loss.detach()).hex(), "grads": grads}


print(json.dumps({name: digest(name, kw) for name, kw in CASES.items()}, sort_keys=True))
