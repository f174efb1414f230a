"""Quiet-STaR's settings: `ThoughtConfig` (the `thought` config section, configs/thought/*.yaml), its thought-length
curriculum, and the names `thought.impl` accepts (the learning passes register themselves: thinker.py's `grid`,
sequential.py's `sequential_dense`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional

from quietstar.masks import ThoughtGrid
from quietstar.methods.quietstar.objective import OBJECTIVES
from quietstar.methods.quietstar.where import WHERE

LEARNING_PASSES: dict = {}
"""thought.impl -> the learning pass (an object with `hidden` and `run` as on thinker.GridPass)."""
BUILT_IN_PASSES = ("grid", "sequential_dense")
"""thinker.py's GridPass and sequential.py's SequentialDensePass. They register when thinker.py is imported (as
it is wherever a QuietStar is built); a config names them before that."""


def register_learning_pass(name: str, learning_pass) -> None:
    """Make `learning_pass` (an object with `hidden` and `run` as on GridPass) selectable as cfg.impl = name."""
    LEARNING_PASSES[name] = learning_pass


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
    close_token: Optional[str] = None
    """A text whose first token, when a thought samples it, ends the thought there (None: every thought runs to
    <end>). The prediction after the thought is then read at that token's step, where the text's own closing
    mark is followed by what follows a chain, and the tokens sampled after it carry no policy weight (nothing
    reads them). A short chain is then read at its own end instead of running on inside a fixed-length thought
    (docs/learning.md, "Thoughts that end where the model closes them"). Needs n_ahead_talk = 1: later talk
    steps would attend the whole row."""
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
        passes = sorted({*BUILT_IN_PASSES, *LEARNING_PASSES})
        if self.impl not in passes:
            raise ValueError(f"ThoughtConfig.impl must be one of {passes}, got {self.impl!r}")
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
        if self.close_token is not None and (self.n_ahead_talk != 1 or any(c.n_ahead_talk != 1 for c in self.curriculum)):
            raise ValueError(f"ThoughtConfig.close_token={self.close_token!r} needs n_ahead_talk=1 (the talk steps "
                             f"after <end> would attend the tokens after the close), got {self.n_ahead_talk}")
        if self.close_token == "":
            raise ValueError("ThoughtConfig.close_token must be a non-empty text or null")
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
