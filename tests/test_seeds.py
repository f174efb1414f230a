"""Derived seeds (quietstar/seeds.py): every seed a recipe derives from train.seed is a valid generator seed for
any train.seed in [0, 2**63 - 1], distinct parts give distinct seeds, and CPO's tree search, which multiplied the
run seed and overflowed torch's generator for train.seed above about 180,000, runs with the largest seed."""

import dataclasses

import numpy as np
import pytest
import torch

from quietstar.seeds import MAX_SEED, derive_seed

RUN_SEEDS = (0, 20261206, 2**63 - 1)


def test_a_derived_seed_is_a_stable_63_bit_hash_of_its_parts():
    assert derive_seed(0, "explicit collect", 1) == derive_seed(0, "explicit collect", 1)
    # pinned: a derived seed is part of a run's provenance and must not move between machines or versions
    assert derive_seed(0, "explicit collect", 1) == 636646431655211979
    assert derive_seed(2**63 - 1, "cpo question", 7) == 3138781074672829539
    # length-prefixed, typed parts: neither regrouping the text nor an int for its digits collides
    assert derive_seed(5, "ab", "c") != derive_seed(5, "a", "bc")
    assert derive_seed(5, 1) != derive_seed(5, "1")
    assert derive_seed(5, "round", 1) != derive_seed(5, "round", 1, 0)
    # a sum would alias (seed s + 1, round 0) with (seed s, round 1); a hash does not
    assert derive_seed(6, "round", 0) != derive_seed(5, "round", 1)
    with pytest.raises(TypeError, match="int or a str"):
        derive_seed(0, 1.5)
    with pytest.raises(TypeError, match="int or a str"):
        derive_seed(0, True)


@pytest.mark.parametrize("run_seed", RUN_SEEDS)
def test_each_recipe_s_seeds_from_any_run_seed_fit_every_generator_and_are_distinct(run_seed):
    from quietstar.data import ListDocs
    from quietstar.methods.explicit.loop import round_seeds
    from quietstar.methods.quietstar.report import EVAL_SEED_OFFSET

    seeds = {}
    for r in range(1, 6):  # the explicit loop: each round's sampling and batch order
        for part, s in round_seeds(run_seed, r).items():
            seeds[("round", r, part)] = s
            # what the methods derive from a round's seed (star, vstar, cpo)
            for name in ("rationalise", "vstar verifier samples"):
                seeds[("round", r, part, name)] = derive_seed(s, name)
            for i in range(20):
                q = derive_seed(s, "cpo question", i)
                seeds[("round", r, part, "cpo", i)] = q
                seeds[("round", r, part, "cpo", i, "call", 1)] = derive_seed(q, "cpo sampler call", 1)
    for name in ("explicit eval sampled", "vstar verifier fit", "vstar best-of-n"):
        seeds[name] = derive_seed(run_seed, name)
    assert all(0 <= s <= MAX_SEED for s in seeds.values())
    assert len(set(seeds.values())) == len(seeds)  # distinct parts: distinct seeds
    # the seeds used as given or with a small offset: the learn_to_think / distill held-out evaluation
    # (train.seed + EVAL_SEED_OFFSET) and the trainer's generator (train.seed + rank)
    used = list(seeds.values()) + [run_seed + EVAL_SEED_OFFSET, run_seed + 1023]
    for s in used:
        torch.Generator().manual_seed(s)
        np.random.default_rng(s)
    # the document order of every recipe's training stage, in two epochs
    docs = ListDocs([str(i) for i in range(10)], run_seed)
    first, second = docs.order(0), docs.order(1)
    assert sorted(first) == sorted(second) == list(range(10))


def test_the_document_order_is_unchanged_for_seeds_that_fitted():
    from quietstar.data import ListDocs

    for seed, epoch in ((0, 0), (42, 3), (20261206, 1)):
        want = torch.randperm(7, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
        assert ListDocs([str(i) for i in range(7)], seed).order(epoch) == want


def test_train_seed_is_bounded_by_the_largest_derivable_seed():
    from quietstar.config import ConfigError, LoopConfig

    assert LoopConfig(seed=2**63 - 1).seed == MAX_SEED
    with pytest.raises(ConfigError, match=r"train\.seed must be at most 2\*\*63 - 1"):
        LoopConfig(seed=2**63)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("run_seed", RUN_SEEDS)
def test_cpo_searches_with_any_run_seed(run_seed):
    from test_explicit import Q1, method_ctx, tiny_qs

    from quietstar.methods.explicit.dataset import Skips
    from quietstar.methods.explicit.loop import round_seeds
    from quietstar.methods.explicit.preference import collect_cpo

    qs = tiny_qs()
    ctx = method_ctx("cpo", temperature=1.0, beam=1, proposals=2, self_eval="likelihood")
    ctx.rules["cot"] = dataclasses.replace(ctx.rules["cot"], max_rationale=3)
    # the round's seed as the loop derives it, and the run seed itself: before hashing, seed * 100003 * 1000003
    # overflowed manual_seed's 64 bits from the first sampler call on
    for seed in (round_seeds(run_seed, 1)["collect"], run_seed):
        out, stats = collect_cpo(ctx, qs, [Q1], 1, seed, Skips())
        assert stats["nodes"] > 0 and stats["pairs"] == len(out)
