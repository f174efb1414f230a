"""The Quiet-STaR objective as pure functions of per-token cross-entropies and masks: no model, no LM head.

One training step's loss is built in three stages (docs/architecture.md, "The objective"):

1. score (thinker.py): the hidden states of the grid become per-token log-probabilities, summed with
   weights that this module computes. The weights are known before the LM head runs, so the fused kernel
   (linear_ce.py) computes each sum and its gradient in one pass;
2. objective (here): from the masks and the config, the NLL coefficients; from the scored CEs, the
   rewards, the advantages and the policy coefficients;
3. metrics (here): 0-dim tensors; train.py turns them into numbers once per `train.log_every` steps.

The official objective (the default, `thought.objective=official`):

    nll    = base_loss_weight * mean CE_base + (1 - base_loss_weight) * mean_k mean CE_talk_k
    R(i)   = sum_k [CE_base(x_{i+k+1}) - CE_talk_k(i)]                  (on scorable positions)
    A(i)   = max(0, R(i) - mean over the n copies of R(i))             (detached)
    policy = mean over counted positions of -A(i) * mean_m log pi(t_m)  (t_m sampled, tempered log pi)
    loss   = nll + policy_weight * policy

RLP (`thought.objective=rlp`; "Reinforcement as a Pretraining Objective", arXiv 2510.01265) rewards a
thought by its effect on the prediction made *from the thought itself*, not from the mixed one, so the reward
does not wait for the talk head to trust the thoughts (with w near 0 the official reward is near 0 for every
thought, and nothing moves them):

    R(c)   = sum_k [CE_none(x_{i+k+1}) - CE_thought_k(i, c)]    CE_thought: the LM head on the thought row itself
                                                                CE_none: the base pass (detached) or, with
                                                                thought.ema_decay, an EMA teacher's
    A(c)   = G/(G-1) * (R(c) - mean over the G thoughts of R)   (unclamped unless clamp_negative_advantage)
    policy = mean over counted positions of -A(c) * mean_m log pi(t_m)

RLP's clipped surrogate min(rho A, clip(rho, 1-eps, 1+eps) A) has rho = 1 with one optimizer update per
rollout, as here: its gradient is then A grad log pi, the policy term above (docs/learning.md says why more
updates per rollout do not pay here). CE_none is the same for every thought of a position, so it cancels in A: it sets the reward's level (what
the logs show), not the gradient. The G/(G-1) factor makes A an unbiased leave-one-out advantage: R(c) minus
the mean of the *other* G-1 thoughts. `thought.reward_from=unmixed` alone gives the official objective the
same unmixed reward (the one-flag ablation), and `thought.nll_weight=0` drops the NLL terms as RLP does.

A new objective (a different baseline, a normalised advantage, an entropy bonus) replaces one of the
functions of `Objective` and is registered under a name, which `ThoughtConfig.objective` then selects:

    OBJECTIVES["normalised"] = dataclasses.replace(OFFICIAL, advantages=my_normalised_advantages)

Shapes: K talk steps, B sequences, n thoughts per position, L positions, T-3 sampled thought tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch

from quietstar.masks import ThoughtGrid


class Scope(NamedTuple):
    """Which targets and positions the objective may use. P = L when every position thinks; with
    thought.where, P thinking positions per sequence (their talk predictions, rewards and policy terms are
    indexed by slot p = 0..P-1, at text position positions[b, p]), and every position trains as plain NLL."""

    ok: torch.Tensor  # (K, B, P) bool: x_{i+k+1} is a real token of thinking position i's document
    scorable: torch.Tensor  # (B, P) bool: the thinking positions that get a reward
    policy_count: torch.Tensor  # 0-dim: the policy mean's denominator (over B, n and thinking positions)
    ok_text: Optional[torch.Tensor] = None  # (K, B, L) ok at every position (None: ok itself, P = L)
    positions: Optional[torch.Tensor] = None  # (B, P) the thinking positions (None: all of them)
    thinking: Optional[torch.Tensor] = None  # (B, L) bool: the position thinks (None: all)

    @property
    def text_ok(self) -> torch.Tensor:
        """(K, B, L): the targets' validity at every text position."""
        return self.ok if self.ok_text is None else self.ok_text


