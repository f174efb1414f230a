"""The one dispatch point for attention over the thought grid (layout and rule: masks.py).

Backends, all computing the same function of (q, k, v) in the grid layout:

- `dense`:  the boolean mask from masks.dense_grid_mask + SDPA. The oracle, and the reference's cost
            model (O(R^2 L^2) scores).
- `split`:  split.py: prefix-causal attention over row 0 plus own-branch attention over the query's own
            earlier branch keys, merged exactly by log-sum-exp, with its own backward. The CPU default.
- `flex`:   flex.py: FlexAttention with a block mask from the same predicate (CUDA).
- `triton`: the fused kernel in kernels/thought_attention.py (CUDA; CPU only under TRITON_INTERPRET=1).
- `auto`:   triton on CUDA, split elsewhere.

`use_backend(name)` overrides the configured backend inside a `with` block (tests, benchmarks). The rollout's
attention, one grid step at a time without gradient, has no backend choice: split.decode_step_attention.

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

from quietstar.masks import dense_grid_mask, grid_steps, subset_text_length
from quietstar.split import split_attention, subset_split_attention

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


def resolve_backend(device: torch.device, dtype: Optional[torch.dtype] = None) -> str:
    """The backend for inputs on `device` (of `dtype`, where known). `auto`: the Triton kernel on CUDA for
    half-precision inputs, `split` otherwise: the kernel's fp32 tiles do not fit a GPU (kernels/aot.py)."""
    name = _override or _configured
    if name == "auto":
        return "triton" if device.type == "cuda" and dtype != torch.float32 else "split"
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
    backend = resolve_backend(q.device, q.dtype)
    if backend == "triton":
        from quietstar.kernels.thought_attention import thought_attention
        return thought_attention(q, k, v, n, lengths, doc_ids=doc_ids)
    if backend == "flex":
        from quietstar.flex import flex_grid_attention
        return flex_grid_attention(q, k, v, n, lengths, doc_ids)
    if backend == "dense":
        return dense_attention(q, k, v, n, lengths, doc_ids)
    return split_attention(q, k, v, n, lengths, doc_ids)


def subset_grid_attention(q, k, v, n: int, S: int, positions: torch.Tensor, lengths: Optional[torch.Tensor] = None,
                          doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention over the subset grid of the thinking positions (B, P) (masks.grid_coords): the text row's L
    tokens, then R - 1 branch rows of P tokens, flattened. q (B, H, N, D); k, v (B, G, N, D) -> (B, H, N, D).
    A branch at position positions[b, p] sees the whole text prefix up to it and its own earlier steps."""
    backend = resolve_backend(q.device, q.dtype)
    if backend == "triton":
        from quietstar.kernels.thought_attention import subset_thought_attention
        return subset_thought_attention(q, k, v, n, S, positions, lengths, doc_ids)
    if backend == "flex":
        from quietstar.flex import flex_grid_attention
        return flex_grid_attention(q, k, v, n, lengths, doc_ids, positions=positions, S=S)
    L = subset_text_length(q.shape[2], n, S, positions.shape[1])
    if backend == "dense":
        mask = dense_grid_mask(L, n, S, lengths, doc_ids, q.device, positions)[:, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
    return subset_split_attention(q, k, v, n, S, positions, lengths, doc_ids)


def grid_rows_attention(q, k, v, n: int, lengths: Optional[torch.Tensor] = None,
                        doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """grid_attention's thought rows alone: their queries q (B, H, R - 1, L, D) over the keys of the whole grid
    k, v (B, G, R, L, D), the text row's included -> (B, H, R - 1, L, D), rows 1.. of grid_attention's output
    (the text row ran before, on its own: text_attention). The split backend computes nothing for the text
    row's queries; the others run the whole grid with zero queries there and drop that row's output (no
    gradient flows from it)."""
    if resolve_backend(q.device, q.dtype) == "split":
        return split_attention(q, k, v, n, lengths, doc_ids, rows_only=True)
    q = torch.cat([q.new_zeros(*q.shape[:2], 1, *q.shape[3:]), q], 2)
    return grid_attention(q, k, v, n, lengths, doc_ids)[:, :, 1:]


def subset_grid_rows_attention(q, k, v, n: int, S: int, positions: torch.Tensor,
                               lengths: Optional[torch.Tensor] = None,
                               doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """subset_grid_attention's branch rows alone: their queries q (B, H, (R - 1) P, D) over the keys of the whole
    subset grid k, v (B, G, L + (R - 1) P, D) -> (B, H, (R - 1) P, D), as grid_rows_attention."""
    L = k.shape[2] - q.shape[2]
    if resolve_backend(q.device, q.dtype) == "split":
        return subset_split_attention(q, k, v, n, S, positions, lengths, doc_ids, rows_only=True)
    q = torch.cat([q.new_zeros(*q.shape[:2], L, q.shape[3]), q], 2)
    return subset_grid_attention(q, k, v, n, S, positions, lengths, doc_ids)[:, :, L:]


def text_attention(q, k, v, lengths: Optional[torch.Tensor] = None,
                   doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The text row alone (row 0 sees nothing but itself: causal, within its document, real keys only), with
    gradient. q (B, H, L, D); k, v (B, G, L, D) -> (B, H, L, D). The split backend runs it as a one-row
    grid (on CPU PyTorch's flash kernels); the others through SDPA with the oracle's mask."""
    if resolve_backend(q.device, q.dtype) == "split":
        return split_attention(q[:, :, None], k[:, :, None], v[:, :, None], 1, lengths, doc_ids)[:, :, 0]
    gqa = q.shape[1] != k.shape[1]
    if lengths is None and doc_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    mask = dense_grid_mask(q.shape[2], 1, 1, lengths, doc_ids, q.device)[:, None]  # (B, 1, L, L)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def dense_attention(q, k, v, n, lengths=None, doc_ids=None):
    B, H, R, L, D = q.shape
    G = k.shape[1]
    mask = dense_grid_mask(L, n, grid_steps(R, n), lengths, doc_ids, device=q.device)[:, None]  # (B|1, 1, RL, RL)
    out = F.scaled_dot_product_attention(q.reshape(B, H, R * L, D), k.reshape(B, G, R * L, D),
                                         v.reshape(B, G, R * L, D), attn_mask=mask, enable_gqa=H != G)
    return out.view(B, H, R, L, D)
