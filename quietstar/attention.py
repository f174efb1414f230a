"""The one dispatch point for attention over the thought grid (layout and rule: masks.py).

Backends, all computing the same function of (q, k, v) in the grid layout:

- `dense`:  the boolean mask from masks.dense_grid_mask + SDPA. The oracle, and the reference's cost
            model (O(R^2 L^2) scores).
- `split`:  prefix-causal attention over row 0 plus own-branch attention over the query's own earlier
            branch keys, merged exactly by log-sum-exp. Pure PyTorch, GQA without repeated heads, the
            prefix part tiled over positions and recomputed in backward (nothing O(L^2) is kept).
            The CPU default.
- `flex`:   FlexAttention with a block mask from the same predicate (CUDA).
- `triton`: the fused kernel in kernels/thought_attention.py (CUDA; CPU only under TRITON_INTERPRET=1).
- `auto`:   triton on CUDA, split elsewhere.

`use_backend(name)` overrides the configured backend inside a `with` block (tests, benchmarks).

Shapes: B unique sequences, H query heads, G kv heads, R = 1 + n (S - 1) grid rows, L positions,
D head dim; q (B, H, R, L, D), k and v (B, G, R, L, D); lengths (B,) real tokens (right padding);
doc_ids (B, L) document index for packed sequences.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from quietstar.masks import dense_grid_mask, grid_steps

BACKENDS = ("auto", "dense", "split", "flex", "triton")
_override: Optional[str] = None
_configured: str = "auto"


def set_backend(name: str) -> None:
    """Set the configured backend (from config: attention.backend)."""
    global _configured
    _check(name)
    _configured = name


@contextlib.contextmanager
def use_backend(name: str):
    """Override the configured backend inside a `with` block."""
    global _override
    _check(name)
    prev, _override = _override, name
    try:
        yield
    finally:
        _override = prev


def _check(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"attention.backend must be one of {BACKENDS}, got {name!r}")


def resolve_backend(device: torch.device) -> str:
    name = _override or _configured
    if name == "auto":
        return "triton" if device.type == "cuda" else "split"
    if name in ("triton", "flex") and device.type != "cuda":
        if name == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
            return name
        raise RuntimeError(f"attention.backend={name!r} needs a CUDA device (triton also runs on CPU under "
                           f"TRITON_INTERPRET=1); got {device}. Use 'split' or 'auto' on CPU.")
    return name


# --------------------------------------------------------------------------------------------------
# the learning pass: every grid row's queries at once


def grid_attention(q, k, v, n: int, lengths: Optional[torch.Tensor] = None,
                   doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention over the whole thought grid. q (B, H, R, L, D); k, v (B, G, R, L, D) -> (B, H, R, L, D)."""
    backend = resolve_backend(q.device)
    if backend == "triton" and doc_ids is None:  # packed documents: the kernel has no doc mask, use split
        from kernels.thought_attention import thought_attention
        return thought_attention(q, k, v, n, lengths)
    if backend == "flex":
        from quietstar.flex import flex_grid_attention
        return flex_grid_attention(q, k, v, n, lengths, doc_ids)
    if backend == "dense":
        return dense_attention(q, k, v, n, lengths, doc_ids)
    return split_attention(q, k, v, n, lengths, doc_ids)


def dense_attention(q, k, v, n, lengths=None, doc_ids=None):
    B, H, R, L, D = q.shape
    G = k.shape[1]
    mask = dense_grid_mask(L, n, grid_steps(R, n), lengths, doc_ids, device=q.device)[:, None]  # (B|1, 1, RL, RL)
    out = F.scaled_dot_product_attention(q.reshape(B, H, R * L, D), k.reshape(B, G, R * L, D),
                                         v.reshape(B, G, R * L, D), attn_mask=mask, enable_gqa=H != G)
    return out.view(B, H, R, L, D)


