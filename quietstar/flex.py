"""The `flex` attention backend: FlexAttention over the flattened thought grid (docs/backends.md).

The grid (R = 1 + n (S - 1) rows of L positions, layout in masks.py) is flattened to R * L tokens and the
predicate becomes the `mask_mod` of masks.flex_mask_mod; FlexAttention skips the key blocks the mask
empties and fuses the rest into one kernel. Pinned to the torch 2.13 API:

- `flex_attention(q, k, v, block_mask=..., scale=..., enable_gqa=...)` (q (B, H, N, D), k/v (B, G, N, D)),
  compiled once per process at module level (`torch.compile(flex_attention)`); called uncompiled it
  materialises every score, which is only useful for small tests (`compiled=False`).
- `create_block_mask(mask_mod, B, None, N, N, device=...)` (H = None: the mask is the same for every
  head), itself compiled on CUDA so that the (R L)^2 boolean mask is never materialised (G2:
  `_compile=True` is deprecated in favour of torch.compile). Block masks are cached by
  (L, n, S, B, device, lengths, doc_ids): building one costs a pass over all (R L / 128)^2 blocks.

Cost model: row-0 keys give causal block structure (full blocks below the diagonal); each own-branch
key sits on the diagonal of an (s, t) block pair, so every query block also visits up to S - 1
partially masked diagonal blocks of 128 x 128 scores for 128 useful ones. The Triton kernel
(kernels/thought_attention.py) handles those keys elementwise instead.

CPU (torch 2.13): the compiled forward works (inductor C++; slow to compile); FlexAttention has no CPU
backward ("FlexAttention does not support backward on CPU"), so the dispatcher treats `flex` as a CUDA
backend.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from quietstar.masks import flex_mask_mod, grid_steps

# compiled once: torch.compile generates one fused kernel per mask_mod / shape and caches it
_flex_attention_compiled = torch.compile(flex_attention, dynamic=False)
_create_block_mask_compiled = torch.compile(create_block_mask)

_BLOCK_MASKS: "OrderedDict[tuple, BlockMask]" = OrderedDict()
_MAX_CACHED = 32


def _content_key(t: Optional[torch.Tensor]):
    return None if t is None else (tuple(t.shape), tuple(t.flatten().tolist()))


def grid_block_mask(L: int, n: int, S: int, B: int, lengths: Optional[torch.Tensor] = None,
                    doc_ids: Optional[torch.Tensor] = None, device=None) -> BlockMask:
    """The BlockMask of the thought-grid predicate over R * L flattened tokens (cached).

    lengths (B,) real tokens per sequence (right padding); doc_ids (B, L) document per position.
    Without either the mask does not depend on the sequence and is built once for every batch size.
    """
    device = torch.device(device if device is not None else "cpu")
    key = (L, n, S, B if (lengths is not None or doc_ids is not None) else None, str(device),
           _content_key(lengths), _content_key(doc_ids))
    hit = _BLOCK_MASKS.get(key)
    if hit is not None:
        _BLOCK_MASKS.move_to_end(key)
        return hit
    # private copies on the device: the BlockMask keeps the mask_mod (and these tensors) for the kernel
    lengths = None if lengths is None else lengths.to(device=device, dtype=torch.long).clone()
    doc_ids = None if doc_ids is None else doc_ids.to(device=device, dtype=torch.long).clone()
    N = (1 + n * (S - 1)) * L
    build = _create_block_mask_compiled if device.type == "cuda" else create_block_mask
    mask = build(flex_mask_mod(L, n, S, lengths, doc_ids), key[3], None, N, N, device=device)
    _BLOCK_MASKS[key] = mask
    if len(_BLOCK_MASKS) > _MAX_CACHED:
        _BLOCK_MASKS.popitem(last=False)
    return mask


def flex_grid_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int,
                        lengths: Optional[torch.Tensor] = None, doc_ids: Optional[torch.Tensor] = None,
                        compiled: bool = True) -> torch.Tensor:
    """Attention over the thought grid with FlexAttention.

    q (B, H, R, L, D); k, v (B, G, R, L, D), H % G == 0; lengths (B,); doc_ids (B, L).
    compiled=False runs FlexAttention's unfused reference path (materialises all scores: tests only).
    Returns (B, H, R, L, D) in q's dtype.
    """
    B, H, R, L, D = q.shape
    G = k.shape[1]
    S = grid_steps(R, n)
    block_mask = grid_block_mask(L, n, S, B, lengths, doc_ids, q.device)
    attend = _flex_attention_compiled if compiled else flex_attention
    out = attend(q.reshape(B, H, R * L, D), k.reshape(B, G, R * L, D), v.reshape(B, G, R * L, D),
                 block_mask=block_mask, scale=D ** -0.5, enable_gqa=H != G)  # (B, H, R*L, D)
    return out.view(B, H, R, L, D)
