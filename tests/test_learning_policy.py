"""A learning regression test for the policy term itself: it fails when the term is zeroed or its sign flipped.

A 1-layer model pretrained on the decoy corpus (half the worked chains are decoys, `a3=-aaaa.d`) has several
habits after `<start>` before a direct answer: the query's chain, which makes the answer a copy, its decoy,
and others. A short run of the RLP objective with the NLL terms off (thought.nll_weight=0: only the policy
term moves the weights), thinking only before the direct answers (a given selection, so that every policy
gradient is about an answer), must raise the mean reward of the thoughts sampled there on held-out documents.

The measure is what the policy gradient ascends: the mean RLP reward, floored at 0 as in training, of 16
sampled thoughts before every held-out answer, with the same sampling seed before and after (common random
numbers). A zeroed term leaves every weight, and so the measure, exactly as it was; a flipped sign lowers it
by about a nat (checked by hand: docs/learning.md, "The learning regression test").
"""

import dataclasses

import pytest
import torch

from quietstar.tokenizer import ByteTokenizer
from quietstar.model import ModelConfig, Transformer
from quietstar.methods.plain.model import reset_thought_embeddings
from quietstar.reasoning import ReasoningConfig, batches
from quietstar.methods.quietstar.thinker import QuietStar
from quietstar.methods.quietstar.config import ThoughtConfig
from quietstar.methods.quietstar.where import Selection, select
from tests.test_learning import MODEL, pretrain

CORPUS = ReasoningConfig(n_symbols=5, max_hops=3, n_queries=5, eval_docs=48, decoy_share=0.5)
THOUGHT = ThoughtConfig(n_ahead=7, n_ahead_talk=1, n_thoughts=4, policy_weight=1.0, policy_temperature=1.0,
                        init_token="-", end_init_token=".", embedding_scale=1.0, objective="rlp",
                        clamp_negative_advantage=False, reward_floor=0.0, nll_weight=0.0, close_token=".",
                        where="entropy")  # where != all: the subset grid, at the positions the test selects
PRETRAIN_STEPS = 600
POLICY_STEPS = 60
LR = 0.015  # plain SGD: small steps, so that the run follows the gradient's direction (docs/learning.md)
EVAL_THOUGHTS = 16
SEED = 1  # the run's sampling seed


@pytest.fixture(scope="module")
def pretrained_with_decoys():
    return pretrain(CORPUS, PRETRAIN_STEPS, threads=1)  # a dim-128 model: a second thread only adds synchronisation


def before_answers(diff: torch.Tensor) -> Selection:
    """The positions whose next token is a direct answer (difficulty (B, L) > 0), as a thinking selection
    (where.select with a threshold: a sequence with fewer answers fills its slots with other positions, marked
    not valid)."""
    at = torch.zeros_like(diff, dtype=torch.float)
    at[:, :-1] = (diff[:, 1:] > 0).float()
    has_next = torch.ones_like(diff, dtype=torch.bool)
    has_next[:, -1] = False
    return select(at, has_next, fraction=1.0, threshold=0.5)


@torch.no_grad()
def answer_reward(qs, docs, tok) -> float:
    """Mean reward of EVAL_THOUGHTS sampled thoughts before every direct answer of `docs` (fixed sampling seed)."""
    g = torch.Generator().manual_seed(0)
    total, count = 0.0, 0
    with qs.overridden(n_thoughts=EVAL_THOUGHTS):
        for ids, mask, diff, _ in batches(docs, tok, 16):
            n = int((diff > 0).sum())
            out = qs(ids, attention_mask=mask, generator=g, selection=before_answers(diff))
            total += float(out.metrics["thought/reward_mean"]) * n
            count += n
    return total / count


def policy_run(pretrained, policy_weight: float) -> tuple[float, float]:
    state, docs, held_out = pretrained
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(SEED)
        tok = ByteTokenizer()
        qs = QuietStar(Transformer(ModelConfig.from_preset("tiny", **MODEL)), tok,
                       dataclasses.replace(THOUGHT, policy_weight=policy_weight))
        qs.load_state_dict(state)
        reset_thought_embeddings(qs)
        before = answer_reward(qs, held_out, tok)
        opt = torch.optim.SGD(qs.parameters(), lr=LR)
        g = torch.Generator().manual_seed(SEED)
        qs.train()
        train_batches = list(batches(docs, tok, 8))
        for step in range(POLICY_STEPS):
            ids, mask, diff, _ = train_batches[step % len(train_batches)]
            qs(ids, attention_mask=mask, generator=g, selection=before_answers(diff)).loss.backward()
            torch.nn.utils.clip_grad_norm_(qs.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return before, answer_reward(qs, held_out, tok)
    finally:
        torch.set_num_threads(threads)


def test_the_policy_term_raises_the_reward_of_the_thoughts_before_answers(pretrained_with_decoys):
    before, after = policy_run(pretrained_with_decoys, THOUGHT.policy_weight)
    assert after > before + 0.05, f"mean reward of the thoughts before held-out answers: {before:.3f} -> {after:.3f}"
