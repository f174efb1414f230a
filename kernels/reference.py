"""Pure-PyTorch reference for the thought-grid attention kernel (kernels/thought_attention.py).

Built straight from the predicate: the dense boolean mask of quietstar.masks.dense_grid_mask over the
flattened grid (R rows of L positions), then masked softmax attention with the scores materialised.
O(R^2 L^2) time and memory: a test oracle for small shapes, never a backend.

Shapes (docs/thought-grid.md): q (B, H, R, L, D); k, v (B, G, R, L, D) with G dividing H; R = 1 + n (S - 1)
grid rows (row 0 = the text, row 1 + p (S - 1) + (s - 1) = step s of copy p); lengths (B,) real
tokens per sequence (right padding). Query (step s, copy p, position i) sees the key at (row 0, j)
iff j <= i, and the key at (step r, copy p, position i) iff 1 <= r <= s; keys at j >= lengths[b]
are masked, and with doc_ids (B, L) (packed documents) so are text keys of another document. Softmax
scale D ** -0.5.
"""

from __future__ import annotations

from typing import Optional

import torch

from quietstar.masks import dense_grid_mask, grid_steps


def thought_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int,
                          lengths: Optional[torch.Tensor] = None,
                          compute_dtype: Optional[torch.dtype] = None,
                          doc_ids: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked attention over the thought grid, computed in `compute_dtype`.

    compute_dtype: fp32 by default (fp64 when the inputs are fp64); pass the inputs' own dtype for the
    same-dtype PyTorch baseline of the tolerance rule (docs/testing.md: a kernel's error against the fp64
    oracle may be at most about twice PyTorch's own error at the kernel's dtype).
    Returns out (B, H, R, L, D) and lse (B, H, R, L), both in compute_dtype; lse is the natural-log
    log-sum-exp of the scaled scores over the visible keys (-inf, with out = 0, for a query that sees
    no key, which happens only when lengths[b] == 0).
    """
    B, H, R, L, D = q.shape
    G = k.shape[1]
    if H % G:
        raise ValueError(f"{H} query heads are not a multiple of {G} kv heads")
    if compute_dtype is None:
        compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    S = grid_steps(R, n)
    mask = dense_grid_mask(L, n, S, lengths, doc_ids, device=q.device)[:, None]  # (B|1, 1, RL, RL)
    qf = q.to(compute_dtype).reshape(B, H, R * L, D)
    kf = k.to(compute_dtype).reshape(B, G, R * L, D).repeat_interleave(H // G, dim=1)  # (B, H, RL, D)
    vf = v.to(compute_dtype).reshape(B, G, R * L, D).repeat_interleave(H // G, dim=1)
    scores = (qf @ kf.transpose(-1, -2)) * D ** -0.5  # (B, H, RL, RL)
    scores = scores.masked_fill(~mask, float("-inf"))
    # a row with no visible key (lengths[b] == 0) gets lse = -inf and out = 0; its scores are shifted
    # to 0 before logsumexp so that no NaN reaches the gradients of the other rows
    empty = ~mask.any(-1, keepdim=True)  # (B|1, 1, RL, 1)
    lse = torch.logsumexp(scores.masked_fill(empty, 0.0), dim=-1)  # (B, H, RL)
    p = torch.exp(scores - lse[..., None])  # exactly 0 on masked keys
    out = p @ vf
    lse = lse.masked_fill(empty[..., 0], float("-inf"))
    return out.view(B, H, R, L, D), lse.view(B, H, R, L)
