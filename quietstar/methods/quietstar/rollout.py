"""Phase 1 of a Quiet-STaR step, the rollout: the text row's forward, the thinking positions (thought.where),
and the T - 3 decode-like grid steps that sample a thought token at every position for each of the n copies, on
the text row's K/V. Also the attention adapters that lay the model's attention over the grid (the learning
pass uses them too) and the inverse-CDF sampling of thought tokens."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from quietstar.linear_ce import LogitsBuffer, lm_head_chunks
from quietstar.masks import ThoughtGrid
from quietstar.methods.quietstar.where import Selection, base_entropy, row_entropy, select

class TextPass(NamedTuple):
    """The text row's forward (with gradient in training): row 0 of the grid attends only to itself, so it runs
    once, before the rollout, which samples on its K/V, and the thought rows, which attend to it."""

    hidden: torch.Tensor  # (B, L, d) final-norm hidden states
    k: list  # per layer (B, G, L, D): the text row's keys (after RoPE)
    v: list  # per layer (B, G, L, D)


class Rollout(NamedTuple):
    thoughts: torch.Tensor  # (B, n, P, T-3) long
    entropy: torch.Tensor  # 0-dim: mean entropy of the first thought token's distribution
    selection: Optional[Selection]  # the thinking positions (None: every position, P = L)


class GridAttention:
    """Attention callable for the learning pass: the model's (B, heads, R*L, D) -> the grid layout."""

    def __init__(self, R: int, L: int, n: int, lengths, doc_ids):
        self.R, self.L, self.n, self.lengths, self.doc_ids = R, L, n, lengths, doc_ids

    @torch.compiler.disable  # compiled blocks (train.compile) call it as an opaque op: no guards on its state
    def __call__(self, layer_idx, q, k, v):
        from quietstar.attention import grid_attention

        B, H, _, D = q.shape
        G = k.shape[1]
        grid = lambda t, h: t.view(B, h, self.R, self.L, D)
        out = grid_attention(grid(q, H), grid(k, G), grid(v, G), self.n, self.lengths, self.doc_ids)
        return out.reshape(B, H, self.R * self.L, D)

    @torch.compiler.disable
    def rows(self, layer_idx, q, k, v):
        """The thought rows' queries (B, H, (R - 1) L, D) alone, over the whole grid's k, v (B, G, R L, D)."""
        from quietstar.attention import grid_rows_attention

        B, H, _, D = q.shape
        G = k.shape[1]
        kv = lambda t: t.view(B, G, self.R, self.L, D)
        out = grid_rows_attention(q.view(B, H, self.R - 1, self.L, D), kv(k), kv(v), self.n, self.lengths,
                                  self.doc_ids)
        return out.reshape(B, H, (self.R - 1) * self.L, D)


class SubsetGridAttention:
    """Attention callable for the learning pass on the subset grid of the thinking positions (B, P): the
    model's flattened (B, heads, L + (R - 1) P, D) tokens in masks.grid_coords order."""

    def __init__(self, n: int, S: int, positions, lengths, doc_ids):
        self.n, self.S, self.positions, self.lengths, self.doc_ids = n, S, positions, lengths, doc_ids

    @torch.compiler.disable
    def __call__(self, layer_idx, q, k, v):
        from quietstar.attention import subset_grid_attention

        return subset_grid_attention(q, k, v, self.n, self.S, self.positions, self.lengths, self.doc_ids)

    @torch.compiler.disable
    def rows(self, layer_idx, q, k, v):
        """The branch rows' queries (B, H, (R - 1) P, D) alone, over the whole subset grid's k, v."""
        from quietstar.attention import subset_grid_rows_attention

        return subset_grid_rows_attention(q, k, v, self.n, self.S, self.positions, self.lengths, self.doc_ids)


class TextAttention:
    """Attention callable for the text row's forward (TextPass): causal over the text, with gradient; it keeps
    every layer's K/V for the rollout and the thought rows."""

    stateful = True  # it records K/V per call: a checkpointed block must not call it again

    def __init__(self, n_layers: int, lengths, doc_ids):
        self.k, self.v = [None] * n_layers, [None] * n_layers
        self.lengths, self.doc_ids = lengths, doc_ids

    @torch.compiler.disable
    def __call__(self, layer_idx, q, k, v):
        from quietstar.attention import text_attention

        self.k[layer_idx], self.v[layer_idx] = k, v
        return text_attention(q, k, v, self.lengths, self.doc_ids)


