"""A learning regression test: the learn_to_think recipe scaled down until it runs in well under a minute.

A 1-layer model, pretrained as a plain LM on the reasoning corpus, writes lookup chains after the chain's
opening mark but cannot answer a direct 3-hop query in one position. A short Quiet-STaR run from it must
learn to use its thoughts: afterwards the prediction after a thought beats the same model's prediction
without one on held-out maps by a wide margin, and the sampled thoughts still hold the answer. It fails when
the thought stops reaching the prediction: a talk head cut off from the gradient, a grid or attention mask
that hides the thought, thought embeddings that no longer start at the chain mark, a broken mixing.

What it does not catch: at this scale the pretrained model already writes correct chains, so the gain is
the talk head learning to use them, and 60 steps of REINFORCE at weight 1 move the thoughts too little to
measure (a zeroed or sign-flipped policy term passes here). tests/test_learning_policy.py is the learning
test of the policy term; its sign and scale are also pinned by the objective tests (tests/test_objective.py,
tests/test_rlp.py) and the gradients against the reference (tests/test_thinker.py).
"""

import dataclasses

import pytest
import torch

from quietstar.config import OptimConfig
from quietstar.data import ListDocs, SequenceStream
from quietstar.model import ModelConfig, Transformer
from quietstar.optim import build_optimizer
from quietstar.methods.plain.model import PlainLM, reset_thought_embeddings
from quietstar.reasoning import ReasoningConfig, chain_open_ids, make_documents, score_answers
from quietstar.tokenizer import ByteTokenizer
from quietstar.methods.quietstar.thinker import QuietStar
from quietstar.methods.quietstar.config import ThoughtConfig

CORPUS = ReasoningConfig(n_symbols=5, max_hops=3, n_queries=5, eval_docs=48)
THOUGHT = ThoughtConfig(n_ahead=7, n_ahead_talk=1, n_thoughts=2, policy_weight=1.0, policy_temperature=1.0,
                        init_token="-", end_init_token=".", embedding_scale=1.0)
MODEL = dict(n_layers=1, dim=128, n_heads=4, n_kv_heads=4, intermediate_size=256)
HARDEST = str(CORPUS.max_hops)
PRETRAIN_STEPS = 1000
QUIETSTAR_STEPS = 60


def _train(model, docs, steps, optim, seed, batch_size, seq_len=64):
    stream = SequenceStream(ListDocs([d.text for d in docs], seed), model.tokenizer, seq_len, "crop", seed, batch_size)
    opt, sched = build_optimizer(model, optim, steps)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        b = stream.next_batch()
        model(b.input_ids, attention_mask=b.attention_mask, generator=g).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)


def _answer_in_thought(result) -> float:
    """Share of the sampled thoughts before a hardest-level answer that contain the answer."""
    ex = result["examples"]
    return sum(e["answer"] in e["thought"] for e in ex) / max(1, len(ex))


def pretrain(corpus: ReasoningConfig, steps: int, threads: int):
    """A plain LM pretrained on the corpus from a seeded random init. -> (state dict, training documents,
    held-out documents)."""
    before = torch.get_num_threads()
    torch.set_num_threads(min(threads, before))
    try:
        torch.manual_seed(0)
        tok = ByteTokenizer()
        lm = PlainLM(Transformer(ModelConfig.from_preset("tiny", **MODEL)), tok, dataclasses.replace(THOUGHT, enabled=False))
        docs = make_documents(corpus, 4000, seed=0)
        _train(lm, docs, steps, OptimConfig(lr=1e-3, beta2=0.95, warmup_steps=50, weight_decay=0.0,
                                            schedule="cosine"), 0, 16)
        return lm.state_dict(), docs, make_documents(corpus, corpus.eval_docs, seed=0, split="eval")
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pretrained():
    return pretrain(CORPUS, PRETRAIN_STEPS, threads=2)


def learn(pretrained, thought: ThoughtConfig):
    """A short Quiet-STaR run from the pretrained model. -> (scores before, scores after) on the held-out split."""
    state, docs, held_out = pretrained
    torch.manual_seed(1)
    tok = ByteTokenizer()
    qs = QuietStar(Transformer(ModelConfig.from_preset("tiny", **MODEL)), tok, thought)
    qs.load_state_dict(state)
    reset_thought_embeddings(qs)  # as a Quiet-STaR run from a plain-LM checkpoint starts
    score = lambda: score_answers(qs, held_out, tok, batch_size=48, seed=0, n_examples=400,
                                  without=chain_open_ids(CORPUS, tok))
    before = score()
    _train(qs, docs, QUIETSTAR_STEPS, OptimConfig(lr=1e-4, talk_head_lr_mult=30.0, warmup_steps=5,
                                                  weight_decay=0.0), 1, 8)
    return before, score()


def learned_to_think(before, after) -> list:
    """The criteria of learning, as the list of those that failed (empty: it learned)."""
    nll, acc = after["thought"]["nll"][HARDEST], after["thought"]["acc"][HARDEST]
    failed = []
    if not nll < 0.6 * after["no_thought"]["nll"][HARDEST]:
        failed.append(f"NLL after a thought {nll:.3f} is not < 0.6 x without ({after['no_thought']['nll'][HARDEST]:.3f})")
    if not acc > after["no_thought"]["acc"][HARDEST] + 0.2:
        failed.append(f"accuracy after a thought {acc:.3f} is not 0.2 above without "
                      f"({after['no_thought']['acc'][HARDEST]:.3f})")
    if not _answer_in_thought(after) >= 0.8:
        failed.append(f"only {_answer_in_thought(after):.3f} of the thoughts hold the answer")
    return failed


def test_quietstar_learns_to_use_its_thoughts(pretrained):
    before, after = learn(pretrained, THOUGHT)
    # the pretrained model does the serial steps in a chain but not in one position
    assert before["no_thought"]["acc"][HARDEST] < 0.5
    assert learned_to_think(before, after) == []
