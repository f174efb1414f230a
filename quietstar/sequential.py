"""The learning pass done the official code's way (`thought.impl=sequential_dense`).

S dependent model calls, one grid step each, keeping gradients through a K/V cache that grows by a
`torch.cat` every step; a dense boolean mask over all cached keys; GQA heads repeated; the base
pass repeated for every one of the n copies; thought tokens sampled inside the same loop
(REFERENCE §2.3-§2.6). It also does the official code's per-step vocabulary work (REFERENCE §7
"Inefficiencies" 4): inputs built as one-hot x embedding matmuls, two full vocabulary projections
per step kept for backward (the sampling logits and the mixed logits), a log-softmax and CE at every
step and the talk head at the thought steps. That work is dead in the official code (multiplied by 0
or NaN'd out of the loss); here it enters the loss with weight exactly 0, so values and gradients are
those of the grid pass while time and memory follow the reference's cost model (REFERENCE §8.1).

It is the baseline of bench/bench_train_step.py and a second test oracle.
"""

from __future__ import annotations

from typing import Optional

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


def sequential_dense_pass(qs, input_ids, thoughts: Optional[torch.Tensor] = None, lengths=None, doc_ids=None,
                          generator: Optional[torch.Generator] = None):
    """-> (hidden (B, R, L, d) in the grid layout of masks.py, thoughts (B, n, L, T-3), dead-work term (0-valued)).

    With `thoughts=None` the thought tokens are sampled inside the loop, as the official code does."""
    cfg = qs.cfg
    B, L = input_ids.shape
    n, T, K = cfg.n_thoughts if thoughts is None else thoughts.shape[1], cfg.n_ahead, cfg.n_ahead_talk
    S = T + K - 1
    model = qs.model
    V = model.cfg.vocab_size
    dev = input_ids.device
    if thoughts is None:
        thoughts = torch.zeros(B, n, L, T - 3, dtype=torch.long, device=dev)
        sample = True
    else:
        sample = False
    ids, pos = qs.grid_tokens(input_ids, thoughts)  # (B, R, L); thought rows are overwritten when sampling

    def per_copy(t):  # (B, R, L) -> (B*n, S, L): each copy gets its own copy of the text row
        branch = t[:, 1:].view(B, n, S - 1, L)
        return torch.cat([t[:, None, :1].expand(B, n, 1, L), branch], dim=2).reshape(B * n, S, L)

    ids_c, pos_c = per_copy(ids).clone(), per_copy(pos)
    rep = lambda t: None if t is None else t.repeat_interleave(n, dim=0)
    mask = dense_grid_mask(L, 1, S, rep(lengths), rep(doc_ids), device=dev).expand(B * n, -1, -1)
    cache = _GrowingCache(model.cfg.n_layers, mask, L)
    # every input row of the official code is one_hot(token) @ [E; start; end]
    scale = cfg.embedding_scale
    table = torch.cat([model.tok_embeddings.weight, scale * qs.start_embedding[None].to(model.tok_embeddings.weight.dtype),
                       scale * qs.end_embedding[None].to(model.tok_embeddings.weight.dtype)])
    from quietstar.thinker import sample_categorical

    hs, dead = [], input_ids.new_zeros((), dtype=torch.float32)
    for s in range(S):
        cache.step = s
        x = F.one_hot(ids_c[:, s], V + 2).to(table.dtype) @ table  # (B*n, L, d)
        h = model(inputs_embeds=x, position_ids=pos_c[:, s], attn=cache, return_hidden=True)  # (B*n, L, d)
        hs.append(h)
        rm_logits = model.head(h).float()  # (B*n, L, V), kept for backward as in the official code
        dead = dead + torch.log_softmax(rm_logits, -1).sum()
        if s >= 1:  # the official code mixes and scores at every step, thought steps included
            k = max(0, s - (T - 1))
            h_base = torch.cat([hs[0][:, k:], hs[0][:, -1:].expand(-1, k, -1)], dim=1)
            h_mix, _ = qs.mix(h_base, h)
            z_mix = model.head(h_mix).float()
            dead = dead + F.cross_entropy(z_mix.flatten(0, 1), ids_c[:, 0].roll(-1 - k, 1).flatten(), reduction="sum")
        if sample and 1 <= s <= T - 3:
            t = sample_categorical(rm_logits.detach(), cfg.gumbel_temperature, generator)  # (B*n, L)
            thoughts[..., s - 1] = t.view(B, n, L)
            ids_c[:, s + 1] = t
    d = hs[0].shape[-1]
    h0 = hs[0].view(B, n, L, d)[:, :1]  # the copies' base passes are identical; the grid keeps one
    branch = torch.stack(hs[1:], dim=1).view(B, n * (S - 1), L, d) if S > 1 else h0[:, :0]
    return torch.cat([h0, branch], dim=1), thoughts, dead
