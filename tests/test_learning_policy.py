"""A learning regression test for the policy term itself: it fails when the term is zeroed (a flipped sign
passes too; see below).

A 1-layer model pretrained on the decoy corpus (half the worked chains are decoys, `a3=-aaaa.d`) has two habits
after `<start>`: the chain, which makes the answer a copy, and the decoy, which does not help. A short run of
the RLP objective with the NLL terms off (thought.nll_weight=0: only the policy term moves the weights) must
raise the policy's preference for the chain over the decoy before held-out 3-hop answers, measured without
sampling noise: log pi(chain) - log pi(decoy), both teacher-forced. A zeroed term leaves the weights, and so
the preference, exactly as they were. A flipped sign is NOT caught: checked by hand, the preference rises with
either sign at these settings (docs/learning.md, "The learning regression test").
"""

import dataclasses

import pytest
import torch

from quietstar.config import OptimConfig
from quietstar.tokenizer import ByteTokenizer
from quietstar.model import ModelConfig, Transformer
from quietstar.methods.plain.model import reset_thought_embeddings
from quietstar.reasoning import ReasoningConfig, batches, lookup_chain, query_symbol
from quietstar.methods.quietstar.thinker import QuietStar
from quietstar.methods.quietstar.config import ThoughtConfig
from tests.test_learning import MODEL, _train, pretrain

CORPUS = ReasoningConfig(n_symbols=5, max_hops=3, n_queries=5, eval_docs=48, decoy_share=0.5)
THOUGHT = ThoughtConfig(n_ahead=7, n_ahead_talk=1, n_thoughts=4, policy_weight=1.0, policy_temperature=1.0,
                        init_token="-", end_init_token=".", embedding_scale=1.0, objective="rlp",
                        clamp_negative_advantage=False, reward_floor=0.0, nll_weight=0.0)
PRETRAIN_STEPS = 600
POLICY_STEPS = 60


@pytest.fixture(scope="module")
def pretrained_with_decoys():
    return pretrain(CORPUS, PRETRAIN_STEPS, threads=1)  # a dim-128 model: a second thread only adds synchronisation


@torch.no_grad()
def chain_preference(qs, docs, tok, hops: int = CORPUS.max_hops) -> float:
    """Mean over the direct `hops`-hop answers of log pi(chain) - log pi(decoy) of the thought before them."""
    total, count = 0.0, 0
    for ids, mask, diff, chunk in batches(docs, tok, 48):
        B, L = ids.shape
        at = (diff == hops).nonzero().tolist()
        logp = []
        for which in (0, 1):  # the chain, the decoy
            thoughts = torch.zeros(B, 1, L, THOUGHT.n_ahead - 3, dtype=torch.long)
            for b, p in at:
                query = query_symbol(tok, ids[b], p)
                text = lookup_chain(chunk[b], query, hops, CORPUS)[which]
                thoughts[b, 0, p - 1] = torch.tensor(tok.encode(text, add_bos=False))
            logits = qs.grid_logits(ids, thoughts, mask)  # (B, 1, S, L, V): step m + 1 predicts token m
            lp = sum(torch.log_softmax(logits[:, 0, m + 1].float(), -1).gather(-1, thoughts[:, 0, :, m:m + 1])[..., 0]
                     for m in range(thoughts.shape[-1]))
            logp.append(torch.stack([lp[b, p - 1] for b, p in at]))
        total += float((logp[0] - logp[1]).sum())
        count += len(at)
    return total / count


def policy_run(pretrained, policy_weight: float) -> tuple[float, float]:
    state, docs, held_out = pretrained
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(1)
        tok = ByteTokenizer()
        qs = QuietStar(Transformer(ModelConfig.from_preset("tiny", **MODEL)), tok,
                       dataclasses.replace(THOUGHT, policy_weight=policy_weight))
        qs.load_state_dict(state)
        reset_thought_embeddings(qs)
        before = chain_preference(qs, held_out, tok)
        _train(qs, docs, POLICY_STEPS, OptimConfig(lr=2e-3, warmup_steps=5, weight_decay=0.0), 1, 8)
        return before, chain_preference(qs, held_out, tok)
    finally:
        torch.set_num_threads(threads)


def test_the_policy_term_teaches_the_thoughts_the_chain(pretrained_with_decoys):
    before, after = policy_run(pretrained_with_decoys, THOUGHT.policy_weight)
    assert after > before + 2.0, f"log pi(chain) - log pi(decoy) before 3-hop answers: {before:.3f} -> {after:.3f}"
