"""Quiet-STaR: a layer around an unchanged base model that thinks before every token.

Zelikman et al. 2024, "Quiet-STaR: Language Models Can Teach Themselves to Think Before Speaking"
(arXiv 2403.09629). docs/architecture.md describes the layer, docs/official.md the official code and every
deliberate difference from it.

One training step has two phases (docs/thought-grid.md; the layout is masks.ThoughtGrid):

1. rollout (no grad): on the K/V of the text row's forward (run once per unique sequence, with grad: row 0
   attends only to itself, so it is also the learning pass's), T - 3 decode-like grid steps that sample a
   thought token at every position for each of the n copies (inverse-CDF sampling);
2. learning pass (with grad): one teacher-forced forward over the thought rows under the grid predicate,
   attending to the text row's K/V (GridPass; `thought.impl` may name another registered pass, e.g.
   sequential.py's), then the objective in three stages: score (the fused LM-head sums), objective
   (objective.py: NLL weights, rewards, advantages, policy weights) and metrics (0-dim tensors).

Mixing: w = talk_head([h_base(i+k); h_talk_k(i)]) with a zero-initialised last layer,
h_mix = (1 - w) h_base(i+k) + w h_talk_k(i), logits = lm_head(h_mix). Note the code's w weights the
thought, the opposite of the paper's convention.

Shape legend: B unique sequences, n thoughts per position, S grid rows per copy, R = 1 + n (S - 1)
rows in the grid layout, L positions, d model dim, V vocab, H / G query / kv heads, D head dim.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from quietstar.ema import EMATeacher
from quietstar.linear_ce import LogitsBuffer
from quietstar.masks import GridStates, ThoughtGrid
from quietstar.methods.quietstar.config import LEARNING_PASSES, ThoughtConfig, register_learning_pass
from quietstar.methods.quietstar.inference import Inference
from quietstar.methods.quietstar.rollout import (GridAttention, GridRowsAttention, Rollouts, SubsetGridAttention,
                                                 TextPass)
from quietstar.methods.quietstar import sequential  # noqa: F401  (registers thought.impl=sequential_dense)
from quietstar.methods.quietstar.scoring import PassResult, Scoring, ThoughtOutput
from quietstar.methods.quietstar.where import Selection, ThinkGate

# --------------------------------------------------------------------------------------------------
# pieces


class TalkHead(nn.Module):
    """[h_base; h_thought] (..., 2d) -> mixing weight w (...): Linear-ReLU-Linear-ReLU-Linear(no bias).

    The last layer starts at exactly zero, so w = 0 and the mixed prediction is the base one.
    """

    def __init__(self, dim: int, hidden: Optional[int] = None):
        super().__init__()
        hidden = hidden or dim
        self.net = nn.Sequential(nn.Linear(2 * dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1, bias=False))
        for m in self.net[:3:2]:
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        nn.init.zeros_(self.net[4].weight)

    def forward(self, h_base, h_thought):
        return self.net(torch.cat([h_base, h_thought], dim=-1)).squeeze(-1)


class GridPass:
    """The learning pass (cfg.impl = "grid"): the text row's forward, the rollout on its K/V and a branch K/V
    buffer, then one teacher-forced forward over the thought rows of the whole grid (or of the subset grid of
    the thinking positions) under the grid predicate, attending to the text row's K/V. Other passes
    (sequential.py) register beside it."""

    @staticmethod
    def hidden(qs: "QuietStar", input_ids, thoughts, lengths, doc_ids, positions=None):
        """One forward over the whole grid, text row included (evaluation, tests). -> final-norm hidden
        states (B, R, L, d), or GridStates for the thinking positions (B, P)."""
        ids, pos = qs.grid_tokens(input_ids, thoughts, positions)
        B, L, n = input_ids.shape[0], input_ids.shape[1], thoughts.shape[1]
        if positions is not None:
            attn = SubsetGridAttention(n, qs.cfg.n_grid_steps, positions, lengths, doc_ids)
            h = qs.model(inputs_embeds=qs.embed(ids), position_ids=pos, attn=attn, return_hidden=True)
            return qs.grid(n).states(h, L, positions)
        R = ids.shape[1]
        h = qs.model(inputs_embeds=qs.embed(ids).view(B, R * L, -1), position_ids=pos.reshape(B, R * L),
                     attn=GridAttention(R, L, n, lengths, doc_ids), return_hidden=True)
        return h.view(B, R, L, -1)

    @staticmethod
    def rows(qs: "QuietStar", input_ids, thoughts, lengths, doc_ids, text: TextPass, positions=None):
        """The thought rows' forward on top of the text pass. -> final-norm hidden states (B, R - 1, P, d)."""
        ids, pos = qs.grid_tokens(input_ids, thoughts, positions)
        B, L, n = input_ids.shape[0], input_ids.shape[1], thoughts.shape[1]
        if positions is None:
            grid_attn = GridAttention(ids.shape[1], L, n, lengths, doc_ids)
            ids, pos = ids[:, 1:].reshape(B, -1), pos[:, 1:].reshape(B, -1)  # (B, (R - 1) L)
        else:
            grid_attn = SubsetGridAttention(n, qs.cfg.n_grid_steps, positions, lengths, doc_ids)
            ids, pos = ids[:, L:], pos[:, L:]  # (B, (R - 1) P)
        h = qs.model(inputs_embeds=qs.embed(ids), position_ids=pos, attn=GridRowsAttention(text, grid_attn),
                     return_hidden=True)
        return h.view(B, -1, L if positions is None else positions.shape[1], h.shape[-1])

    @classmethod
    def run(cls, qs: "QuietStar", input_ids, lengths, doc_ids, generator, thoughts, selection=None) -> PassResult:
        metrics, base = {}, None
        buf = LogitsBuffer()  # one logits scratch for every vocabulary pass of the forward (a fresh one page-faults)
        text = qs.text_pass(input_ids, lengths, doc_ids)
        if thoughts is None:
            scores = None
            if qs.prescore_base(selection):  # the base NLL's pass gives the entropies
                base = qs.score_base(text.hidden, input_ids, lengths, doc_ids, buf)
                scores = base.entropy
            with torch.no_grad():
                thoughts, entropy, selection = qs.rollout_at(input_ids, lengths, generator, doc_ids, selection,
                                                             text, scores, buf)
            metrics["thought/entropy_first_token"] = entropy
        positions = None if selection is None else selection.positions
        rows = cls.rows(qs, input_ids, thoughts, lengths, doc_ids, text, positions)
        return PassResult(GridStates(text.hidden, rows, positions), thoughts, None, metrics, selection, base, buf)