def split_attention(q, k, v, n, lengths=None, doc_ids=None, tile: Optional[int] = None):
    """Prefix part (row-0 keys, causal) + own-branch part (same copy, steps <= s, same position), LSE-merged."""
    B, H, R, L, D = q.shape
    G = k.shape[1]
    S = grid_steps(R, n)
    qg = q.view(B, G, H // G, R, L, D)  # query heads grouped by their kv head: no repeated K/V
    key_ok = _key_ok(B, L, lengths, q.device)
    o1, lse1 = prefix_attention(qg, k[:, :, 0], v[:, :, 0], key_ok, doc_ids, tile)  # (B,G,h,R,L,D), (B,G,h,R,L)
    if S == 1:
        return o1.to(q.dtype).view(B, H, R, L, D)
    qb = qg[:, :, :, 1:].unflatten(3, (n, S - 1))  # (B, G, h, n, S-1, L, D)
    kb = k[:, :, 1:].unflatten(2, (n, S - 1))  # (B, G, n, S-1, L, D)
    vb = v[:, :, 1:].unflatten(2, (n, S - 1))
    o2, lse2 = branch_attention(qb, kb, vb, key_ok, steps_causal=True)
    o1b, lse1b = o1[:, :, :, 1:].unflatten(3, (n, S - 1)), lse1[:, :, :, 1:].unflatten(3, (n, S - 1))
    ob = merge(o1b, lse1b, o2, lse2).flatten(3, 4)  # (B, G, h, n(S-1), L, D)
    return torch.cat([o1[:, :, :, :1], ob], dim=3).to(q.dtype).view(B, H, R, L, D)


# --------------------------------------------------------------------------------------------------
# the rollout: one grid step's queries against the text K/V and a preallocated branch K/V buffer


def decode_step_attention(q, k0, v0, kb, vb, lengths: Optional[torch.Tensor] = None,
                          doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Queries of grid step s (all copies) against the text and their own branch so far.

    q (B, H, n, L, D); k0, v0 (B, G, L, D) the text row; kb, vb (B, G, n, s, L, D) branch rows 1..s
    (the last one being the queries' own). Every backend shares this PyTorch path: it is no-grad
    rollout work whose cost is one causal pass over L keys per copy. -> (B, H, n, L, D)
    """
    B, H, n, L, D = q.shape
    G = k0.shape[1]
    qg = q.view(B, G, H // G, n, L, D)
    key_ok = _key_ok(B, L, lengths, q.device)
    o1, lse1 = prefix_attention(qg, k0, v0, key_ok, doc_ids)
    o2, lse2 = branch_attention(qg.unsqueeze(4), kb, vb, key_ok, steps_causal=False)
    return merge(o1, lse1, o2.squeeze(4), lse2.squeeze(4)).to(q.dtype).view(B, H, n, L, D)


# --------------------------------------------------------------------------------------------------
# the two parts and their exact merge (fp32 inside)


def _key_ok(B, L, lengths, device):
    if lengths is None:
        return None
    return torch.arange(L, device=device)[None, :] < lengths.to(device)[:, None]  # (B, L)


def _up(x: torch.Tensor) -> torch.Tensor:
    """Accumulate in fp32, or fp64 when given fp64."""
    return x if x.dtype == torch.float64 else x.float()


def _safe_lse(scores: torch.Tensor):
    """Row log-sum-exp and probabilities that stay finite (and give finite gradients) for empty rows."""
    m = scores.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(scores - m)
    s = e.sum(-1, keepdim=True)
    p = e / s.clamp_min(1e-30)
    lse = (m + torch.log(s.clamp_min(1e-30))).squeeze(-1)
    return p, lse


def _prefix_tile(q, k0, v0, allowed, scale):
    # q (B, G, h, R, t, D) for positions [i0, i1); k0, v0 (B, G, i1, D); allowed (B|1, t, i1)
    s = torch.einsum("bghrtd,bgjd->bghrtj", _up(q), _up(k0)) * scale
    s = s.masked_fill(~allowed[:, None, None, None], float("-inf"))
    p, lse = _safe_lse(s)
    return torch.einsum("bghrtj,bgjd->bghrtd", p, _up(v0)), lse


def prefix_attention(q, k0, v0, key_ok=None, doc_ids=None, tile: Optional[int] = None):
    """Causal attention of every row's queries over the text row. q (B, G, h, R, L, D); k0, v0 (B, G, L, D).

    Tiled over query positions: the tile of positions [i0, i1) reads keys [0, i1) once for all R
    rows. Each tile is recomputed in backward, so only q, k, v, out and lse are kept.
    Returns out (B, G, h, R, L, D) fp32 and lse (B, G, h, R, L) fp32.
    """
    B, G, h, R, L, D = q.shape
    scale = D ** -0.5
    if tile is None:  # about 2^24 scores per tile
        tile = max(16, min(L, (1 << 24) // max(1, B * G * h * R * L)))
    pos = torch.arange(L, device=q.device)
    outs, lses = [], []
    for i0 in range(0, L, tile):
        i1 = min(L, i0 + tile)
        allowed = (pos[None, :i1] <= pos[i0:i1, None])[None]  # (1, t, i1)
        if key_ok is not None:
            allowed = allowed & key_ok[:, None, :i1]
        if doc_ids is not None:
            allowed = allowed & (doc_ids[:, i0:i1, None] == doc_ids[:, None, :i1])
        args = (q[:, :, :, :, i0:i1], k0[:, :, :i1], v0[:, :, :i1], allowed, scale)
        if torch.is_grad_enabled() and (q.requires_grad or k0.requires_grad or v0.requires_grad):
            o, lse = checkpoint(_prefix_tile, *args, use_reentrant=False)
        else:
            o, lse = _prefix_tile(*args)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, dim=4), torch.cat(lses, dim=4)


def branch_attention(q, kb, vb, key_ok=None, steps_causal: bool = True):
    """Each query against its own branch keys at its own position.

    q (B, G, h, n, Sq, L, D); kb, vb (B, G, n, Sk, L, D). steps_causal: query step s (1-based) sees
    key steps r <= s (needs Sq == Sk); otherwise every key step is visible. A key at a padding
    position is masked. Returns out (B, G, h, n, Sq, L, D) and lse (B, G, h, n, Sq, L), fp32.
    """
    D = q.shape[-1]
    s = torch.einsum("bghnsld,bgnrld->bghnslr", _up(q), _up(kb)) * D ** -0.5  # (..., Sq, L, Sk)
    Sq, Sk = s.shape[4], s.shape[6]
    allowed = torch.ones(Sq, 1, Sk, dtype=torch.bool, device=q.device)
    if steps_causal:
        allowed = torch.arange(Sk, device=q.device)[None, None, :] <= torch.arange(Sq, device=q.device)[:, None, None]
    allowed = allowed[None]  # (1, Sq, 1|L, Sk)
    if key_ok is not None:
        allowed = allowed & key_ok[:, None, :, None]  # (B, Sq, L, Sk)
    s = s.masked_fill(~allowed[:, None, None, None], float("-inf"))
    p, lse = _safe_lse(s)
    return torch.einsum("bghnslr,bgnrld->bghnsld", p, _up(vb)), lse


def merge(o1, lse1, o2, lse2):
    """Exact combination of two attention parts over disjoint key sets, from their outputs and LSEs."""
    lse = torch.logaddexp(lse1, lse2)
    return torch.exp(lse1 - lse)[..., None] * o1 + torch.exp(lse2 - lse)[..., None] * o2

