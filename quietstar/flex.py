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

from quietstar.masks import flex_mask_mod, grid_steps, subset_text_length

# compiled once: torch.compile generates one fused kernel per mask_mod / shape and caches it
_flex_attention_compiled = torch.compile(flex_attention, dynamic=False)
_create_block_mask_compiled = torch.compile(create_block_mask)

_BLOCK_MASKS: "OrderedDict[tuple, BlockMask]" = OrderedDict()
_MAX_CACHED = 32


def _content_key(t: Optional[torch.Tensor]):
    return None if t is None else (tuple(t.shape), tuple(t.flatten().tolist()))


def grid_block_mask(L: int, n: int, S: int, B: int, lengths: Optional[torch.Tensor] = None,
                    doc_ids: Optional[torch.Tensor] = None, device=None,
                    positions: Optional[torch.Tensor] = None) -> BlockMask:
    """The BlockMask of the thought-grid predicate over the flattened grid (cached): R * L tokens, or
    L + (R - 1) P for the subset grid of the thinking positions (B, P) (masks.grid_coords).

    lengths (B,) real tokens per sequence (right padding); doc_ids (B, L) document per position.
    Without any of them the mask does not depend on the sequence and is built once for every batch size.
    """
    device = torch.device(device if device is not None else "cpu")
    per_sequence = lengths is not None or doc_ids is not None or positions is not None
    key = (L, n, S, B if per_sequence else None, str(device), _content_key(lengths), _content_key(doc_ids),
           _content_key(positions))
    hit = _BLOCK_MASKS.get(key)
    if hit is not None:
        _BLOCK_MASKS.move_to_end(key)
        return hit
    # private copies on the device: the BlockMask keeps the mask_mod (and these tensors) for the kernel
    own = lambda t: None if t is None else t.to(device=device, dtype=torch.long).clone()
    lengths, doc_ids, positions = own(lengths), own(doc_ids), own(positions)
    N = L + n * (S - 1) * (L if positions is None else positions.shape[1])
    build = _create_block_mask_compiled if device.type == "cuda" else create_block_mask
    mask = build(flex_mask_mod(L, n, S, lengths, doc_ids, positions), key[3], None, N, N, device=device)
    _BLOCK_MASKS[key] = mask
    if len(_BLOCK_MASKS) > _MAX_CACHED:
        _BLOCK_MASKS.popitem(last=False)
    return mask


def flex_grid_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int,
                        lengths: Optional[torch.Tensor] = None, doc_ids: Optional[torch.Tensor] = None,
                        compiled: bool = True, positions: Optional[torch.Tensor] = None,
                        S: Optional[int] = None) -> torch.Tensor:
    """Attention over the thought grid with FlexAttention.

    Full grid: q (B, H, R, L, D); k, v (B, G, R, L, D), H % G == 0 -> (B, H, R, L, D). Subset grid of the
    thinking positions (B, P): q (B, H, N, D), k, v (B, G, N, D) flattened as in masks.grid_coords, S given
    -> (B, H, N, D). lengths (B,); doc_ids (B, L). compiled=False runs FlexAttention's unfused reference path
    (materialises all scores: tests only). The output is in q's dtype.
    """
    if positions is None:
        B, H, R, L, D = q.shape
        S = grid_steps(R, n)
        q, k, v = (t.flatten(2, 3) for t in (q, k, v))
    else:
        B, H, N, D = q.shape
        L = subset_text_length(N, n, S, positions.shape[1])
    block_mask = grid_block_mask(L, n, S, B, lengths, doc_ids, q.device, positions)
    attend = _flex_attention_compiled if compiled else flex_attention
    out = attend(q, k, v, block_mask=block_mask, scale=D ** -0.5, enable_gqa=H != k.shape[1])  # (B, H, N, D)
    return out if positions is not None else out.view(B, H, R, L, D)