register_learning_pass("grid", GridPass)


# --------------------------------------------------------------------------------------------------
# the layer


def thought_init_ids(cfg: ThoughtConfig, tokenizer) -> tuple[int, int]:
    """The token ids whose embeddings <start> and <end> start from (0, 0 without a tokenizer)."""
    end = cfg.init_token if cfg.end_init_token is None else cfg.end_init_token
    return text_token_id("init_token", cfg.init_token, tokenizer), text_token_id("end_init_token", end, tokenizer)


def text_token_id(name: str, text: str, tokenizer) -> int:
    """The first token of `text` (the thought setting `name`); 0 without a tokenizer (bare models, tests)."""
    if tokenizer is None:
        return 0
    enc = tokenizer.encode(text, add_bos=False)
    if not enc:
        raise ValueError(f"thought.{name}={text!r} encodes to no token")
    return enc[0]


class QuietStar(Rollouts, Scoring, Inference, nn.Module):
    """Quiet-STaR around an unchanged base `Transformer` (model.py).

    Parameters added: `start_embedding`, `end_embedding` (d,), stored divided by
    cfg.embedding_scale, and `talk_head`. The thought token ids are past the base vocab
    (`start_token_id` = V, `end_token_id` = V + 1); the embedding matrix is not resized and the LM
    head never produces them.
    """

    def __init__(self, model: nn.Module, tokenizer=None, cfg: Optional[ThoughtConfig] = None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        cfg = cfg or ThoughtConfig()
        self.configure(cfg)
        mcfg = model.cfg
        if mcfg.sliding_window is not None and mcfg.sliding_window < mcfg.max_seq_len:
            self._window = mcfg.sliding_window  # the grid has no sliding window: sequences must fit in it
        else:
            self._window = None
        V, d = mcfg.vocab_size, mcfg.dim
        self.start_token_id, self.end_token_id = V, V + 1
        if tokenizer is not None:
            if (tokenizer.start_thought_id, tokenizer.end_thought_id) != (V, V + 1):
                raise ValueError(f"tokenizer thought ids {(tokenizer.start_thought_id, tokenizer.end_thought_id)} "
                                 f"must be (V, V+1) = {(V, V + 1)} for this model")
            self.pad_token_id = tokenizer.pad_id
        else:  # bare model (tests): initialise from token 0
            self.pad_token_id = 0
        # Initialised once, here; a loaded state dict overwrites them and nothing re-initialises them
        # (but quietstar.methods.plain.model.reset_thought_embeddings, for a start from a plain-LM checkpoint).
        start, end = thought_init_ids(cfg, tokenizer)
        w = model.tok_embeddings.weight.detach()
        self.start_embedding = nn.Parameter((w[start].float() / cfg.embedding_scale).to(w.dtype))
        self.end_embedding = nn.Parameter((w[end].float() / cfg.embedding_scale).to(w.dtype))
        self.talk_head = TalkHead(d, cfg.talk_head_hidden).to(model.tok_embeddings.weight.dtype)
        # where = gate: the learned choice of the thinking positions (where.py); absent otherwise
        self.gate = ThinkGate(d).to(model.tok_embeddings.weight.dtype) if cfg.where == "gate" else None
        # thought.ema_decay: the reward's no-thought teacher, an average of the base model's weights (ema.py)
        self.ema = EMATeacher(model, cfg.ema_decay) if cfg.ema_decay is not None else None
        model.extra_state_bytes = self.ema.nbytes() if self.ema is not None else 0  # in the memory budget

    # ---- embeddings and the grid layout ----

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Any ids (...,) -> input vectors (..., d): text ids via the embedding, thought ids via the learned vectors."""
        V = self.model.cfg.vocab_size
        x = self.model.tok_embeddings(ids.clamp(max=V - 1))
        scale = self.cfg.embedding_scale
        x = torch.where((ids == self.start_token_id)[..., None], (scale * self.start_embedding).to(x.dtype), x)
        return torch.where((ids == self.end_token_id)[..., None], (scale * self.end_embedding).to(x.dtype), x)

    def _check_input(self, input_ids, attention_mask):
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, L), got shape {tuple(input_ids.shape)}")
        L, K = input_ids.shape[1], self.cfg.n_ahead_talk
        if L <= K:
            raise ValueError(f"sequence length {L} must exceed ThoughtConfig.n_ahead_talk={K} (no position "
                             "could be scored)")
        if self._window is not None and L > self._window:
            raise ValueError(f"sequence length {L} exceeds the model's sliding_window={self._window}; the thought "
                             "grid attends the whole prefix")
        if attention_mask is None:
            return None
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                             f"{tuple(input_ids.shape)}")
        lengths = attention_mask.long().sum(-1)
        msg = "every sequence needs at least one real token (attention_mask row of zeros)"
        if lengths.device.type == "cpu":
            if bool((lengths < 1).any()):
                raise ValueError(msg)
        else:  # checked on the device: no host sync per step
            torch._assert_async((lengths >= 1).all(), msg)
        return lengths

    @property
    def cfg(self) -> ThoughtConfig:
        """The thought config in force (read-only: `configure` changes it)."""
        return self._cfg

    def configure(self, cfg: ThoughtConfig) -> None:
        """Run with `cfg` from now on (a curriculum stage's lengths, an evaluation's thought.where, ...): the one
        place the config changes, and the grid layout with it."""
        self._cfg = cfg
        self._grid = ThoughtGrid(cfg.n_ahead, cfg.n_ahead_talk, cfg.n_thoughts)
        self.close_id = None if cfg.close_token is None else text_token_id("close_token", cfg.close_token, self.tokenizer)

    def read_steps(self, thoughts: torch.Tensor, grid: Optional[ThoughtGrid] = None):
        """Where each thought (B, n, P, T-3) is read, and which of its sampled tokens belong to it
        (ThoughtGrid.read_steps with thought.close_token's id)."""
        return (grid or self.grid(thoughts.shape[1])).read_steps(thoughts, self.close_id)

    def grid(self, n: Optional[int] = None) -> ThoughtGrid:
        """The grid layout for the current config (n copies; default cfg.n_thoughts)."""
        if n is None or n == self.cfg.n_thoughts:
            return self._grid
        return ThoughtGrid(self.cfg.n_ahead, self.cfg.n_ahead_talk, n)

    def grid_tokens(self, input_ids: torch.Tensor, thoughts: torch.Tensor, positions: Optional[torch.Tensor] = None):
        """-> ids (B, R, L) and position ids (B, R, L) of the grid layout (masks.ThoughtGrid); flat (B, N) for
        the subset grid of the thinking positions (B, P)."""
        return self.grid(thoughts.shape[1]).tokens(input_ids, thoughts, self.start_token_id, self.end_token_id,
                                                   self.pad_token_id, positions)


    @property
    def learning_pass(self):
        """The strategy that runs phase 2 (and the rollout it needs), chosen by cfg.impl."""
        return LEARNING_PASSES[self.cfg.impl]

    def grid_hidden(self, input_ids, thoughts, attention_mask=None, doc_ids=None, positions=None):
        """One teacher-forced forward over the whole grid. -> final-norm hidden states (B, R, L, d); GridStates
        for the subset grid of the thinking positions (B, P) (thoughts (B, n, P, T-3))."""
        lengths = self._check_input(input_ids, attention_mask)
        if positions is None:
            return self.learning_pass.hidden(self, input_ids, thoughts, lengths, doc_ids)
        return self.learning_pass.hidden(self, input_ids, thoughts, lengths, doc_ids, positions)

    def grid_logits(self, input_ids, thoughts, attention_mask=None, doc_ids=None) -> torch.Tensor:
        """Raw (unmixed) logits of every grid cell, for tests and analysis. -> (B, n, S, L, V);
        step 0 is the base prediction (the same for every copy)."""
        h = self.grid_hidden(input_ids, thoughts, attention_mask, doc_ids)
        return self.model.head(self.grid(thoughts.shape[1]).per_copy(h))

    def forward(self, input_ids, attention_mask=None, generator=None, doc_ids=None,
                thoughts: Optional[torch.Tensor] = None, selection: Optional[Selection] = None) -> ThoughtOutput:
        """One Quiet-STaR step: rollout (unless `thoughts` are given), learning pass, losses. With thought.where,
        given thoughts (B, n, P, T-3) need the `selection` they were sampled at."""
        lengths = self._check_input(input_ids, attention_mask)
        if self.cfg.where == "all":
            p = self.learning_pass.run(self, input_ids, lengths, doc_ids, generator, thoughts)
        else:
            if thoughts is not None and selection is None:
                raise ValueError(f"thought.where={self.cfg.where!r}: thoughts given without the selection they "
                                 "were sampled at")
            p = self.learning_pass.run(self, input_ids, lengths, doc_ids, generator, thoughts, selection)
        out = self.losses(p.hidden, input_ids, p.thoughts, attention_mask, doc_ids, p.selection, p.base, p.buf)
        if p.extra_loss is not None:
            out.loss = out.loss + p.extra_loss
        out.metrics.update(p.metrics)
        return out

    def mix(self, h_base: torch.Tensor, h_thought: torch.Tensor):
        """Hidden-state mixing. -> (h_mix (..., d), w (...))."""
        w = self.talk_head(h_base, h_thought)
        if self.cfg.mix_sigmoid:
            w = torch.sigmoid(w)
        return (1 - w[..., None]) * h_base + w[..., None] * h_thought, w
