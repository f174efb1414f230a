"""Where to think (`thought.where`): choose the positions that get a thought before thinking.

Quiet-STaR thinks at every position, so a step costs 1 + n (S - 1) forward tokens per text token. Most
positions gain nothing from a thought (the next token is already certain, or no thought of this length
helps), so three rules choose the thinking positions from the text row alone, before the rollout:

- `all`: every position (the paper, and the default).
- `entropy`: the positions whose base next-token entropy is highest (Reinforcement Pre-Training filters
  its training positions this way; Fast Quiet-STaR's unused "quiet mask" thinks where the base top-1
  probability is <= 0.9).
- `gate`: a small learned head on the base hidden state predicts the thought's reward at that position
  (the mean over the n copies of R(i) = sum_k CE_base - CE_talk_k) and is trained, by squared error, on
  the rewards each step observes at the positions that thought. A share `gate_explore` of the thinking
  slots goes to positions drawn uniformly from the rest, so the gate keeps seeing positions it would skip.

Either takes the top `think_fraction` of the positions that have a next token, or, with `think_threshold`,
those scoring above it. Only the chosen positions get grid rows: the rollout and the learning pass run
1 + n (S - 1) q tokens per text token at a fraction q (masks.grid_coords lays out the subset grid), and
the other positions train as plain next-token prediction. In generation (generate.py) a token is
preceded by a thought where its score passes the threshold or, without one, where it is in the top
`think_fraction` of the scores seen so far in that sequence.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn

from quietstar.linear_ce import LogitsBuffer, lm_head_chunks

WHERE = ("all", "entropy", "gate")


class Selection(NamedTuple):
    """The thinking positions of a batch."""

    positions: torch.Tensor  # (B, P) long, ascending, distinct within a sequence
    valid: torch.Tensor  # (B, P) bool: a chosen position (False: a filler slot when sequences choose fewer)


class ThinkGate(nn.Module):
    """Base hidden state (..., d) -> the predicted reward of thinking there (...): Linear-ReLU-Linear."""

    def __init__(self, dim: int, hidden: Optional[int] = None):
        super().__init__()
        hidden = hidden or max(16, dim // 4)
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        nn.init.normal_(self.net[0].weight, std=dim ** -0.5)
        nn.init.zeros_(self.net[0].bias)
        nn.init.normal_(self.net[2].weight, std=hidden ** -0.5 * 1e-2)  # near-zero predictions at first
        nn.init.zeros_(self.net[2].bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h.to(self.net[0].weight.dtype)).squeeze(-1).float()


ENTROPY_BLOCK_BYTES = 1 << 22  # on CPU, row_entropy's temporaries: 4 MiB of fp32 (32 rows at V = 32k), cache-sized


def row_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax(logits) per row: (..., V) -> (...), fp32. On CPU in blocks of rows, so that
    its (rows, V) temporaries stay small whatever the number of rows."""
    z = logits.reshape(-1, logits.shape[-1])
    rows = z.shape[0] if z.device.type != "cpu" else max(1, ENTROPY_BLOCK_BYTES // (4 * z.shape[1]))
    out = torch.empty(z.shape[0], dtype=torch.float32, device=z.device)
    for r0 in range(0, z.shape[0], rows):
        zc = z[r0:r0 + rows].float()
        lse = torch.logsumexp(zc, -1, keepdim=True)
        out[r0:r0 + rows] = lse.squeeze(-1) - (torch.exp(zc - lse) * zc).sum(-1)
    return out.view(logits.shape[:-1])


def base_entropy(weight: torch.Tensor, h: torch.Tensor, buf: Optional[LogitsBuffer] = None) -> torch.Tensor:
    """Next-token entropy of the base prediction from final hidden states h (B, L, d) and the LM head's weight
    (V, d) -> (B, L), a chunk of rows at a time (no (B L, V) tensor; the logits in `buf`)."""
    flat = h.reshape(-1, h.shape[-1])
    out = torch.empty(flat.shape[0], device=h.device)
    for c0, c1, logits in lm_head_chunks(flat, weight, buf=buf):
        out[c0:c1] = row_entropy(logits)
    return out.view(h.shape[:-1])


def n_thinking(L: int, fraction: float) -> int:
    """Thinking slots per sequence of L positions at `fraction` (at least one)."""
    return max(1, min(L, math.ceil(fraction * L)))


def select(scores: torch.Tensor, eligible: torch.Tensor, fraction: float, threshold: Optional[float] = None,
           explore: float = 0.0, generator: Optional[torch.Generator] = None) -> Selection:
    """The thinking positions from per-position scores (B, L) (higher: think first) among the eligible ones
    (B, L) bool (a position with a next token).

    fraction: P = ceil(fraction L) slots per sequence, filled by the highest scores; threshold instead: the
    positions scoring above it (P = the most any sequence chooses). explore: that share of the slots goes to
    eligible positions drawn uniformly (seeded by `generator`) from those the scores did not choose. Slots a
    sequence cannot fill with eligible positions hold other positions and are marked not valid. Ties break
    towards the earlier position, so the choice is deterministic."""
    B, L = scores.shape
    s = scores.float().masked_fill(~eligible, float("-inf"))
    if threshold is not None:
        chosen = eligible & (scores > threshold)
        P = max(1, int(chosen.sum(1).max()))
        n_explore = 0
    else:
        P = n_thinking(L, fraction)
        chosen = None
        n_explore = min(P, round(explore * P)) if explore > 0 else 0
    # a stable order: score, then the earlier position (a small decreasing offset, in fp64 so that it survives
    # beside scores of any size; ineligible positions last)
    later = 1e-9 * torch.arange(L, device=s.device, dtype=torch.float64)
    order_key = torch.where(torch.isfinite(s), s.double(), -1e30) - later
    top = order_key.topk(P - n_explore, dim=1).indices  # (B, P - n_explore)
    if n_explore:
        u = torch.rand(B, L, generator=generator, device=scores.device)
        taken = torch.zeros(B, L, dtype=torch.bool, device=scores.device).scatter_(1, top, True)
        rand_key = torch.where(eligible & ~taken, u.double(), torch.where(taken, -2.0, -1.0) - later)
        top = torch.cat([top, rand_key.topk(n_explore, dim=1).indices], 1)
    positions = top.sort(dim=1).values
    valid = eligible.gather(1, positions)
    if chosen is not None:
        valid = valid & chosen.gather(1, positions)
    return Selection(positions, valid)


def fires(score: torch.Tensor, history: torch.Tensor, fraction: float, threshold: Optional[float] = None) -> torch.Tensor:
    """Generation: whether a token is preceded by a thought, from its position's score (B,) and the scores
    already seen in each sequence (B, M) (NaN: none). With a threshold: score > threshold. Otherwise: when
    fewer than `fraction` of the scores seen so far are above it (an online top-`fraction` rule; the first
    score always fires)."""
    if threshold is not None:
        return score > threshold
    seen = ~torch.isnan(history)
    above = ((history > score[:, None]) & seen).sum(1)
    return above < fraction * seen.sum(1).clamp_min(1)
