"""Accuracy versus the number of samples k: verifier best-of-k, majority vote and pass@k, computed exactly.

V-STaR (Hosseini et al. 2024, "V-STaR: Training Verifiers for Self-Taught Reasoners") samples N
solutions per question, scores each with the trained verifier, and answers with the top-scored one. It
reports Best-of-k for k <= N the way pass@k is reported (Chen et al. 2021): not one draw of k samples, but
the expectation over all C(N, k) subsets of size k of the N that were drawn, which is unbiased for
sampling k fresh solutions and has no Monte Carlo noise. Majority vote (self-consistency) is the usual
comparison. Everything here is that expectation, computed exactly with binomial coefficients and
rational arithmetic (fractions.Fraction, turned into a float at the end):

- best_of_k: sort by score; a k-subset's top score lies in the group of solutions tied at score v with
  probability (C(L + g, k) - C(L, k)) / C(N, k), where L solutions score below v and g score v.
  Ties: the subset's tied top solutions are picked uniformly at random, i.e. their correctness is
  averaged; by symmetry a uniform subset of the group is correct on average c/g of the time, c being the
  correct ones in the group. Without ties this is V-STaR's sum over the ranked solutions of
  C(N - i - 1, k - 1) / C(N, k) times the correctness of the i-th best (0-based).
- majority_vote: answers vote; None (no parsable answer) abstains but still takes a slot of the subset;
  a subset with no votes is wrong. Ties between the most-voted answers are split uniformly. Exact via a
  count over how the k slots fall on the answers (see `_majority_counts`).
- pass_at_k: 1 - C(N - c, k) / C(N, k), the standard unbiased estimator of "some sample is correct".

Per-question functions return the curve for k = 1..N as a list (index k - 1); `accuracy_vs_k` averages
questions for k up to the smallest N among them.
"""

from __future__ import annotations

import math
from collections import Counter
from fractions import Fraction
from itertools import groupby
from typing import Hashable, Optional, Sequence


def pass_at_k(correct: Sequence[bool]) -> list[float]:
    """P(at least one of k distinct samples is correct), k = 1..N."""
    n, c = len(correct), sum(map(bool, correct))
    return [1.0 - math.comb(n - c, k) / math.comb(n, k) for k in range(1, n + 1)]


def best_of_k(correct: Sequence[bool], scores: Sequence[float]) -> list[float]:
    """P(the top-scored of k distinct samples is correct), k = 1..N; tied top scores averaged."""
    n = len(correct)
    if len(scores) != n:
        raise ValueError(f"{len(scores)} scores for {n} solutions")
    if any(math.isnan(s) for s in scores):
        raise ValueError("a verifier score is NaN; map unscored solutions to a value first")
    ranked = sorted(zip(scores, map(bool, correct)), key=lambda sc: sc[0])  # ascending score
    groups = []  # (solutions scoring below, group size, correct in group), one per distinct score
    below = 0
    for _, members in groupby(ranked, key=lambda sc: sc[0]):
        flags = [c for _, c in members]
        groups.append((below, len(flags), sum(flags)))
        below += len(flags)
    out = []
    for k in range(1, n + 1):
        acc = sum(Fraction((math.comb(lo + g, k) - math.comb(lo, k)) * c, g) for lo, g, c in groups if c)
        out.append(float(acc / math.comb(n, k)))
    return out


def _majority_counts(sizes: Sequence[int], abstain: int, t: int, n_max: int) -> list[Fraction]:
    """For an answer that gets t votes, given the other answers' solution counts `sizes`, s = 0..n_max:
    W[s] = sum over ways of choosing s more slots (from the other answers and the `abstain` None slots)
    in which no other answer gets more than t votes, each way weighted 1/(1 + the answers tied at t).

    The other answers with fewer than t solutions can never reach t, so with the abstentions they form
    one unconstrained pool of `free` solutions (C(free, u) ways to fill u slots). Only the answers with
    at least t solutions, at most N / t of them, go through the table over (slots used, answers at t),
    which keeps the whole curve at a fraction of a second for N = 128.
    """
    free = abstain + sum(m for m in sizes if m < t)
    table = {(0, 0): 1}  # (slots, answers tied at t) -> number of ways
    for m in sizes:
        if m < t:
            continue
        nxt = Counter()
        for (s, r), ways in table.items():
            for x in range(0, t + 1):
                if s + x > n_max:
                    break
                nxt[(s + x, r + (x == t))] += ways * math.comb(m, x)
        table = nxt
    tied = [Fraction(0)] * (n_max + 1)
    for (s, r), ways in table.items():
        tied[s] += Fraction(ways, r + 1)
    out = [Fraction(0)] * (n_max + 1)
    for s, w in enumerate(tied):
        if w:
            for u in range(0, min(free, n_max - s) + 1):
                out[s + u] += w * math.comb(free, u)
    return out


def majority_vote(answers: Sequence[Optional[Hashable]], correct: Sequence[bool]) -> list[float]:
    """P(the most common answer among k distinct samples is correct), k = 1..N; ties between the top
    answers split uniformly; None answers abstain. All solutions with one answer must agree on correct."""
    n = len(answers)
    if len(correct) != n:
        raise ValueError(f"{len(correct)} correctness flags for {n} answers")
    votes, right = Counter(), {}
    for a, c in zip(answers, correct):
        if a is None:
            continue
        votes[a] += 1
        if right.setdefault(a, bool(c)) != bool(c):
            raise ValueError(f"answer {a!r} is marked both correct and wrong")
    abstain = n - sum(votes.values())
    total = [Fraction(0)] * (n + 1)  # total[k]: the number of winning ways, weighted, over k-subsets
    # A correct answer's chance depends only on its size, so correct answers of one size share a table.
    for m, n_same in Counter(votes[a] for a in votes if right[a]).items():
        others = list(votes.values())
        others.remove(m)  # the other answers: all but one answer of size m
        for t in range(1, m + 1):
            ways = _majority_counts(others, abstain, t, n - t)
            for s, w in enumerate(ways):
                total[s + t] += n_same * math.comb(m, t) * w
    return [float(total[k] / math.comb(n, k)) for k in range(1, n + 1)]


def accuracy_vs_k(correct: Sequence[Sequence[bool]], scores: Sequence[Sequence[float]],
                  answers: Optional[Sequence[Sequence[Optional[Hashable]]]] = None) -> dict[str, list[float]]:
    """Mean over questions of each curve, k = 1..min N: {"best_of_k", "pass_at_k"[, "majority_vote"]}."""
    if not correct or len(scores) != len(correct) or (answers is not None and len(answers) != len(correct)):
        raise ValueError("need one list of correctness flags, scores (and answers) per question")
    K = min(len(c) for c in correct)
    curves = {"best_of_k": [best_of_k(c, s) for c, s in zip(correct, scores)],
              "pass_at_k": [pass_at_k(c) for c in correct]}
    if answers is not None:
        curves["majority_vote"] = [majority_vote(a, c) for a, c in zip(answers, correct)]
    return {name: [sum(q[k] for q in per_q) / len(per_q) for k in range(K)] for name, per_q in curves.items()}
