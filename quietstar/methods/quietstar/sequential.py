"""The learning pass done the official code's way (`thought.impl=sequential_dense`).

S dependent model calls, one grid step each, keeping gradients through a K/V cache that grows by a
`torch.cat` every step; a dense boolean mask over all cached keys; GQA heads repeated; the base
pass repeated for every one of the n copies; thought tokens sampled inside the same loop
(docs/official.md). It also does the official code's per-step vocabulary work: inputs built as one-hot x embedding matmuls, two full vocabulary projections
per step kept for backward (the sampling logits and the mixed logits), a log-softmax and CE at every
step and the talk head at the thought steps. That work is dead in the official code (multiplied by 0
or NaN'd out of the loss); here it enters the loss with weight exactly 0, so values and gradients are
those of the grid pass while time and memory follow the official code's cost model.

It is the baseline of bench/bench_train_step.py and a second test oracle. It plugs in as a learning pass
(`SequentialDensePass`, registered for `thought.impl=sequential_dense`); thinker.py imports it for that
registration, and it needs nothing of thinker.py.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from quietstar.masks import dense_grid_mask
from quietstar.methods.quietstar.config import register_learning_pass
from quietstar.methods.quietstar.rollout import sample_categorical
from quietstar.methods.quietstar.scoring import PassResult


class _GrowingCache:
    stateful = True  # each call grows the cache: the model must not checkpoint (call it again in backward)

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
    cfg, model = qs.cfg, qs.model
    B, L = input_ids.shape
    grid = qs.grid(cfg.n_thoughts if thoughts is None else thoughts.shape[1])
    n, S = grid.n, grid.S
    sample = thoughts is None
    if sample:
        thoughts = input_ids.new_zeros(B, n, L, grid.n_sampled)
    ids, pos = qs.grid_tokens(input_ids, thoughts)  # (B, R, L); thought rows are overwritten when sampling
    per_copy = lambda t: grid.per_copy(t).reshape(B * n, S, L)  # each copy gets its own copy of the text row
    ids_c, pos_c = per_copy(ids).clone(), per_copy(pos)
    rep = lambda t: None if t is None else t.repeat_interleave(n, dim=0)
    mask = dense_grid_mask(L, 1, S, rep(lengths), rep(doc_ids), device=input_ids.device).expand(B * n, -1, -1)
    cache = _GrowingCache(model.cfg.n_layers, mask, L)
    hs, dead = [], input_ids.new_zeros((), dtype=torch.float32)
    for s in range(S):
        cache.step = s
        h = model(inputs_embeds=_one_hot_embed(qs, ids_c[:, s]), position_ids=pos_c[:, s], attn=cache,
                  return_hidden=True)  # (B*n, L, d)
        hs.append(h)
        rm_logits = model.head(h).float()  # (B*n, L, V), kept for backward as in the official code
        dead = dead + torch.log_softmax(rm_logits, -1).sum()
        if s >= 1:
            dead = dead + _dead_talk_ce(qs, grid, hs[0], h, ids_c[:, 0], s)
        if sample and 1 <= s <= grid.n_sampled:  # step s predicts t_s, fed at step s + 1
            t = sample_categorical(rm_logits.detach(), cfg.gumbel_temperature, generator)  # (B*n, L)
            thoughts[..., s - 1] = t.view(B, n, L)
            ids_c[:, s + 1] = t
    hidden = grid.from_per_copy(torch.stack(hs, dim=1).view(B, n, S, L, -1))  # the copies' base passes agree
    return hidden, thoughts, dead


def _one_hot_embed(qs, ids: torch.Tensor) -> torch.Tensor:
    """The official code's input rows: one_hot(token) @ [E; start; end]."""
    E = qs.model.tok_embeddings.weight
    scale = qs.cfg.embedding_scale
    table = torch.cat([E, scale * qs.start_embedding[None].to(E.dtype), scale * qs.end_embedding[None].to(E.dtype)])
    return F.one_hot(ids, E.shape[0] + 2).to(table.dtype) @ table


def _dead_talk_ce(qs, grid, h0, h, text_ids, s: int) -> torch.Tensor:
    """The official code mixes and scores at every step >= 1, thought steps included (work that never
    reaches the loss there)."""
    k = max(0, s - grid.talk_step(0))
    h_mix, _ = qs.mix(grid.ahead(h0, k), h)
    z_mix = qs.model.head(h_mix).float()
    return F.cross_entropy(z_mix.flatten(0, 1), text_ids.roll(-1 - k, 1).flatten(), reduction="sum")


class SequentialDensePass:
    """cfg.impl = "sequential_dense": the learning pass the official code's way, thoughts sampled inside it;
    the dead work enters the loss with weight exactly 0 (same values and gradients as the grid pass)."""

    @staticmethod
    def hidden(qs, input_ids, thoughts, lengths, doc_ids) -> torch.Tensor:
        return sequential_dense_pass(qs, input_ids, thoughts, lengths, doc_ids)[0]

    @staticmethod
    def run(qs, input_ids, lengths, doc_ids, generator, thoughts) -> PassResult:
        hidden, thoughts, dead = sequential_dense_pass(qs, input_ids, thoughts, lengths, doc_ids, generator)
        return PassResult(hidden, thoughts, 0.0 * dead, {})


register_learning_pass("sequential_dense", SequentialDensePass)