def scope(grid: ThoughtGrid, B: int, L: int, lengths: Optional[torch.Tensor], doc_ids: Optional[torch.Tensor],
          cfg, device=None, positions: Optional[torch.Tensor] = None, valid: Optional[torch.Tensor] = None) -> Scope:
    """Targets stop at padding and at the end of the document (packed rows). A position is scorable when all
    K of its targets are real; positions with only some of them are dropped (the official code instead
    rewards them with the targets that are real: `reward_drop_last_position`, below). With thinking
    positions (B, P) (thought.where), only those are scorable, and only their slots marked `valid` (B, P)."""
    K, n = grid.K, grid.n
    ok = torch.stack([grid.target_ok(L, k, lengths, doc_ids, device) for k in range(K)]).expand(K, B, L)
    if cfg.reward_drop_last_position:  # the official window i <= L-2-K of the padded length, partial targets kept
        scorable = (torch.arange(L, device=device) <= L - 2 - K)[None].expand(B, L)
    else:
        scorable = ok[K - 1]  # x_{i+K} is in i's document, so are x_{i+1}..x_{i+K-1}
    if positions is not None:
        ok_text = ok
        ok = ok.gather(2, positions[None].expand(K, B, -1)) & valid[None]
        scorable = scorable.gather(1, positions) & valid
        thinking = torch.zeros(B, L, dtype=torch.bool, device=device).scatter_(1, positions, valid)
        return Scope(ok, scorable, (scorable & ok[0]).sum().clamp_min(1) * n, ok_text, positions, thinking)
    if cfg.policy_mean_over_padding:  # official: a plain mean over every row and position of the window
        count = torch.tensor(B * n * max(L - 1 - K, 1), device=device)
    else:  # a mean over the scorable positions that have a real target
        count = (scorable & ok[0]).sum().clamp_min(1) * n
    return Scope(ok, scorable, count)


def nll_coefficients(scope: Scope, n: int, cfg, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight of each target's log-probability in -nll: (base (B, L), talk (K, B, n, P)).

    Every position thinks: base_loss_weight * mean CE_base + (1 - base_loss_weight) * mean_k mean CE_talk_k.
    Some positions think: the same per-position mixture at those, plain CE_base at the others; the talk
    terms keep the denominators of the all-positions objective, so the mean is over positions either way.
    A replacement may let the base weights depend on the selection only at the thinking positions: with
    where = entropy the base term is scored before the selection, with the weights of a scope in which no
    position thinks, and only their change at the thinking positions is scored afterwards."""
    K, B, P = scope.ok.shape
    ok = scope.ok[:, :, None].expand(K, B, n, P).to(dtype)
    if scope.positions is None:
        ok0 = ok[0, :, 0]
        talk = (1 - cfg.base_loss_weight) / K * ok / ok.sum((1, 2, 3), keepdim=True).clamp_min(1)
        base = cfg.base_loss_weight * ok0 / ok0.sum().clamp_min(1)
        return base, talk
    ok_text = scope.ok_text.to(dtype)  # (K, B, L)
    talk = (1 - cfg.base_loss_weight) / K * ok / (n * ok_text.sum((1, 2))).clamp_min(1)[:, None, None, None]
    own = torch.where(scope.thinking, cfg.base_loss_weight, 1.0).to(dtype)
    base = own * ok_text[0] / ok_text[0].sum().clamp_min(1)
    return base, talk


def rewards(ce_base: torch.Tensor, ce_talk: torch.Tensor, scope: Scope, cfg) -> torch.Tensor:
    """R(i) = sum_k [CE_base(x_{i+k+1}) - CE_talk_k(i)] over the real targets, on scorable positions, raised to
    cfg.reward_floor where it is below it (None: no floor).
    ce_base (B, L) (no thought, at each position), ce_talk (K, B, n, P) -> (B, n, P)."""
    K = ce_talk.shape[0]
    base = torch.stack([ThoughtGrid.ahead(ce_base, k) for k in range(K)])  # CE_base(i+k): (K, B, L)
    if scope.positions is not None:
        base = base.gather(2, scope.positions[None].expand(K, -1, -1))  # at the thinking positions (K, B, P)
    ok = scope.ok[:, :, None]
    reward = ((base[:, :, None] - ce_talk) * ok).sum(0)
    if cfg.reward_floor is not None:  # a thought worse than this counts as this (0: as no thought)
        reward = reward.clamp_min(cfg.reward_floor)
    return reward * scope.scorable[:, None]


def advantages(reward: torch.Tensor, scope: Scope, cfg) -> torch.Tensor:
    """A = R minus the mean over the n copies (when n > 1), negative values dropped per the config."""
    adv = reward - reward.mean(dim=1, keepdim=True) if reward.shape[1] > 1 else reward
    if cfg.clamp_negative_advantage:
        adv = adv.clamp_min(0)
    return adv * scope.scorable[:, None]


def group_relative_advantages(reward: torch.Tensor, scope: Scope, cfg) -> torch.Tensor:
    """RLP's A = G/(G-1) * (R - mean over the G thoughts of a position): R minus the mean of the other G - 1,
    an unbiased baseline. G = 1 has no group: A = R (the reward against the no-thought counterfactual)."""
    G = reward.shape[1]
    adv = (reward - reward.mean(dim=1, keepdim=True)) * (G / (G - 1)) if G > 1 else reward
    if cfg.clamp_negative_advantage:
        adv = adv.clamp_min(0)
    return adv * scope.scorable[:, None]


def policy_coefficients(adv: torch.Tensor, scope: Scope, cfg, n_sampled: int) -> torch.Tensor:
    """The weight of each sampled token's log pi in -policy: (B, n, P, T-3)."""
    B, n, L = adv.shape
    return (adv / (n_sampled * scope.policy_count))[..., None].expand(B, n, L, n_sampled)


@dataclass(frozen=True)
class Objective:
    """The swappable stages of the objective; replace any of them (dataclasses.replace) and register."""

    scope: Callable = scope
    nll_coefficients: Callable = nll_coefficients
    rewards: Callable = rewards
    advantages: Callable = advantages
    policy_coefficients: Callable = policy_coefficients
    reward_from: str = "mixed"
    """Which prediction after the thought the reward reads (thought.reward_from overrides it): `mixed`, the
    talk head's mix with the base prediction (official), or `unmixed`, the thought row's own prediction."""


OFFICIAL = Objective()
RLP = Objective(advantages=group_relative_advantages, reward_from="unmixed")
OBJECTIVES: dict[str, Objective] = {"official": OFFICIAL, "rlp": RLP}


def register_objective(name: str, objective: Objective) -> None:
    OBJECTIVES[name] = objective


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"ThoughtConfig.objective must be one of {sorted(OBJECTIVES)}, got {name!r}")
    return OBJECTIVES[name]