class GridRowsAttention:
    """Attention callable for the thought rows on top of a TextPass: the model's (B, heads, (R - 1) P, D) tokens
    of the branch rows. The text row's K/V join as row 0, and `grid_attn` (GridAttention, or
    SubsetGridAttention for the thinking positions) attends the thought rows' queries over the whole grid
    (its `rows`)."""

    def __init__(self, text: TextPass, grid_attn):
        self.text, self.grid_attn = text, grid_attn

    @torch.compiler.disable
    def __call__(self, layer_idx, q, k, v):
        k0, v0 = self.text.k[layer_idx], self.text.v[layer_idx]
        k, v = torch.cat([k0.to(k.dtype), k], 2), torch.cat([v0.to(v.dtype), v], 2)
        return self.grid_attn.rows(layer_idx, q, k, v)


class RolloutAttention:
    """Attention callable for the rollout: the text row once, then one grid step of n*P tokens per call
    (P thinking positions, all L by default), against a preallocated branch K/V buffer (B, G, n, steps, P, D)
    per layer."""

    def __init__(self, n_layers, B, G, n, steps, L, D, lengths, doc_ids, dtype, device):
        self.k0 = [None] * n_layers
        self.v0 = [None] * n_layers
        self.shape = (n_layers, B, G, n, max(steps, 1), L, D)
        self.kb = self.vb = None
        self.n, self.L, self.lengths, self.doc_ids = n, L, lengths, doc_ids
        self.dtype, self.device = dtype, device
        self.positions = None
        self.step = 0

    def think_at(self, positions: Optional[torch.Tensor]) -> None:
        """The branches grow at these positions (B, P) (None: every position); allocates their K/V buffer."""
        self.positions = positions
        shape = self.shape if positions is None else (*self.shape[:5], positions.shape[1], self.shape[6])
        self.kb = torch.empty(shape, dtype=self.dtype, device=self.device)
        self.vb = torch.empty(shape, dtype=self.dtype, device=self.device)

    @torch.compiler.disable  # as above: `step` changes every call, which would recompile the blocks
    def __call__(self, i, q, k, v):
        from quietstar.split import decode_step_attention, prefix_attention

        B, H, _, D = q.shape
        G = k.shape[1]
        if self.step == 0:  # the text row: causal over itself
            self.k0[i], self.v0[i] = k, v
            key_ok = None if self.lengths is None else torch.arange(self.L, device=q.device) < self.lengths[:, None]
            out, _ = prefix_attention(q.view(B, G, H // G, 1, self.L, D), k, v, key_ok, self.doc_ids)
            return out.to(q.dtype).view(B, H, self.L, D)
        s, P = self.step, self.kb.shape[5]
        self.kb[i, :, :, :, s - 1] = k.view(B, G, self.n, P, D)
        self.vb[i, :, :, :, s - 1] = v.view(B, G, self.n, P, D)
        out = decode_step_attention(q.view(B, H, self.n, P, D), self.k0[i], self.v0[i], self.kb[i, :, :, :, :s],
                                    self.vb[i, :, :, :, :s], self.lengths, self.doc_ids, self.positions)
        return out.reshape(B, H, self.n * P, D)


def sample_categorical(logits: torch.Tensor, temperature: float = 1.0,
                       generator: Optional[torch.Generator] = None, u: Optional[torch.Tensor] = None,
                       overwrite: bool = False) -> torch.Tensor:
    """A sample from softmax(logits / temperature) over the last dim, by inverse CDF. logits (..., V) -> (...,).

    A two-level search (`categorical_blocks`): the weights exp(z - max z) (float32) are summed in blocks of
    256 tokens (float32, pairwise), the block sums accumulated in float64 pick a block, and the float64 cumulative sum of that
    block's weights picks the token. The distribution sampled differs from the float64 softmax by a total
    variation of about 5e-8 at V = 32k-49k (measured: tests/test_objective.py), where a float32 cumulative
    sum over the whole vocabulary (the previous method) is off by 3-4e-4 and misdraws unlikely tokens; and
    it costs less than that cumulative sum. The official code's hard Gumbel-softmax draws from the same
    distribution (at temperature 1, whatever its tau); inverse-CDF sampling needs one uniform number per
    row instead of V. `u` (rows, 1) float64 gives those numbers (to sample a batch in chunks); by default
    they are drawn here. With `overwrite`, float32 logits are used as scratch space (their values are lost)."""
    w, block_cdf = categorical_blocks(logits, temperature, overwrite)  # (rows, nb, BLOCK) float32, (rows, nb) float64
    rows, V = w.shape[0], logits.shape[-1]
    if u is None:
        u = torch.rand(rows, 1, generator=generator, device=w.device, dtype=torch.float64)
    x = u * block_cdf[:, -1:]  # (rows, 1)
    b = torch.searchsorted(block_cdf, x).clamp_(max=block_cdf.shape[1] - 1)  # the block holding the draw
    lo = torch.where(b > 0, block_cdf.gather(-1, (b - 1).clamp(min=0)), 0.0)
    frac = ((x - lo) / (block_cdf.gather(-1, b) - lo)).nan_to_num_(0.0)  # where in the block, in [0, 1]
    inner = w.gather(1, b[:, :, None].expand(rows, 1, _BLOCK))[:, 0].double().cumsum_(-1)  # (rows, BLOCK)
    j = torch.searchsorted(inner, frac * inner[:, -1:]).clamp_(max=_BLOCK - 1)
    return (b * _BLOCK + j).clamp_(max=V - 1).view(logits.shape[:-1])


_BLOCK = 256  # tokens per block of the two-level inverse CDF


def categorical_blocks(logits: torch.Tensor, temperature: float = 1.0,
                       overwrite: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (the unnormalised probabilities that `sample_categorical` draws from, float32, in blocks of 256
    tokens (rows, ceil(V / 256), 256), zero past V; the cumulative sums of the blocks (rows, ceil(V / 256))
    float64). With `overwrite`, float32 logits are turned into those probabilities in place."""
    z = logits.float().reshape(-1, logits.shape[-1])  # (rows, V)
    m = z.amax(-1, keepdim=True)
    z = z.sub_(m) if overwrite else z - m
    w = torch.exp_(z if temperature == 1.0 else z.div_(temperature))
    if w.shape[1] % _BLOCK:
        w = F.pad(w, (0, _BLOCK - w.shape[1] % _BLOCK))
    w = w.view(w.shape[0], -1, _BLOCK)
    return w, w.sum(-1).double().cumsum_(-1)


class Rollouts:
    """QuietStar's rollout (a base class of QuietStar: `self` is the module, with its model, config and grid)."""

    def text_pass(self, input_ids, lengths=None, doc_ids=None) -> TextPass:
        """The text row's forward (with gradient when enabled): its final-norm hidden states and every layer's
        K/V, for the rollout and the thought rows (GridPass)."""
        B, L = input_ids.shape
        attn = TextAttention(self.model.cfg.n_layers, lengths, doc_ids)
        pos = torch.arange(L, device=input_ids.device).expand(B, L)
        h = self.model(inputs_embeds=self.embed(input_ids), position_ids=pos, attn=attn, return_hidden=True)
        return TextPass(h, attn.k, attn.v)

    def think_scores(self, h_text: torch.Tensor, logits: Optional[torch.Tensor] = None,
                     buf: Optional[LogitsBuffer] = None) -> torch.Tensor:
        """The selector's score of each position from the text's final hidden states (B, L, d) -> (B, L):
        the base next-token entropy (where = entropy; from `logits` (B, L, V) when the caller has them, else
        through the LM head, its logits in `buf`) or the gate's predicted reward (where = gate)."""
        if self.cfg.where == "entropy" and logits is not None:
            return row_entropy(logits)
        if self.cfg.where == "entropy":
            return base_entropy(self.model.lm_head_weight, h_text, buf)
        if self.cfg.where == "gate":
            return self.gate(h_text.detach())
        raise ValueError(f"thought.where={self.cfg.where!r} scores no position")

    def thinking_positions(self, h_text: torch.Tensor, lengths=None, doc_ids=None, generator=None,
                           buf: Optional[LogitsBuffer] = None, scores: Optional[torch.Tensor] = None
                           ) -> Optional[Selection]:
        """The thinking positions of a batch from its text hidden states (B, L, d), or from the selector's
        `scores` (B, L) when the caller has them; None when all think."""
        cfg = self.cfg
        if cfg.where == "all":
            return None
        eligible = ThoughtGrid.target_ok(h_text.shape[1], 0, lengths, doc_ids, h_text.device)  # has a next token
        eligible = eligible.expand(h_text.shape[0], -1)
        scores = self.think_scores(h_text, buf=buf) if scores is None else scores
        return select(scores, eligible, cfg.think_fraction, cfg.think_threshold,
                      cfg.gate_explore if cfg.where == "gate" else 0.0, generator)

    @torch.no_grad()
    def rollout(self, input_ids, attention_mask=None, generator=None, doc_ids=None,
                selection: Optional[Selection] = None) -> torch.Tensor:
        """Sample n thoughts at every thinking position. -> thoughts (B, n, P, T-3) long (P = L unless
        thought.where chooses positions: then at `selection`, else at the ones it chooses, which `_rollout`
        returns with the thoughts)."""
        return self._rollout(input_ids, attention_mask, generator, doc_ids, selection)[0]

    @torch.no_grad()
    def _rollout(self, input_ids, attention_mask=None, generator=None, doc_ids=None, selection=None) -> Rollout:
        return self.rollout_at(input_ids, self._check_input(input_ids, attention_mask), generator, doc_ids, selection)

    def rollout_at(self, input_ids, lengths, generator=None, doc_ids=None, selection=None,
                   text: Optional[TextPass] = None, scores: Optional[torch.Tensor] = None,
                   buf: Optional[LogitsBuffer] = None) -> Rollout:
        """The rollout for checked inputs (lengths (B,) or None): the text row (unless `text` has run it), the
        choice of the thinking positions (thought.where, unless `selection` is given; from the selector's
        `scores` (B, L) when given), then the thought steps at those positions, their logits in `buf`."""
        B, L = input_ids.shape
        grid = self.grid()
        n, n_sampled = grid.n, grid.n_sampled
        entropy = torch.zeros((), device=input_ids.device)
        mcfg, model = self.model.cfg, self.model
        attn = RolloutAttention(mcfg.n_layers, B, mcfg.n_kv_heads, n, n_sampled, L, mcfg.head_dim, lengths,
                                 doc_ids, model.tok_embeddings.weight.dtype, input_ids.device)
        pos = torch.arange(L, device=input_ids.device)
        if n_sampled == 0 and self.cfg.where == "all":
            return Rollout(torch.zeros(B, n, L, 0, dtype=torch.long, device=input_ids.device), entropy, None)
        if text is None:
            h_text = model(inputs_embeds=self.embed(input_ids), position_ids=pos.expand(B, L), attn=attn,
                           return_hidden=True)
        else:  # the text row has run: its K/V, without gradient
            h_text = text.hidden.detach()
            attn.k0, attn.v0 = [k.detach() for k in text.k], [v.detach() for v in text.v]
        buf = LogitsBuffer() if buf is None else buf  # for every vocabulary pass of the rollout
        if selection is None:
            selection = self.thinking_positions(h_text, lengths, doc_ids, generator, buf, scores)
        positions = None if selection is None else selection.positions
        where = pos.expand(B, L) if positions is None else positions  # (B, P)
        P = where.shape[1]
        thoughts = torch.zeros(B, n, P, n_sampled, dtype=torch.long, device=input_ids.device)
        if n_sampled == 0:
            return Rollout(thoughts, entropy, selection)
        attn.think_at(positions)
        tokens = torch.full((B, n * P), self.start_token_id, dtype=torch.long, device=input_ids.device)
        for s in range(grid.START_STEP, n_sampled + 1):  # step s is fed t_{s-1} (<start> at s = 1), predicts t_s
            attn.step = s
            h = model(inputs_embeds=self.embed(tokens), attn=attn, return_hidden=True,
                      position_ids=grid.position_ids(s, where).repeat(1, n))  # (B, n*P, d)
            tokens = self._sample(h.view(B * n * P, -1), generator, entropy if s == 1 else None, buf).view(B, n * P)
            thoughts[..., s - 1] = tokens.view(B, n, P)
        return Rollout(thoughts, entropy, selection)

    def _sample(self, h: torch.Tensor, generator=None, entropy: Optional[torch.Tensor] = None,
                buf: Optional[LogitsBuffer] = None) -> torch.Tensor:
        """One thought token per row of final hidden states h (rows, d), the LM head applied in chunks, their
        logits in `buf` (only text ids exist, so <start>/<end> are never sampled). If given, `entropy` (a
        0-dim tensor) receives the mean entropy of the distributions: a cheap diagnostic."""
        rows, temp = h.shape[0], self.cfg.gumbel_temperature
        u = torch.rand(rows, 1, generator=generator, device=h.device, dtype=torch.float64)
        tokens = torch.empty(rows, dtype=torch.long, device=h.device)
        for c0, c1, logits in lm_head_chunks(h, self.model.lm_head_weight, buf=buf):  # (c, V)
            if entropy is not None:
                entropy += row_entropy(logits if temp == 1.0 else logits / temp).sum() / rows
            tokens[c0:c1] = sample_categorical(logits, temp, u=u[c0:c1], overwrite=True)
        return tokens
