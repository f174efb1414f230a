"""The explicit-thinking methods (quietstar/methods/explicit/) on tiny random models: the sampler against one-by-one
sampling, the SFT and DPO losses against hand-written references, each method's choice of examples, the bad
input counted with its reason, and one STaR round end to end through the config entry point."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from quietstar.tokenizer import ByteTokenizer
from quietstar.methods.explicit.dataset import PreferencePair, Skips, SFTExample, make_pair, make_sft, majority
from quietstar.methods.explicit.judge import AnswerCheck, ModelJudge, parse_score
from quietstar.methods.explicit.losses import dpo_loss, fit_dpo, pair_batch, reference_logprobs, sft_loss, token_batch
from quietstar.methods.explicit.sample import Completion, sample_rows
from quietstar.methods.explicit.tasks import Question, StopRule, reasoning_questions
from quietstar.model import ModelConfig, Transformer
from quietstar.reasoning import ReasoningConfig, make_documents
from quietstar.methods.quietstar.thinker import QuietStar
from quietstar.methods.quietstar.config import ThoughtConfig

pytestmark = pytest.mark.usefixtures("one_thread")
TOK = ByteTokenizer()
DOT = TOK.encode(".")[0]


def tiny_qs(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_preset("tiny", dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                                                intermediate_size=64, tie_embeddings=False))
    with torch.no_grad():
        model.output.weight.mul_(4)  # peakier distributions: rows stop at different steps
    qs = QuietStar(model, TOK, ThoughtConfig(n_ahead=3, n_ahead_talk=1, init_token="-", end_init_token="."))
    return qs.to(dtype).eval()


def comp(rationale: str, answer: str, seed=0, stop=" ") -> Completion:
    return Completion(TOK.encode(rationale), TOK.encode(answer), TOK.encode(stop)[0] if stop else None, rationale,
                      answer, len(rationale) + len(answer) + 3, seed, True)


# ---------------------------------------------------------------------------------------------- sampler


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_batch_samples_what_each_row_samples_alone(temperature):
    """Left-padded prompts of different lengths, rows that end their rationale and answer at different steps:
    every row of the batch equals the row sampled alone with its seed."""
    qs = tiny_qs()
    rule = StopRule(rationale_stop=list(range(0, 256, 3)), max_rationale=6, answer_stop=list(range(1, 256, 4)),
                    max_answer=3)
    prompts = [torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (3, 9, 5, 12)]
    seeds = [11, 22, 33, 44]
    batch = sample_rows(qs, TOK, prompts, seeds, rule, temperature)
    alone = [sample_rows(qs, TOK, [p], [s], rule, temperature)[0] for p, s in zip(prompts, seeds)]
    assert batch == alone
    assert len({len(c.rationale_ids) for c in batch}) > 1 or len({len(c.answer_ids) for c in batch}) > 1
    for c in batch:
        assert not set(c.rationale_ids) & set(rule.rationale_stop) and len(c.rationale_ids) <= 6
        assert len(c.answer_ids) <= 3 and qs.start_token_id not in c.answer_ids + c.rationale_ids
        assert c.n_generated == 1 + len(c.rationale_ids) + 1 + len(c.answer_ids) + (c.stop_id is not None)
    if temperature:  # another seed, another sample
        assert sample_rows(qs, TOK, prompts, [s + 1 for s in seeds], rule, temperature) != batch


def test_a_direct_answer_has_no_rationale_and_respects_the_banned_first_token():
    qs = tiny_qs()
    prompts = [[1, 50, 60], [1, 70]]
    free = sample_rows(qs, TOK, prompts, [0, 1], StopRule((), 0, (), 1), 0.0)
    banned = [c.answer_ids[0] for c in free]
    out = sample_rows(qs, TOK, prompts, [0, 1], StopRule((), 0, (), 1, banned), 0.0)
    for f, c in zip(free, out):
        assert c.rationale_ids == [] and c.n_generated == 1 and not c.closed
        assert c.answer_ids[0] not in banned


# ---------------------------------------------------------------------------------------------- tasks


def test_reasoning_questions_are_the_documents_queries_with_their_gold_and_hint():
    cfg = ReasoningConfig()
    docs = make_documents(cfg, 3, seed=5, split="eval")
    qs = reasoning_questions(docs, "eval", cfg.chain_close)
    assert len(qs) == 3 * cfg.n_queries and len({q.id for q in qs}) == len(qs)
    for q in qs:
        doc = docs[int(q.id.split("/")[1])]
        assert q.context == doc.text.split("\n")[0] + "\n"  # the map line
        assert (" " + q.query + q.gold in " " + doc.text.split("\n")[1] + " " or
                f"{q.query}{cfg.chain_open}" in doc.text)  # direct `a3=d`, or worked `a3=-....d`
        assert q.hint == f"{q.query}{q.gold} " and q.hint not in q.prompt() and q.hint in q.prompt(hint=True)
        assert all(e.endswith(" ") and cfg.chain_open in e for e in q.examples)
        assert 1 <= q.difficulty <= cfg.max_hops
    worked = [q for q in qs if f"{q.query}{cfg.chain_open}" in docs[int(q.id.split('/')[1])].text]
    assert worked and all(e.rsplit(cfg.chain_close, 1)[1].strip() for q in worked for e in q.examples)


@pytest.mark.parametrize("family", ["lookup", "state"])
def test_reasoning_questions_carry_the_chain_their_query_writes_and_its_decoy(family):
    from quietstar.reasoning import thought_kind

    for decoy_share, kind in ((0.0, "chain"), (1.0, "decoy")):  # every worked query writes its chain, its decoy
        cfg = ReasoningConfig(families=[family], decoy_share=decoy_share, worked_share=1.0)
        docs = make_documents(cfg, 4, seed=3, split="train")
        qs = reasoning_questions(docs, "train", cfg.chain_close, corpus=cfg)
        assert not any(q.chain for q in reasoning_questions(docs, "train", cfg.chain_close))  # no corpus: unknown
        for q in qs:
            doc = docs[int(q.id.split("/")[1])].text  # the steps as the document wrote them: `a3=-afcd.d`
            steps = doc.split(f"{q.query}{cfg.chain_open}", 1)[1].split(cfg.chain_close, 1)[0]
            assert q.chain[-1] == q.gold and len(q.chain) == len(q.decoy) == len(steps)
            assert thought_kind(steps, q.chain, q.decoy) == kind or q.chain == q.decoy
            assert q.decoy == q.chain[0] * len(q.chain)


# ---------------------------------------------------------------------------------------------- losses


def reference_seq_logprob(qs, prompt, completion, end_target):
    """Full logits of one unpadded row, autograd: sum of log p over its completion tokens."""
    ids = torch.tensor([prompt + completion])
    logp = torch.log_softmax(qs.model(inputs_embeds=qs.embed(ids))[0].double(), -1)  # (L, V)
    tgt = [end_target if t == qs.end_token_id else t for t in completion]
    return sum(logp[len(prompt) - 1 + i, t] for i, t in enumerate(tgt))


def test_sft_reads_only_the_completion_and_scores_end_as_the_stop_mark():
    qs = tiny_qs(dtype=torch.float64)
    prompts = [[1, 40, 41, 42, qs.start_token_id], [1, 50, qs.start_token_id]]
    completions = [[60, 61, qs.end_token_id, 70, 32], [62, qs.end_token_id, 71]]
    b = token_batch(prompts, completions, TOK.pad_id, qs.end_token_id, DOT)
    assert b.weight.tolist() == [[0, 0, 0, 0, 1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 0, 0, 0, 0, 0]]
    assert b.targets[0, 6] == DOT and b.targets[1, 3] == DOT  # the <end> position's target
    loss = sft_loss(qs, b)
    ref = -sum(reference_seq_logprob(qs, p, c, DOT) for p, c in zip(prompts, completions)) / 8
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)
    # the prompt is context only: other prompt tokens change the loss through attention, never as targets
    b2 = token_batch([[1, 40, 41, 99, qs.start_token_id], prompts[1]], completions, TOK.pad_id, qs.end_token_id, DOT)
    assert (b2.weight == b.weight).all() and (b2.targets[b2.weight > 0] == b.targets[b.weight > 0]).all()


def test_sft_with_replay_adds_the_weighted_nll_of_every_token_of_the_next_documents_in_order():
    from quietstar.methods.explicit.losses import fit_sft
    from quietstar.config import OptimConfig

    qs = tiny_qs(dtype=torch.float64)
    examples = [SFTExample([1, 40, qs.start_token_id], [60, 61, qs.end_token_id])]
    replay = [[1, 70, 71, 72], [1, 73, 74], [1, 75, 76, 77, 78]]  # BOS first; the first 2 then the 3rd and 1st

    def doc_nll(docs):  # every token after BOS, from the full logits
        return -sum(reference_seq_logprob(qs, d[:1], d[1:], DOT) for d in docs) / sum(len(d) - 1 for d in docs)

    sft = sft_loss(qs, token_batch([examples[0].prompt_ids] * 2, [examples[0].completion_ids] * 2, TOK.pad_id,
                                   qs.end_token_id, DOT))
    first_two, next_two = doc_nll(replay[:2]), doc_nll(replay[2:] + replay[:1])
    opt = OptimConfig(lr=1e-300, warmup_steps=0)  # steps too small to change a float64 weight: step 2 reads step 1's
    plain = fit_sft(qs, examples, 1, 2, opt, 0, DOT, TOK.pad_id)
    losses = fit_sft(qs, examples, 2, 2, opt, 0, DOT, TOK.pad_id, replay=replay, replay_weight=0.5)
    assert plain[0] == pytest.approx(float(sft), rel=1e-10)
    assert losses[0] == pytest.approx(float(sft + 0.5 * first_two), rel=1e-10)
    assert losses[1] == pytest.approx(float(sft + 0.5 * next_two), rel=1e-10)


def test_the_replayed_documents_come_after_every_training_and_validation_questions_document():
    from types import SimpleNamespace

    from quietstar.errors import ConfigError
    from quietstar.methods.explicit.config import ExplicitConfig
    from quietstar.methods.explicit.loop import _questions, _replay_documents
    from quietstar.reasoning import encode_document

    rc = ReasoningConfig(n_symbols=5, max_hops=3, n_queries=5)
    ex = ExplicitConfig(train_questions=12, val_questions=7, eval_questions=4, replay_weight=1.0, replay_docs=6)
    cfg = SimpleNamespace(data=SimpleNamespace(reasoning=rc), explicit=ex, train=SimpleNamespace(seed=3))
    train_q, val_q, _ = _questions(cfg)
    used = {int(q.id.split("/")[1]) for q in train_q + val_q}
    assert max(used) == 4  # 3 documents' queries for training, 2 for validation (5 queries each)
    docs = make_documents(rc, 11, 3, "train")
    assert _replay_documents(cfg, TOK) == [encode_document(d, TOK)[0] for d in docs[5:]]
    with pytest.raises(ConfigError, match="explicit.replay_weight"):
        ExplicitConfig(task="gsm8k", replay_weight=0.5)
    with pytest.raises(ConfigError, match="add explicit.step_filter=false"):  # explicit=cpo's default, on GSM8K
        ExplicitConfig(task="gsm8k", method="cpo", step_filter=True)


def test_max_difficulty_keeps_the_easier_training_and_validation_questions_and_every_held_out_one():
    from types import SimpleNamespace

    from quietstar.errors import ConfigError
    from quietstar.methods.explicit.config import ExplicitConfig
    from quietstar.methods.explicit.loop import _questions

    rc = ReasoningConfig(n_symbols=5, max_hops=3, n_queries=5)
    cfg = lambda **kw: SimpleNamespace(data=SimpleNamespace(reasoning=rc), train=SimpleNamespace(seed=3),
                                       explicit=ExplicitConfig(train_questions=40, val_questions=20, eval_questions=30, **kw))
    every, easy = _questions(cfg()), _questions(cfg(max_difficulty=1))
    for all_q, kept in zip(every[:2], easy[:2]):
        assert kept == [q for q in all_q if q.difficulty == 1] and 0 < len(kept) < len(all_q)
    assert easy[2] == every[2] and {q.difficulty for q in easy[2]} == {1, 2, 3}
    with pytest.raises(ConfigError, match="explicit.max_difficulty"):
        ExplicitConfig(max_difficulty=0)


def test_dpo_loss_and_gradients_equal_a_hand_written_reference():
    qs, ref = tiny_qs(0, torch.float64), tiny_qs(1, torch.float64)
    S, E = qs.start_token_id, qs.end_token_id
    pairs = [PreferencePair([1, 40, 41, S], [60, E, 70, 32], [61, 62, 63, E, 71, 32]),
             PreferencePair([1, 50, 51, 52, 53, S], [64, 65, E, 72], [66, E, 73, 32]),
             PreferencePair([1, 54, S], [67, 68, 69, 70, E, 74, 32], [75, E, 76])]
    beta = 0.3
    ref_lp = reference_logprobs(ref, pairs, TOK.pad_id, E, DOT)
    with torch.no_grad():
        want_ref = torch.tensor([[reference_seq_logprob(ref, p.prompt_ids, c, DOT) for c in (p.chosen_ids, p.rejected_ids)]
                                 for p in pairs], dtype=torch.float64)
    torch.testing.assert_close(ref_lp, want_ref, rtol=1e-10, atol=1e-10)

    loss, m = dpo_loss(qs, pair_batch(pairs, TOK.pad_id, E, DOT), ref_lp, beta)
    loss.backward()
    got = {n: p.grad.clone() for n, p in qs.named_parameters() if p.grad is not None}
    qs.zero_grad()
    terms = []
    for p, (rc, rr) in zip(pairs, want_ref):
        pc = reference_seq_logprob(qs, p.prompt_ids, p.chosen_ids, DOT)
        pr = reference_seq_logprob(qs, p.prompt_ids, p.rejected_ids, DOT)
        terms.append(-F.logsigmoid(beta * ((pc - rc) - (pr - rr))))
    want = torch.stack(terms).mean()
    want.backward()
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-10, atol=1e-10)
    assert got and {n for n, p in qs.named_parameters() if p.grad is not None} == set(got)
    for n, p in qs.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-8, atol=1e-10, msg=n)
    assert 0 <= m["dpo/accuracy"] <= 1


def test_dpo_training_reads_the_reference_once_per_dataset():
    from quietstar.config import OptimConfig

    qs, ref = tiny_qs(0), tiny_qs(1)
    S, E = qs.start_token_id, qs.end_token_id
    pairs = [PreferencePair([1, 40 + i, S], [60 + i, E, 70], [61, 62 + i, E, 71]) for i in range(6)]
    calls = []
    forward = ref.model.forward
    ref.model.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    before = [p.clone() for p in ref.parameters()]
    losses = fit_dpo(qs, ref, pairs, 0.5, steps=4, batch_size=2, optim_cfg=OptimConfig(lr=1e-2, warmup_steps=0),
                     seed=0, end_target=DOT, pad_id=TOK.pad_id)
    assert len(calls) == 1 and len(losses) == 4  # one batch of all 6 pairs, before the first step
    assert all(torch.equal(a, b) for a, b in zip(before, ref.parameters()))  # frozen
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------------------------------------- methods


def method_ctx(method, **explicit):
    from quietstar.methods.registry import TrainConfig
    from quietstar.methods.explicit.config import ExplicitConfig
    from quietstar.methods.explicit.loop import Context

    cfg = TrainConfig()
    cfg.data.reasoning = ReasoningConfig()
    cfg.explicit = ExplicitConfig(method=method, **explicit)
    return Context(cfg, TOK)


def scripted(ctx, answers):
    """ctx.sample returns the next scripted completions (one list per prompt), recording the prompts."""
    seen = []

    def fake(qs, prompts, k, mode, seed, greedy=False, desc=""):
        seen.append(list(prompts))
        return answers.pop(0)
    ctx.sample = fake
    return seen


Q1 = Question("train/0/0", "a3=", "d", "!#$\n", ["b1=-bc.c "], "a3=d ", 3)
Q2 = Question("train/0/1", "b2=", "e", "!#$\n", [], "b2=e ", 2)


def test_star_keeps_correct_rationales_and_trains_rationalisations_without_the_hint():
    from quietstar.methods.explicit.loop import collect_star

    qs, ctx = tiny_qs(), method_ctx("star", few_shot=1)
    prompts = scripted(ctx, [[[comp("acfd", "d")], [comp("bx", "x")]],  # Q1 right, Q2 wrong
                             [[comp("bce", "e")]]])  # Q2 again, with the hint: right
    skips = Skips()
    out, stats = collect_star(ctx, qs, [Q1, Q2], 1, 0, skips)
    assert prompts[0] == [Q1.prompt(1), Q2.prompt(1)] and "b1=-bc.c" in prompts[0][0]
    assert prompts[1] == [Q2.prompt(1, hint=True)] and Q2.hint in prompts[1][0]
    assert [e.meta["source"] for e in out] == ["generated", "rationalised"]
    assert stats == {"generated_correct": 1, "rationalised_correct": 1, "rationalise_tried": 1}
    text = TOK.decode(out[1].prompt_ids)
    assert text == Q2.prompt() and Q2.hint not in text and out[1].prompt_ids[-1] == qs.start_token_id
    assert out[1].completion_ids == TOK.encode("bce") + [qs.end_token_id] + TOK.encode("e ")
    assert out[1].meta["question_id"] == Q2.id and out[1].meta["scores"]["answer"] == 1.0
    assert skips.total == 0


def test_rft_keeps_each_distinct_correct_path_once():
    from quietstar.methods.explicit.loop import collect_rft

    qs, ctx = tiny_qs(), method_ctx("rft", k=5)
    scripted(ctx, [[[comp("acfd", "d", 1), comp("ACFD ", "d", 2), comp("abcd", "d", 3), comp("acfd", "x", 4),
                     comp("acfd", "d", 5)]]])
    out, stats = collect_rft(ctx, qs, [Q1], 1, 0, Skips())
    assert [e.meta["rationale"] for e in out] == ["acfd", "abcd"] and [e.meta["sample"] for e in out] == [0, 2]
    assert stats == {"correct": 4, "duplicates": 2, "questions_with_a_path": 1}


def test_system2_keeps_self_consistent_answers_and_trains_them_without_a_rationale():
    from quietstar.methods.explicit.loop import collect_system2

    qs, ctx = tiny_qs(), method_ctx("system2", k=4, consistency=0.75)
    q3 = Question("train/0/2", "c1=", None, "!#$\n")  # no gold: System 2 distillation needs none
    scripted(ctx, [[[comp("a", "x"), comp("b", "x"), comp("c", "x"), comp("d", "y")],  # 3/4 agree on x (gold d)
                    [comp("a", "e"), comp("b", "f"), comp("c", "e"), comp("d", "g")],  # 2/4: dropped
                    [comp("a", "k"), comp("b", "k"), comp("c", "k"), comp("d", "k")]]])
    skips = Skips()
    out, stats = collect_system2(ctx, qs, [Q1, Q2, q3], 1, 0, skips)
    assert [e.meta["question_id"] for e in out] == [Q1.id, q3.id]
    assert out[0].completion_ids == TOK.encode("x ") and TOK.decode(out[0].prompt_ids) == Q1.prompt()
    assert qs.start_token_id not in out[0].prompt_ids and qs.end_token_id not in out[0].completion_ids
    assert out[0].meta["majority_share"] == 0.75 and stats == {"inconsistent": 1, "kept_label_correct": 0}
    assert majority(["a", None, None, "b", "b"]) == ("b", 0.4) and majority([None]) == (None, 0.0)


# ---------------------------------------------------------------------------------------------- bad input


def test_a_thinking_model_is_scored_the_same_way_with_its_hidden_tokens_counted():
    """evaluate(implicit=True), the Quiet-STaR row of the comparison, writes a thought before every answer
    token. A fresh talk head is exactly zero (w = 0), so the answers equal the no-thought answers; the cost
    counts n_ahead tokens per written token (<start>, the thought, <end>, the token)."""
    import dataclasses

    from quietstar.methods.explicit.loop import evaluate

    qs, ctx = tiny_qs(), method_ctx("star")
    qs.configure(dataclasses.replace(qs.cfg, n_ahead=5))
    questions = reasoning_questions(make_documents(ReasoningConfig(), 2, 0, "eval"), "eval", ".")
    calls = []
    think = qs.think
    qs.think = lambda *a, **k: calls.append(1) or think(*a, **k)
    plain = evaluate(ctx, qs, questions, "direct")
    assert not calls
    implicit = evaluate(ctx, qs, questions, "direct", implicit=True)
    assert calls  # every decoding step thought
    assert implicit["acc"] == plain["acc"] and implicit["examples"] == plain["examples"]
    assert implicit["tokens_per_answer"] == pytest.approx(5 * plain["tokens_per_answer"])


def test_bad_input_is_counted_with_its_reason():
    from quietstar.methods.explicit.loop import collect_star

    qs, ctx = tiny_qs(), method_ctx("star", rationalize=False)
    no_gold = Question("train/0/3", "d1=", None, "!#$\n")
    scripted(ctx, [[[comp("ab", "b")], [comp("", "d")]]])  # no gold; a right answer with an empty rationale
    skips = Skips()
    out, _ = collect_star(ctx, qs, [no_gold, Q1], 1, 0, skips)
    assert out == [] and skips.as_dict() == {"empty generation": 1, "no gold answer": 1}
    assert skips.examples == {"no gold answer": [no_gold.id], "empty generation": [Q1.id]}
    assert make_sft(qs, TOK, "x", comp("ab", ""), True, skips, {"question_id": "q"}) is None
    a = comp("ab", "b")
    assert make_pair(qs, TOK, "x", a, comp("ab", "b", seed=9), skips, {"question_id": "q"}) is None
    assert make_pair(qs, TOK, "x", a, comp("ac", "c"), skips, {"question_id": "q"}) is not None
    assert skips.as_dict() == {"empty generation": 2, "identical pair": 1, "no gold answer": 1} and skips.total == 4
    assert "identical pair: 1" in str(skips)


def test_a_judge_output_without_a_number_is_a_reason_not_a_crash():
    assert parse_score("7/10", 0, 10).value == 0.7
    assert parse_score("score: 12", 0, 10).value is None and "outside" in parse_score("12", 0, 10).reason
    assert parse_score("great!", 0, 10).value is None and "no number" in parse_score("great!", 0, 10).reason
    judge = ModelJudge(tiny_qs(), TOK, max_tokens=3)
    scores = judge.score_many([Q1, Q2], [comp("acfd", "d"), comp("b", "e")])
    assert len(scores) == 2 and all(s.value is None or 0 <= s.value <= 1 for s in scores)
    assert all(s.reason for s in scores)
    assert AnswerCheck().score(Question("g", "Q: ?", "72", kind="gsm8k"), comp("", "it is 72.")).value == 1.0


# ---------------------------------------------------------------------------------------------- end to end


def test_a_star_round_end_to_end_through_the_config(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf
    from test_learn_to_think import ROOT, TOY

    from quietstar import train as train_script
    from quietstar.methods.registry import register_configs
    from quietstar.methods.registry import run_recipe

    def toy_cfg(out_dir, *overrides):  # learn_to_think's toy sizes, under the explicit=star preset
        GlobalHydra.instance().clear()
        register_configs()
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            node = compose(config_name="train", overrides=[overrides[0], *TOY[1:], *overrides[1:]])
        GlobalHydra.instance().clear()
        node.output_dir = str(out_dir)
        return OmegaConf.to_object(node)

    cfg = toy_cfg(tmp_path, "explicit=star", "learn_to_think.pretrain_steps=80", "learn_to_think.pretrain_lr=1e-2",
                  "learn_to_think.pretrain_warmup=5", "explicit.train_questions=48",
                  "explicit.val_questions=8", "explicit.eval_questions=16", "explicit.steps=2",
                  "explicit.batch_size=4", "explicit.iterations=2", "explicit.patience=0", "train.threads=null")
    assert cfg.recipe == "explicit" and cfg.explicit.method == "star" and cfg.explicit.few_shot == 2
    summary = run_recipe(cfg, train_script.train)
    res = json.loads((tmp_path / "results.json").read_text())
    assert [r["round"] for r in res["rounds"]] == [0, 1, 2] and res["method"] == "star"
    assert res["stages"][0]["stage"] == "pretrain"
    assert res["rounds"][1]["examples"] > 0 and res["rounds"][1]["loss_last"] is not None  # a round trained
    for r in res["rounds"][1:]:
        lines = [json.loads(x) for x in Path(r["dataset"]).read_text().splitlines()]
        assert len(lines) == r["examples"] == sum(v for k, v in r["stats"].items() if k.endswith("_correct"))
        for x in lines:
            assert {"method", "iteration", "question_id", "sample", "scores", "seed"} <= set(x["meta"])
        assert Path(r["checkpoint"], "manifest.json").is_file()
        for m in ("cot", "direct"):
            e = r["eval"][m]
            assert 0 <= e["acc"] <= 1 and e["n"] == 16 and e["tokens_per_answer"] >= 1
    assert res["rounds"][0]["eval"]["cot"]["tokens_per_answer"] > res["rounds"][0]["eval"]["direct"]["tokens_per_answer"]
    metrics = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and "eval_cot/acc" in metrics[0] and "explicit/skipped" in metrics[0]
    assert summary.status == "done"