# --------------------------------------------------------------------------------------------------
# metrics: 0-dim tensors, no host sync


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp_min(1)


def metrics(loss, nll, policy_loss, ce_base, ce_talk, reward, adv, mix_weight, scope: Scope, cfg,
            thoughts: Optional[torch.Tensor] = None, thought_ok: Optional[torch.Tensor] = None,
            vocab: int = 0) -> dict:
    """Diagnostics as 0-dim tensors. ce_talk, mix_weight (K, B, n, P); reward, adv (B, n, P)."""
    ok = scope.ok.to(ce_talk.dtype)
    sc = scope.scorable[:, None].expand_as(reward).float()
    w_mask = sc.expand_as(mix_weight)
    reward_max = reward.masked_fill(sc == 0, float("-inf")).amax()
    m = {"train/loss": loss, "train/nll": nll, "train/nll_base": masked_mean(ce_base, scope.text_ok[0].to(ce_base.dtype)),
         "train/nll_talk": torch.stack([masked_mean(c, o[:, None].expand_as(c)) for c, o in zip(ce_talk, ok)]).mean(),
         "thought/policy_loss": policy_loss, "thought/policy_term": cfg.policy_weight * policy_loss,
         "thought/reward_mean": masked_mean(reward, sc),
         "thought/reward_max": torch.where(sc.any(), reward_max, reward_max.new_zeros(())),
         "thought/reward_std": _group_std(reward, sc),
         "thought/advantage_pos_frac": masked_mean((adv > 0).float(), sc),
         "thought/advantage_neg_frac": masked_mean((adv < 0).float(), sc),
         "thought/mix_weight_mean": masked_mean(mix_weight, w_mask),
         "thought/mix_weight_abs_mean": masked_mean(mix_weight.abs(), w_mask)}
    if scope.thinking is not None:
        m["thought/think_fraction"] = masked_mean(scope.thinking.float(), scope.text_ok[0].float())
    if thoughts is not None and thoughts.shape[-1] > 0:
        m["thought/distinct_token_ratio"] = distinct_ratio(thoughts, thought_ok, vocab)
    return {k: v.detach() for k, v in m.items()}


def _group_std(reward: torch.Tensor, sc: torch.Tensor) -> torch.Tensor:
    """Mean over scorable positions of the standard deviation of R across a position's thoughts (B, n, P):
    the spread the policy gradient learns from (0 with one thought)."""
    if reward.shape[1] < 2:
        return reward.new_zeros(())
    return masked_mean(reward.std(dim=1, unbiased=False)[:, None], sc[:, :1])


def distinct_ratio(thoughts: torch.Tensor, ok: torch.Tensor, vocab: int) -> torch.Tensor:
    """Distinct sampled tokens / sampled tokens, over the positions where `ok` (B, n, L); no host sync."""
    mask = ok[..., None].expand_as(thoughts)
    seen = torch.zeros(vocab, device=thoughts.device).index_add_(0, thoughts.flatten(), mask.flatten().float())
    return (seen > 0).sum() / mask.sum().clamp_min(1)
