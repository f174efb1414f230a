"""The learning pass done the official code's way (`thought.impl=sequential_dense`).

S dependent model calls, one grid step each, keeping gradients through a K/V cache that grows by a
`torch.cat` every step; a dense boolean mask over all cached keys; GQA heads repeated; the base
pass repeated for every one of the n copies (REFERENCE §2.3-§2.6, §7 "Inefficiencies"). It computes
the same function as the grid pass and serves as its cost baseline and as a second test oracle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quietstar.masks import dense_grid_mask


class _GrowingCache:
    def __init__(self, n_layers: int, mask: torch.Tensor, L: int):
        self.k = [None] * n_layers
        self.v = [None] * n_layers
        self.mask = mask  # (B*n, S*L, S*L), step-major keys of one copy
        self.L = L
        self.step = 0

    def __call__(self, i, q, k, v):
        if self.step == 0:
            self.k[i], self.v[i] = k, v
        else:
            self.k[i] = torch.cat([self.k[i], k], dim=2)  # (B*n, G, (s+1) L, D)
            self.v[i] = torch.cat([self.v[i], v], dim=2)
        rep = q.shape[1] // k.shape[1]
        keys = self.k[i].repeat_interleave(rep, dim=1)  # the official code repeats the kv heads
        values = self.v[i].repeat_interleave(rep, dim=1)
        s, L = self.step, self.L
        mask = self.mask[:, None, s * L:(s + 1) * L, :(s + 1) * L]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


def sequential_dense_hidden(qs, input_ids, thoughts, lengths=None, doc_ids=None) -> torch.Tensor:
    """Final-norm hidden states (B, R, L, d) of the grid (layout of masks.py), computed sequentially."""
    ids, pos = qs.grid_tokens(input_ids, thoughts)  # (B, R, L)
    B, R, L = ids.shape
    n = thoughts.shape[1]
    S = 1 + (R - 1) // n

    def per_copy(t):  # (B, R, L) -> (B*n, S, L): each copy gets its own copy of the text row
        branch = t[:, 1:].view(B, n, S - 1, L)
        return torch.cat([t[:, None, :1].expand(B, n, 1, L), branch], dim=2).reshape(B * n, S, L)

    ids_c, pos_c = per_copy(ids), per_copy(pos)
    rep = lambda t: None if t is None else t.repeat_interleave(n, dim=0)
    mask = dense_grid_mask(L, 1, S, rep(lengths), rep(doc_ids), device=ids.device)
    mask = mask.expand(B * n, -1, -1)
    cache = _GrowingCache(qs.model.cfg.n_layers, mask, L)
    hs = []
    for s in range(S):
        cache.step = s
        hs.append(qs.model(inputs_embeds=qs.embed(ids_c[:, s]), position_ids=pos_c[:, s], attn=cache,
                           return_hidden=True))  # (B*n, L, d)
    d = hs[0].shape[-1]
    h0 = hs[0].view(B, n, L, d)[:, :1]  # the copies' base passes are identical; the grid keeps one
    branch = torch.stack(hs[1:], dim=1).view(B, n * (S - 1), L, d) if S > 1 else h0[:, :0]
    return torch.cat([h0, branch], dim=1)
