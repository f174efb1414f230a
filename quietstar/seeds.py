"""Seeds derived from a run's seed and the names of what uses them.

    derive_seed(cfg.train.seed, "explicit round", r)

hashes the parts (blake2b over a typed encoding of each) and keeps 63 bits, so every derived seed is a
valid seed for torch.Generator.manual_seed, numpy and `random`, whatever the run's seed (any int, 0 and
2**63 - 1 included). Arithmetic on a seed does neither: a product (seed * 1000003 + i) overflows
manual_seed's 64 bits for large seeds, and a sum (seed + r) makes seed s's round 1 the same stream as seed
s + 1's round 0. A hash of the parts has neither problem: distinct parts give distinct seeds (up to a 2**-63
collision), and the same parts give the same seed on every machine and Python version.
"""

from __future__ import annotations

import hashlib

SEED_BITS = 63
MAX_SEED = 2**SEED_BITS - 1  # the largest seed a run may be given, and the largest one derived


def _encode(part) -> bytes:
    if isinstance(part, bool) or not isinstance(part, (int, str)):
        raise TypeError(f"derive_seed: a part must be an int or a str, got {type(part).__name__} {part!r}")
    tag = b"i" if isinstance(part, int) else b"s"
    body = str(part).encode()
    return tag + len(body).to_bytes(4, "little") + body  # length-prefixed: ("ab", "c") != ("a", "bc")


def derive_seed(seed: int, *parts) -> int:
    """A seed in [0, 2**63) for the stream named by `parts` (ints and strings) under the run's `seed`."""
    h = hashlib.blake2b(b"".join(_encode(p) for p in (seed, *parts)), digest_size=8)
    return int.from_bytes(h.digest(), "little") & MAX_SEED
