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

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import List, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from quietstar.ema import EMATeacher
from quietstar.linear_ce import LogitsBuffer, WeightGradSum, linear_logprob_sum, lm_head_chunks
from quietstar.masks import GridStates, ThoughtGrid, at_positions
from quietstar.methods.quietstar.objective import OBJECTIVES, get_objective
from quietstar.methods.quietstar.objective import metrics as objective_metrics
from quietstar.methods.quietstar.where import WHERE, Selection, ThinkGate, base_entropy, row_entropy, select


@dataclass
class CurriculumStage:
    """One stage of a thought-length curriculum: `steps` optimizer steps at these thought and talk lengths."""

    n_ahead: int
    n_ahead_talk: int
    steps: int


@dataclass
class ThoughtConfig:
    """The Quiet-STaR settings. Defaults are faithful to the official code except for its outright bugs;
    `ThoughtConfig.reference()` reproduces every official quirk (docs/official.md)."""

    n_ahead: int = 8
    """T: grid steps before the talk steps, counting the base step. A thought is T - 1 tokens
    (<start>, T - 3 sampled tokens, <end>), as in the official code (whose README counts T)."""
    n_ahead_talk: int = 4
    """K: true future tokens predicted after each thought (teacher-forced talk steps)."""
    n_thoughts: int = 2
    """n: independent thoughts sampled per position (the official n_passes); the REINFORCE baseline is
    their mean reward."""
    gumbel_temperature: float = 1.0
    """Temperature of thought sampling (an inverse-CDF categorical sample, `sample_categorical`). The
    official code's hard Gumbel-softmax samples at 1.0 whatever its tau, so 1.0 reproduces it."""
    base_loss_weight: float = 0.5
    """Weight of the no-thought LM loss in the NLL; the talk losses share 1 - this (official: 0.5)."""
    policy_weight: float = 1e6
    """beta: multiplier of the REINFORCE term (official: 1e6; the paper's objective implies 1)."""
    policy_temperature: float = 3.0
    """tau of the log-probability in the policy loss (official: 3, although thoughts are sampled at 1;
    set 1.0 for the true score function)."""
    policy_mean_over_padding: bool = False
    """Official: True, the policy loss is a plain mean over every row and position of the window
    i <= L-2-K, pads included. Default: a mean over the scorable positions that have a real target."""
    reward_drop_last_position: bool = False
    """Official: True, rewards come from the window i <= L-2-K of the padded length: the last fully
    scorable position L-1-K gets none (an off-by-one), and a position with only some of its K targets
    real (near padding or a document end) is rewarded with those. Default (False): a position is
    scorable only when all K of its targets are real, so those partial positions get no reward."""
    clamp_negative_advantage: bool = True
    """Drop negative advantages (official and paper: True, "led to more stable training")."""
    mix_sigmoid: bool = False
    """Squash the mixing weight w through a sigmoid (official: False, w is unbounded). With a sigmoid
    the zero-initialised head starts at w = 0.5, not at 'base only'."""
    embedding_scale: float = 100.0
    """The start/end thought embeddings are stored divided by this and multiplied back in forward: an
    effective LR multiplier of this size under Adam (official: 100)."""
    init_token: str = "---"
    """The start/end thought embeddings are initialised, once, from this text's first token embedding."""
    end_init_token: Optional[str] = None
    """<end> is initialised from this text's first token instead (None: init_token, as in the official code)."""
    talk_head_hidden: Optional[int] = None
    """Width of the talk head's hidden layers (None = d, as in the official code)."""

    enabled: bool = True
    """False: train the base model as a plain language model (no thoughts, no talk head: quietstar/methods/plain/model.py),
    for pretraining and for the matched no-thought baseline. Checkpoints are the same either way."""

    impl: str = "grid"
    """How the learning pass runs: `grid` (one teacher-forced forward over the whole grid) or
    `sequential_dense` (the official code's way: S dependent steps with gradients through a growing
    K/V cache, a dense mask and the base pass repeated per copy; a baseline and a test oracle)."""

    objective: str = "official"
    """The loss built from the scored log-probabilities: a name registered in objective.OBJECTIVES
    (`official`: the paper's NLL + REINFORCE with the official code's weights; see objective.py)."""
    reward_from: Optional[str] = None
    """Which prediction after a thought its reward reads: `mixed` (the talk head's mix with the base
    prediction, the official reward), `unmixed` (the thought row's own prediction, RLP's: a reward that does
    not wait for the talk head to trust the thoughts), or None (the objective's own: official mixed, rlp
    unmixed)."""
    reward_floor: Optional[float] = None
    """Rewards below this are raised to it before the advantages (None: none). With 0 a thought that predicts
    worse than no thought counts as no thought, as the talk head can ignore it: where no thought can help (most
    positions of most text) every thought then scores 0 and the position teaches the policy nothing, instead of
    rewarding whichever thought disturbs the prediction least (measured: such a thought takes over every
    position, docs/learning.md)."""
    ema_decay: Optional[float] = None
    """The reward's no-thought counterfactual: None, the same model's base pass (detached); a decay tau in
    (0, 1), an EMA teacher of the base model's weights (RLP: 0.999), updated after every optimizer step,
    saved in checkpoints, never trained. It shifts every thought of a position alike, so it changes the
    reward's level, not a group-relative advantage."""
    nll_weight: float = 1.0
    """Weight of the NLL terms (the no-thought and the talk-head predictions) in the loss: 1 as Quiet-STaR;
    0 leaves the policy term alone, as RLP (the talk head then does not train)."""
    curriculum: List[CurriculumStage] = field(default_factory=list)
    """Thought and talk lengths that change during training (Fast Quiet-STaR's 16-8 -> 12-4 -> 8-4): a list of
    {n_ahead, n_ahead_talk, steps}, run in order on the same parameters; after the last stage's steps its
    lengths stay. Empty (the default): n_ahead and n_ahead_talk throughout. The lengths follow from the step
    alone, so a resumed run continues mid-stage exactly; a checkpoint is loaded for inference at the lengths
    of the stage it was saved in."""
    where: str = "all"
    """Which positions think (where.py): `all` (every position, the paper), `entropy` (the highest base
    next-token entropy) or `gate` (a learned head predicting the thought's reward). Only the chosen positions
    get grid rows, so the step's cost follows the fraction that thinks; the others train as plain NLL."""
    think_fraction: float = 0.25
    """With where = entropy or gate: the share of positions that think (the top scores of each sequence)."""
    think_threshold: Optional[float] = None
    """Instead of think_fraction: think where the score is above this (entropy in nats; gate: predicted
    reward in nats). Generation uses it too; without it, generation thinks at the top think_fraction of the
    scores seen so far in the sequence."""
    gate_explore: float = 0.1
    """where = gate: the share of the thinking slots given to positions drawn at random from the rest."""
    gate_loss_weight: float = 1.0
    """where = gate: weight of the gate's squared error against the observed mean reward in the loss."""
    scoring: str = "fused"
    """How log-probabilities are scored: `fused` (the LM head, log-softmax and weighted sum with its
    gradient in one chunked pass, linear_ce.py) or `plain` (full logits and autograd: the same values
    and gradients, more memory; a reference to prototype a new objective against)."""

    def __post_init__(self):
        if self.impl not in LEARNING_PASSES:
            raise ValueError(f"ThoughtConfig.impl must be one of {sorted(LEARNING_PASSES)}, got {self.impl!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"ThoughtConfig.objective must be one of {sorted(OBJECTIVES)}, got {self.objective!r}")
        if self.scoring not in ("fused", "plain"):
            raise ValueError(f"ThoughtConfig.scoring must be 'fused' or 'plain', got {self.scoring!r}")
        if self.reward_from not in (None, "mixed", "unmixed"):
            raise ValueError(f"ThoughtConfig.reward_from must be mixed, unmixed or null, got {self.reward_from!r}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ThoughtConfig.ema_decay must be in (0, 1) or null, got {self.ema_decay}")
        if not self.nll_weight >= 0.0:
            raise ValueError(f"ThoughtConfig.nll_weight must be >= 0, got {self.nll_weight}")
        if self.n_ahead < 3:
            raise ValueError(f"ThoughtConfig.n_ahead must be >= 3 (<start>, <end> and the base step), got {self.n_ahead}")
        if self.n_ahead_talk < 1:
            raise ValueError(f"ThoughtConfig.n_ahead_talk must be >= 1, got {self.n_ahead_talk}")
        if self.n_thoughts < 1:
            raise ValueError(f"ThoughtConfig.n_thoughts must be >= 1, got {self.n_thoughts}")
        if not self.gumbel_temperature > 0:
            raise ValueError(f"ThoughtConfig.gumbel_temperature must be > 0, got {self.gumbel_temperature}")
        if not self.policy_temperature > 0:
            raise ValueError(f"ThoughtConfig.policy_temperature must be > 0, got {self.policy_temperature}")
        if not 0.0 <= self.base_loss_weight <= 1.0:
            raise ValueError(f"ThoughtConfig.base_loss_weight must be in [0, 1], got {self.base_loss_weight}")
        if not self.embedding_scale > 0:
            raise ValueError(f"ThoughtConfig.embedding_scale must be > 0, got {self.embedding_scale}")
        if self.where not in WHERE:
            raise ValueError(f"ThoughtConfig.where must be one of {WHERE}, got {self.where!r}")
        if not 0.0 < self.think_fraction <= 1.0:
            raise ValueError(f"ThoughtConfig.think_fraction must be in (0, 1], got {self.think_fraction}")
        if not 0.0 <= self.gate_explore <= 1.0:
            raise ValueError(f"ThoughtConfig.gate_explore must be in [0, 1], got {self.gate_explore}")
        if self.where != "all" and self.impl != "grid":
            raise ValueError(f"ThoughtConfig.where={self.where!r} needs impl='grid' (the subset grid), got {self.impl!r}")
        self.curriculum = [CurriculumStage(**c) if isinstance(c, dict) else c for c in self.curriculum]
        for k, c in enumerate(self.curriculum):
            if c.n_ahead < 3 or c.n_ahead_talk < 1 or c.steps < 1:
                raise ValueError(f"ThoughtConfig.curriculum[{k}] needs n_ahead >= 3, n_ahead_talk >= 1 and steps >= 1, "
                                 f"got {c}")

    def stage_at(self, step: int) -> int:
        """The curriculum stage in force at optimizer step `step` (1-based); the last one after its steps."""
        end = 0
        for k, stage in enumerate(self.curriculum):
            end += stage.steps
            if step <= end:
                return k
        return max(0, len(self.curriculum) - 1)

    def at_step(self, step: int) -> tuple[int, "ThoughtConfig"]:
        """(curriculum stage, the config without a curriculum) in force at optimizer step `step` (1-based);
        (0, self) when there is no curriculum."""
        if not self.curriculum:
            return 0, self
        k = self.stage_at(step)
        stage = self.curriculum[k]
        return k, dataclasses.replace(self, n_ahead=stage.n_ahead, n_ahead_talk=stage.n_ahead_talk, curriculum=[])

    @property
    def n_grid_steps(self) -> int:
        """S = T + K - 1, the grid steps per copy (masks.ThoughtGrid.S)."""
        return ThoughtGrid(self.n_ahead, self.n_ahead_talk).S

    @classmethod
    def reference(cls, **overrides) -> "ThoughtConfig":
        """The official training settings, every quirk included (docs/official.md)."""
        ref = dict(n_ahead=12, n_ahead_talk=4, n_thoughts=2, gumbel_temperature=1.0, base_loss_weight=0.5,
                   policy_weight=1e6, policy_temperature=3.0, policy_mean_over_padding=True,
                   reward_drop_last_position=True, clamp_negative_advantage=True, mix_sigmoid=False,
                   embedding_scale=100.0, init_token="---")
        return cls(**{**ref, **overrides})


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


@dataclass
class ThoughtOutput:
    loss: torch.Tensor  # scalar: nll + policy_weight * policy_loss (with grad)
    nll: torch.Tensor  # scalar: base_loss_weight * CE_base + (1 - base_loss_weight) * mean_k CE_talk_k
    policy_loss: torch.Tensor  # scalar: the REINFORCE term before its weight
    reward: torch.Tensor  # scalar: mean over scorable positions of R = sum_k (CE_base - CE_talk_k)
    mix_weight: torch.Tensor  # scalar: mean w over scorable talk predictions
    thoughts: torch.Tensor  # (B, n, L, T-3) the sampled thought tokens
    metrics: dict = field(default_factory=dict)  # diagnostics, 0-dim tensors (numbers only in train.py, per log_every)
    # per-position detail (detached), for tests and analysis
    ce_base: Optional[torch.Tensor] = None  # (B, L) CE of x_{i+1} without a thought
    ce_talk: Optional[torch.Tensor] = None  # (B, n, K, L) CE of x_{i+k+1} from the mixed talk prediction
    mix_weights: Optional[torch.Tensor] = None  # (B, n, K, L) w of each talk prediction
    rewards: Optional[torch.Tensor] = None  # (B, n, L) R(i) (0 where not scorable)
    advantages: Optional[torch.Tensor] = None  # (B, n, L) A(i) as used by the policy loss
    # (B, n, L, T-3) tempered log pi of each sampled token where its policy weight is nonzero; NaN elsewhere
    # (clamped advantages, padding: those rows are not computed)
    thought_logprobs: Optional[torch.Tensor] = None
    selection: Optional[Selection] = None  # thought.where's thinking positions: the L above is then P of them


class TalkScores(NamedTuple):
    nll: torch.Tensor  # 0-dim, with grad
    ce_base: torch.Tensor  # (B, L) CE of x_{i+1} without a thought, detached
    ce_talk: torch.Tensor  # (K, B, n, L) CE of x_{i+k+1} after the thought, detached
    mix_weight: torch.Tensor  # (K, B, n, L) w of each talk prediction
    ce_thought: Optional[torch.Tensor] = None  # (K, B, n, L) the same from the thought row alone (unmixed)


class BaseScore(NamedTuple):
    """The no-thought term scored before the thinking positions are known (thought.where = entropy: its pass
    gives the selector's entropies). The objective's base weights may then change at the thinking positions
    only; `score_talk` adds the difference there."""

    weighted: torch.Tensor  # 0-dim, with grad: sum coef * log p(x_{i+1})
    ce: torch.Tensor  # (B, L) CE of x_{i+1} without a thought, detached
    coef: torch.Tensor  # (B, L) the weights it was scored with
    entropy: torch.Tensor  # (B, L) next-token entropy of the base prediction (NaN where coef is 0)
    head_grad: WeightGradSum  # the LM head's weight gradient, which the other scoring calls continue


class PassResult(NamedTuple):
    hidden: torch.Tensor  # (B, R, L, d) final-norm hidden states in the grid layout, or GridStates
    thoughts: torch.Tensor  # (B, n, P, T-3)
    extra_loss: Optional[torch.Tensor]  # added to the loss (None: nothing)
    metrics: dict  # 0-dim tensors
    selection: Optional[Selection] = None  # the thinking positions (None: every position)
    base: Optional[BaseScore] = None  # the no-thought term, when scored already (None: score_talk scores it)
    buf: Optional[LogitsBuffer] = None  # the forward's logits scratch, for the scoring calls to reuse


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
            attn = _SubsetGridAttention(n, qs.cfg.n_grid_steps, positions, lengths, doc_ids)
            h = qs.model(inputs_embeds=qs.embed(ids), position_ids=pos, attn=attn, return_hidden=True)
            return qs.grid(n).states(h, L, positions)
        R = ids.shape[1]
        h = qs.model(inputs_embeds=qs.embed(ids).view(B, R * L, -1), position_ids=pos.reshape(B, R * L),
                     attn=_GridAttention(R, L, n, lengths, doc_ids), return_hidden=True)
        return h.view(B, R, L, -1)

    @staticmethod
    def rows(qs: "QuietStar", input_ids, thoughts, lengths, doc_ids, text: TextPass, positions=None):
        """The thought rows' forward on top of the text pass. -> final-norm hidden states (B, R - 1, P, d)."""
        ids, pos = qs.grid_tokens(input_ids, thoughts, positions)
        B, L, n = input_ids.shape[0], input_ids.shape[1], thoughts.shape[1]
        if positions is None:
            grid_attn = _GridAttention(ids.shape[1], L, n, lengths, doc_ids)
            ids, pos = ids[:, 1:].reshape(B, -1), pos[:, 1:].reshape(B, -1)  # (B, (R - 1) L)
        else:
            grid_attn = _SubsetGridAttention(n, qs.cfg.n_grid_steps, positions, lengths, doc_ids)
            ids, pos = ids[:, L:], pos[:, L:]  # (B, (R - 1) P)
        h = qs.model(inputs_embeds=qs.embed(ids), position_ids=pos, attn=_GridRowsAttention(text, grid_attn),
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
                thoughts, entropy, selection = qs._rollout_lengths(input_ids, lengths, generator, doc_ids, selection,
                                                                   text, scores, buf)
            metrics["thought/entropy_first_token"] = entropy
        positions = None if selection is None else selection.positions
        rows = cls.rows(qs, input_ids, thoughts, lengths, doc_ids, text, positions)
        return PassResult(GridStates(text.hidden, rows, positions), thoughts, None, metrics, selection, base, buf)


LEARNING_PASSES: dict = {"grid": GridPass}


def register_learning_pass(name: str, learning_pass) -> None:
    """Make `learning_pass` (an object with `hidden` and `run` as on GridPass) selectable as cfg.impl = name."""
    LEARNING_PASSES[name] = learning_pass


class NextTokenLogits(NamedTuple):
    base: torch.Tensor  # (B, L, V) no-thought logits of x_{i+1} (final hidden states (B, L, d): next_token_states)
    mixed: torch.Tensor  # (B, n, P, V) talk-head-mixed logits after a thought (P = L: every position)
    mix_weight: torch.Tensor  # (B, n, P)
    thoughts: torch.Tensor  # (B, n, P, T-3)
    selection: Optional[Selection] = None  # thought.where's P thinking positions (None: all L)

    def thinking(self) -> torch.Tensor:
        """(B, L) bool: the positions whose prediction follows a thought."""
        B, L = self.base.shape[:2]
        if self.selection is None:
            return torch.ones(B, L, dtype=torch.bool, device=self.base.device)
        return torch.zeros(B, L, dtype=torch.bool, device=self.base.device).scatter_(
            1, self.selection.positions, self.selection.valid)

    def full(self) -> "NextTokenLogits":
        """The prediction used at every position (P = L): after a thought at the thinking positions, the base
        prediction elsewhere (mix weight 0, thought ids 0 there)."""
        if self.selection is None:
            return self
        B, n, P, V = self.mixed.shape
        L = self.base.shape[1]
        pos, valid = self.selection.positions, self.selection.valid[:, None]  # (B, P), (B, 1, P)

        def spread(t, fill):  # (B, n, P, ...) at the thinking positions -> (B, n, L, ...), `fill` elsewhere
            idx = pos.view(B, 1, P, *(1,) * (t.dim() - 3)).expand(t.shape)
            ok = valid.view(B, 1, P, *(1,) * (t.dim() - 3))
            return fill.scatter(2, idx, torch.where(ok, t, fill.gather(2, idx)))

        th = self.thoughts
        return NextTokenLogits(self.base, spread(self.mixed, self.base[:, None].expand(B, n, L, V).contiguous()),
                               spread(self.mix_weight, self.mix_weight.new_zeros(B, n, L)),
                               spread(th, th.new_zeros(B, n, L, th.shape[-1])), self.selection)


class _GridAttention:
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


class _SubsetGridAttention:
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


class _TextAttention:
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


class _GridRowsAttention:
    """Attention callable for the thought rows on top of a TextPass: the model's (B, heads, (R - 1) P, D) tokens
    of the branch rows. The text row's K/V join as row 0, and `grid_attn` (_GridAttention, or
    _SubsetGridAttention for the thinking positions) attends the thought rows' queries over the whole grid
    (its `rows`)."""

    def __init__(self, text: TextPass, grid_attn):
        self.text, self.grid_attn = text, grid_attn

    @torch.compiler.disable
    def __call__(self, layer_idx, q, k, v):
        k0, v0 = self.text.k[layer_idx], self.text.v[layer_idx]
        k, v = torch.cat([k0.to(k.dtype), k], 2), torch.cat([v0.to(v.dtype), v], 2)
        return self.grid_attn.rows(layer_idx, q, k, v)


class _RolloutAttention:
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


# --------------------------------------------------------------------------------------------------
# the layer


def thought_init_ids(cfg: ThoughtConfig, tokenizer) -> tuple[int, int]:
    """The token ids whose embeddings <start> and <end> start from (0, 0 without a tokenizer)."""
    if tokenizer is None:
        return 0, 0
    end = cfg.init_token if cfg.end_init_token is None else cfg.end_init_token
    ids = []
    for name, text in (("init_token", cfg.init_token), ("end_init_token", end)):
        enc = tokenizer.encode(text, add_bos=False)
        if not enc:
            raise ValueError(f"thought.{name}={text!r} encodes to no token")
        ids.append(enc[0])
    return ids[0], ids[1]


class QuietStar(nn.Module):
    """Quiet-STaR around an unchanged base `Transformer` (model.py).

    Parameters added: `start_embedding`, `end_embedding` (d,), stored divided by
    cfg.embedding_scale, and `talk_head`. The thought token ids are past the base vocab
    (`start_token_id` = V, `end_token_id` = V + 1); the embedding matrix is not resized and the LM
    head never produces them.
    """

    def __init__(self, model: nn.Module, tokenizer=None, cfg: Optional[ThoughtConfig] = None):
        super().__init__()
        self.model = model
        self.cfg = cfg = cfg or ThoughtConfig()
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
        self.tokenizer = tokenizer
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

    def grid(self, n: Optional[int] = None) -> ThoughtGrid:
        """The grid layout for the current config (n copies; default cfg.n_thoughts)."""
        return ThoughtGrid(self.cfg.n_ahead, self.cfg.n_ahead_talk, self.cfg.n_thoughts if n is None else n)

    def grid_tokens(self, input_ids: torch.Tensor, thoughts: torch.Tensor, positions: Optional[torch.Tensor] = None):
        """-> ids (B, R, L) and position ids (B, R, L) of the grid layout (masks.ThoughtGrid); flat (B, N) for
        the subset grid of the thinking positions (B, P)."""
        return self.grid(thoughts.shape[1]).tokens(input_ids, thoughts, self.start_token_id, self.end_token_id,
                                                   self.pad_token_id, positions)

    def text_pass(self, input_ids, lengths=None, doc_ids=None) -> TextPass:
        """The text row's forward (with gradient when enabled): its final-norm hidden states and every layer's
        K/V, for the rollout and the thought rows (GridPass)."""
        B, L = input_ids.shape
        attn = _TextAttention(self.model.cfg.n_layers, lengths, doc_ids)
        pos = torch.arange(L, device=input_ids.device).expand(B, L)
        h = self.model(inputs_embeds=self.embed(input_ids), position_ids=pos, attn=attn, return_hidden=True)
        return TextPass(h, attn.k, attn.v)

    # ---- where to think (where.py) ----

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

    # ---- phase 1: rollout ----

    @torch.no_grad()
    def rollout(self, input_ids, attention_mask=None, generator=None, doc_ids=None,
                selection: Optional[Selection] = None) -> torch.Tensor:
        """Sample n thoughts at every thinking position. -> thoughts (B, n, P, T-3) long (P = L unless
        thought.where chooses positions: then at `selection`, else at the ones it chooses, which `_rollout`
        returns with the thoughts)."""
        return self._rollout(input_ids, attention_mask, generator, doc_ids, selection)[0]

    @torch.no_grad()
    def _rollout(self, input_ids, attention_mask=None, generator=None, doc_ids=None, selection=None) -> Rollout:
        return self._rollout_lengths(input_ids, self._check_input(input_ids, attention_mask), generator, doc_ids,
                                     selection)

    def _rollout_lengths(self, input_ids, lengths, generator=None, doc_ids=None, selection=None,
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
        attn = _RolloutAttention(mcfg.n_layers, B, mcfg.n_kv_heads, n, n_sampled, L, mcfg.head_dim, lengths,
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

    # ---- phase 2: the learning pass ----

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

    # ---- the objective: score -> objective (objective.py) -> metrics ----

    def losses(self, hidden, input_ids, thoughts, attention_mask=None, doc_ids=None,
               selection: Optional[Selection] = None, base: Optional[BaseScore] = None,
               buf: Optional[LogitsBuffer] = None) -> ThoughtOutput:
        """NLL + REINFORCE from the grid's hidden states (B, R, L, d), or GridStates (of the subset grid of
        `selection`'s thinking positions). The objective's pure functions (objective.py, chosen by
        cfg.objective) give the weights; `score_*` apply them (cfg.scoring). `base`: the no-thought term,
        already scored (`score_base`); `buf`, the logits scratch to reuse."""
        cfg, obj = self.cfg, get_objective(self.cfg.objective)
        states = hidden if isinstance(hidden, GridStates) else GridStates(hidden[:, 0], hidden[:, 1:], None)
        positions = states.positions
        B, L, d = states.text.shape
        grid = self.grid(thoughts.shape[1])
        lengths = None if attention_mask is None else attention_mask.long().sum(-1)
        acc = torch.float64 if states.text.dtype == torch.float64 else torch.float32
        device = states.text.device
        scope = obj.scope(grid, B, L, lengths, doc_ids, cfg, device) if positions is None else \
            obj.scope(grid, B, L, lengths, doc_ids, cfg, device, positions, selection.valid)
        coef_base, coef_talk = obj.nll_coefficients(scope, grid.n, cfg, acc)
        buf = LogitsBuffer() if buf is None else buf  # the logits scratch of both scoring calls
        head_grad = WeightGradSum() if base is None else base.head_grad  # one LM-head weight gradient (-nll, policy)
        if cfg.nll_weight != 1.0:
            coef_base, coef_talk = cfg.nll_weight * coef_base, cfg.nll_weight * coef_talk
        unmixed = (cfg.reward_from or obj.reward_from) == "unmixed"
        talk = self.score_talk(states, input_ids, grid, coef_base, coef_talk, buf, base, head_grad, unmixed)
        ce_none = talk.ce_base if self.ema is None else self.teacher_ce(input_ids, lengths, doc_ids, buf)
        reward = obj.rewards(ce_none, talk.ce_thought if unmixed else talk.ce_talk, scope, cfg)
        adv = obj.advantages(reward, scope, cfg)
        if grid.n_sampled > 0:
            policy_loss, logp = self.score_thoughts(states, thoughts, grid,
                                                    obj.policy_coefficients(adv, scope, cfg, grid.n_sampled), buf,
                                                    head_grad)
        else:
            policy_loss, logp = states.text.new_zeros(()), None
        loss = talk.nll + cfg.policy_weight * policy_loss + head_grad.attach(self.model.lm_head_weight)
        thought_ok = at_positions(grid.target_ok(L, -1, lengths, None, device).expand(B, L), positions)  # real positions
        if positions is not None:
            thought_ok = thought_ok & selection.valid
        m = objective_metrics(loss, talk.nll, policy_loss, talk.ce_base, talk.ce_talk, reward, adv, talk.mix_weight,
                              scope, cfg, thoughts, thought_ok[:, None].expand(B, grid.n, -1), self.model.cfg.vocab_size)
        if self.gate is not None and positions is not None:  # the gate learns the reward it predicts
            gate_mse = self.gate_loss(states.text, positions, reward, scope.scorable)
            loss = loss + cfg.gate_loss_weight * gate_mse
            m["thought/gate_mse"] = gate_mse.detach()
        return ThoughtOutput(loss=loss, nll=talk.nll.detach(), policy_loss=policy_loss.detach(),
                             reward=m["thought/reward_mean"], mix_weight=m["thought/mix_weight_mean"],
                             thoughts=thoughts, metrics=m, ce_base=talk.ce_base,
                             ce_talk=talk.ce_talk.permute(1, 2, 0, 3), mix_weights=talk.mix_weight.permute(1, 2, 0, 3),
                             rewards=reward, advantages=adv, thought_logprobs=logp, selection=selection)

    def gate_loss(self, h_text, positions, reward, scorable) -> torch.Tensor:
        """Squared error of the gate's prediction at the thinking positions against the mean reward of the n
        thoughts there, over the scorable ones. h_text (B, L, d) (detached: the gate does not train the
        model), positions (B, P), reward (B, n, P), scorable (B, P)."""
        pred = self.gate(at_positions(h_text.detach(), positions))  # (B, P)
        err = (pred - reward.detach().mean(1).float()) ** 2
        return (err * scorable).sum() / scorable.sum().clamp_min(1)

    def prescore_base(self, selection: Optional[Selection] = None) -> bool:
        """Whether the learning pass scores the base term before choosing the positions (where = entropy, none
        given): its LM-head pass then gives the entropies, and the talk call rescores the thinking positions'
        base rows for their change of weight. That costs three vocabulary matmuls per thinking position
        against the one per position of a separate entropy pass, so it is taken below a third of them (and
        with a threshold, whose share is not known in advance)."""
        cfg = self.cfg
        return cfg.where == "entropy" and selection is None and (cfg.think_threshold is not None
                                                                  or 3 * cfg.think_fraction < 1)

    def score_base(self, h_text, input_ids, lengths=None, doc_ids=None,
                   buf: Optional[LogitsBuffer] = None) -> BaseScore:
        """The no-thought term before any position is chosen, with the base next-token entropies from the same
        LM-head pass (thought.where = entropy's scores): weighted by the objective's base weights for a step
        in which no position thinks. h_text (B, L, d)."""
        cfg, obj = self.cfg, get_objective(self.cfg.objective)
        B, L = input_ids.shape
        grid = self.grid()
        acc = torch.float64 if h_text.dtype == torch.float64 else torch.float32
        none = input_ids.new_zeros(B, 0)
        scope = obj.scope(grid, B, L, lengths, doc_ids, cfg, input_ids.device, none, none.bool())
        coef, _ = obj.nll_coefficients(scope, grid.n, cfg, acc)
        head_grad = WeightGradSum()  # -weighted enters the loss (through the NLL), and losses() attaches it
        weighted, logp, entropy = self._logprob_sum(h_text.reshape(B * L, -1), grid.target(input_ids, 0).flatten(),
                                                    coef.flatten(), buf=buf, entropy=True, head_grad=head_grad,
                                                    scale=-1.0)
        return BaseScore(weighted, -logp.view(B, L), coef, entropy.view(B, L), head_grad)

    def score_talk(self, hidden, input_ids, grid: ThoughtGrid, coef_base, coef_talk,
                   buf: Optional[LogitsBuffer] = None, base: Optional[BaseScore] = None,
                   head_grad: Optional[WeightGradSum] = None, unmixed: bool = False) -> "TalkScores":
        """The no-thought prediction of x_{i+1} at every position and the K mixed talk predictions of x_{i+k+1}
        (talk step k) at the thinking positions, all in one LM-head pass: -nll = sum coef * log p.
        hidden: GridStates; coef_base (B, L), coef_talk (K, B, n, P). With `base` scored already, the pass
        takes only the change of its weights, at the thinking positions (coef_base - base.coef). With
        `unmixed`, the same pass also scores the talk rows' own predictions (weight 0: for the reward only)."""
        h0, positions = hidden.text, hidden.positions  # (B, L, d)
        B, L, d = h0.shape
        K, n, P = grid.K, grid.n, hidden.rows.shape[2]
        h_mix, ws, h_own = [], [], []
        for k in range(K):
            h_base = at_positions(grid.ahead(h0, k), positions)[:, None].expand(B, n, P, d)
            h_own.append(grid.at_step(hidden, grid.talk_step(k)))
            hm, w = self.mix(h_base, h_own[-1])
            h_mix.append(hm)
            ws.append(w)
        targets = torch.stack([at_positions(grid.target(input_ids, k), positions) for k in range(K)])  # (K, B, P)
        if base is None:
            h_first, t_first, c_first = h0, grid.target(input_ids, 0), coef_base
        else:
            h_first, t_first = at_positions(h0, positions), targets[0]
            c_first = at_positions(coef_base - base.coef, positions)
        t_talk = targets[:, :, None].expand(K, B, n, P).flatten()
        tgt = [t_first.flatten(), t_talk]
        h_all = [h_first.reshape(-1, d), torch.stack(h_mix).view(-1, d)]
        coef = [c_first.flatten(), coef_talk.flatten()]
        if unmixed:
            tgt.append(t_talk)
            h_all.append(torch.stack(h_own).reshape(-1, d))
            coef.append(torch.zeros_like(coef[1]))
        weighted, logp = self._logprob_sum(torch.cat(h_all), torch.cat(tgt), torch.cat(coef), buf=buf,
                                           head_grad=head_grad, scale=-1.0)
        first, talk = t_first.numel(), t_talk.numel()
        ce_talk = -logp[first:first + talk].view(K, B, n, P)
        ce_own = -logp[first + talk:].view(K, B, n, P) if unmixed else None
        if base is None:
            return TalkScores(-weighted, -logp[:first].view(B, L), ce_talk, torch.stack(ws), ce_own)
        return TalkScores(-(base.weighted + weighted), base.ce, ce_talk, torch.stack(ws), ce_own)

    @torch.no_grad()
    def teacher_ce(self, input_ids, lengths=None, doc_ids=None, buf: Optional[LogitsBuffer] = None) -> torch.Tensor:
        """The EMA teacher's CE of x_{i+1} at every position (B, L): the RLP reward's no-thought counterfactual."""
        B, L = input_ids.shape
        attn = _TextAttention(self.model.cfg.n_layers, lengths, doc_ids)
        pos = torch.arange(L, device=input_ids.device).expand(B, L)
        weights = self.ema.weights(self.model)  # cast once (16-bit models): the forward and the head share it
        h = torch.func.functional_call(self.model, weights, (input_ids,), dict(position_ids=pos, attn=attn,
                                                                                return_hidden=True), tie_weights=True)
        head = weights["output.weight" if self.model.output is not None else "tok_embeddings.weight"]
        targets = ThoughtGrid.target(input_ids, 0)
        _, logp = linear_logprob_sum(h.reshape(B * L, -1), head, targets.flatten(),
                                     torch.zeros(B * L, device=h.device, dtype=torch.float32), buf=buf)
        return -logp.view(B, L)

    def score_thoughts(self, hidden, thoughts, grid: ThoughtGrid, coef, buf: Optional[LogitsBuffer] = None,
                       head_grad: Optional[WeightGradSum] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-policy = sum coef * tempered log pi(t_m), t_m predicted at step m. -> (policy loss, log pi
        (B, n, P, T-3), detached, NaN where coef is 0: a row without weight is not computed)."""
        weighted, logp = self._logprob_sum(grid.sampled_rows(hidden), thoughts, coef, self.cfg.policy_temperature,
                                           skip_zero=True, buf=buf, head_grad=head_grad, scale=-self.cfg.policy_weight)
        return -weighted, logp

    def _logprob_sum(self, h, targets, coef, temperature: float = 1.0, skip_zero: bool = False,
                     buf: Optional[LogitsBuffer] = None, entropy: bool = False,
                     head_grad: Optional[WeightGradSum] = None, scale: float = 1.0):
        """(sum coef * log softmax(h W^T / temperature)[targets], log-probs detached (NaN where coef is 0 with
        skip_zero)[, with `entropy` the rows' entropies (NaN where coef is 0)]): the fused kernel (its logits in
        `buf`; the LM head's weight gradient of `scale` x the sum added to `head_grad`, which the caller attaches
        to the loss), or (cfg.scoring = "plain") full logits and autograd, to prototype against."""
        W = self.model.lm_head_weight
        if self.cfg.scoring == "fused":
            return linear_logprob_sum(h, W, targets, coef, temperature, skip_zero=skip_zero, buf=buf, entropy=entropy,
                                      dw_into=head_grad, dw_scale=scale)
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        z = torch.log_softmax(F.linear(h, W).to(acc) / temperature, -1)
        logp = z.gather(-1, targets[..., None]).squeeze(-1)
        weighted = (coef.to(acc) * logp).sum()
        logp = logp.detach()
        out = (weighted, logp.masked_fill(coef == 0, float("nan")) if skip_zero else logp)
        if entropy:
            out += (-(z.exp() * z).sum(-1).detach().masked_fill(coef == 0, float("nan")),)
        return out

    @contextlib.contextmanager
    def overridden(self, **changes):
        """Temporarily run with some ThoughtConfig fields changed (e.g. n_ahead_talk=1 for evaluation)."""
        saved = self.cfg
        self.cfg = dataclasses.replace(saved, **changes)
        try:
            yield self
        finally:
            self.cfg = saved

    @torch.no_grad()
    def next_token_logits(self, input_ids, attention_mask=None, generator=None, n_thoughts: int = 1,
                          thoughts: Optional[torch.Tensor] = None,
                          selection: Optional[Selection] = None) -> "NextTokenLogits":
        """The prediction of x_{i+1} at every position, with and without a thought (the paper's
        evaluation: K = 1, the mixed logits at the <end> step). -> NextTokenLogits with base (B, L, V),
        mixed (B, n, P, V), mix_weight (B, n, P), thoughts (B, n, P, T-3) and, with thought.where, the
        selection of the P thinking positions (chosen here unless given; P = L when every position thinks)."""
        h = self.next_token_states(input_ids, attention_mask, generator, n_thoughts, thoughts, selection)
        return h._replace(base=self.model.head(h.base), mixed=self.model.head(h.mixed))

    @torch.no_grad()
    def next_token_hidden(self, input_ids, attention_mask=None, generator=None, n_thoughts: int = 1,
                          thoughts: Optional[torch.Tensor] = None, doc_ids=None):
        """`next_token_logits` before the LM head, at every position: -> (base hidden (B, L, d), mixed hidden
        (B, n, L, d) (the base one where thought.where chose no thought), mix weight (B, n, L), thoughts
        (B, n, L, T-3)); distillation (distill.py) scores these in chunks."""
        h = self.next_token_states(input_ids, attention_mask, generator, n_thoughts, thoughts, doc_ids=doc_ids).full()
        return h.base, h.mixed, h.mix_weight, h.thoughts

    @torch.no_grad()
    def next_token_states(self, input_ids, attention_mask=None, generator=None, n_thoughts: int = 1,
                          thoughts: Optional[torch.Tensor] = None, selection: Optional[Selection] = None,
                          doc_ids=None) -> "NextTokenLogits":
        """`next_token_logits` with final hidden states (..., d) in place of the logits."""
        with self.overridden(n_ahead_talk=1, n_thoughts=n_thoughts):
            lengths = self._check_input(input_ids, attention_mask)
            if thoughts is None:
                thoughts, _, selection = self._rollout_lengths(input_ids, lengths, generator, doc_ids, selection)
            positions = None if selection is None else selection.positions
            if positions is None:
                h = self.learning_pass.hidden(self, input_ids, thoughts, lengths, doc_ids)
                h = GridStates(h[:, 0], h[:, 1:], None)
            else:
                h = self.learning_pass.hidden(self, input_ids, thoughts, lengths, doc_ids, positions)
            grid = self.grid(n_thoughts)
            h0, h_end = h.text, grid.at_step(h, grid.talk_step(0))
            h_mix, w = self.mix(at_positions(h0, positions)[:, None].expand_as(h_end), h_end)
            return NextTokenLogits(h0, h_mix, w, thoughts, selection)

    @torch.no_grad()
    def think(self, feed, h_base: torch.Tensor, position: torch.Tensor, generator=None,
              temperature: Optional[float] = None, thoughts: Optional[torch.Tensor] = None):
        """Think at the last position of a cached text, for P rows at once (generation and evaluation).

        feed(tokens (P,), position_ids (P,)) -> hidden (P, d) runs one single-token step on a K/V cache that
        holds the text up to each row's thinking position `position` (P,); h_base (P, d) is the text's hidden
        state there. Feeds <start>, t_1..t_{T-3} (sampled at `temperature`, default the training one, or
        taken from `thoughts` (P, T-3)) and <end> at grid steps 1..T-1 (positions position + s), then mixes.
        -> (mixed logits (P, V), mix weight (P,), the thought (P, T-3)). The caller drops the thought's K/V."""
        grid = ThoughtGrid(self.cfg.n_ahead, 1)
        temperature = self.cfg.gumbel_temperature if temperature is None else temperature
        token = torch.full_like(position, self.start_token_id)
        sampled = []
        for s in range(grid.START_STEP, grid.end_step + 1):
            h = feed(token, grid.position_ids(s, position))
            if s <= grid.n_sampled:  # step s predicts t_s
                token = thoughts[:, s - 1].to(position.device) if thoughts is not None else \
                    sample_categorical(self.model.head(h).float(), temperature, generator)
                sampled.append(token)
            else:
                token = torch.full_like(position, self.end_token_id)
        h_mix, w = self.mix(h_base, h)  # h: the <end> step's output
        th = torch.stack(sampled, -1) if sampled else position.new_zeros(position.shape[0], 0)
        return self.model.head(h_mix), w, th

    def decode_thought(self, thoughts: torch.Tensor, b: int, copy: int, position: int) -> str:
        """The thought sampled after position `position` of sequence b, copy `copy`, as text."""
        if self.tokenizer is None:
            raise ValueError("decode_thought needs a tokenizer")
        return self.tokenizer.decode(thoughts[b, copy, position].tolist())
