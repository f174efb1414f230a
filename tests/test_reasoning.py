"""The reasoning corpus: deterministic, a disjoint evaluation split, correct answers, answer-token scoring
against a hand-computed example, and the learn_to_think recipe's pieces (configs, compute matching)."""

import math
import re

import pytest
import torch

from quietstar.tokenizer import ByteTokenizer
from quietstar.reasoning import (PAIR_CHARS, AnswerScores, Document, ReasoningConfig, Segment, encode_document,
                                 make_documents, max_document_chars, score_answers, train_and_eval_documents)
from quietstar.reasoning import held_out as held_out_key

BOTH = ReasoningConfig(families=["lookup", "state"])


def test_documents_are_a_function_of_the_seed():
    a = [d.text for d in make_documents(BOTH, 20, seed=3)]
    assert a == [d.text for d in make_documents(BOTH, 20, seed=3)]
    assert a != [d.text for d in make_documents(BOTH, 20, seed=4)]
    assert a[:5] == [d.text for d in make_documents(BOTH, 5, seed=3)]  # document i does not depend on n_docs


def test_the_evaluation_split_never_shares_a_map_or_problem_with_training():
    cfg = ReasoningConfig(families=["lookup", "state"], n_symbols=4, min_digits=2, max_digits=2, eval_docs=40)
    train, held_out = train_and_eval_documents(cfg, 400, seed=0)  # 24 maps, 100 digit pairs: small spaces
    maps = lambda docs: {d.key for d in docs if d.family == "lookup"}
    problems = lambda docs: {k for d in docs if d.family == "state" for k in d.key}
    assert maps(held_out) and not maps(train) & maps(held_out)
    assert problems(held_out) and not problems(train) & problems(held_out)
    assert all(held_out_key(d.key, 0, cfg.eval_share) for d in held_out if d.family == "lookup")
    # the seed decides which maps are held out
    assert maps(make_documents(cfg, 40, seed=1, split="eval")) != maps(held_out)


def test_an_exhausted_space_is_a_clear_error():
    with pytest.raises(ValueError, match="evaluation split.*too small"):
        make_documents(ReasoningConfig(n_symbols=2, eval_share=0.01), 5, seed=0, split="eval")  # 2 maps in all


def _map(text: str, cfg: ReasoningConfig) -> dict:
    line = text.split("\n")[0]
    if cfg.map_style == "arrow":
        return dict(pair.split(">") for pair in line.split())
    letters = "abcdefghijklmnopqrstuvwxyz"[:cfg.n_symbols]
    return {letters[PAIR_CHARS.index(c) // cfg.n_symbols]: letters[PAIR_CHARS.index(c) % cfg.n_symbols] for c in line}


@pytest.mark.parametrize("style,kind", [("packed", "permutation"), ("arrow", "permutation"), ("packed", "function")])
def test_lookup_answers_and_worked_chains_are_correct(style, kind):
    cfg = ReasoningConfig(map_style=style, map_kind=kind, n_symbols=7, worked_share=0.5, n_queries=12)
    letters = sorted("abcdefg")
    for doc in make_documents(cfg, 30, seed=5):
        f = _map(doc.text, cfg)
        assert sorted(f) == letters
        if kind == "permutation":
            assert sorted(f.values()) == letters
        queries = re.findall(r"([a-g])(\d)=(\S+)", doc.text.split("\n")[1])
        assert len(queries) == cfg.n_queries
        for a, hops, rest in queries:
            x = a
            chain = [a]
            for _ in range(int(hops)):
                x = f[x]
                chain.append(x)
            assert rest in (x, f"-{''.join(chain)}.{x}")
        scored = [s for s in doc.segments if s.difficulty]
        assert scored and all(len(s.text) == 1 and 1 <= s.difficulty <= 3 for s in scored)


def test_state_answers_are_running_sums_mod_10():
    cfg = ReasoningConfig(families=["state"], min_digits=2, max_digits=5)
    for doc in make_documents(cfg, 20, seed=2):
        for digits, rest in re.findall(r"(\d+)=(\S+)", doc.text):
            sums, t = [], 0
            for c in digits:
                t = (t + int(c)) % 10
                sums.append(str(t))
            assert rest in (sums[-1], f"-{''.join(sums)}.{sums[-1]}")
        assert {s.difficulty for s in doc.segments if s.difficulty} <= {2, 3, 4, 5}


def test_documents_fit_the_bound_and_the_config_checks_its_fields():
    cfg = ReasoningConfig(families=["lookup", "state"], map_style="arrow", n_symbols=10)
    assert max(len(d.text) for d in make_documents(cfg, 300, seed=0)) <= max_document_chars(cfg)
    cfg = ReasoningConfig(families=["lookup", "state"])
    assert max(len(d.text) for d in make_documents(cfg, 300, seed=0)) <= max_document_chars(cfg)
    for bad in [dict(families=[]), dict(families=["maze"]), dict(n_symbols=27), dict(n_symbols=8), dict(max_hops=0),
                dict(min_digits=3, max_digits=2), dict(worked_share=1.5), dict(chain_open="="),
                dict(chain_open="ab"), dict(chain_open="#"), dict(chain_close="-"), dict(chain_close="a"),
                dict(decoy_share=-0.1), dict(eval_docs=0), dict(eval_share=0.0),
                dict(map_style="grid"), dict(map_kind="graph")]:
        with pytest.raises(ValueError, match="data.reasoning"):
            ReasoningConfig(**bad)


def test_answer_tokens_are_marked_in_the_encoding():
    doc = Document("lookup", [Segment("a>b b>a\n"), Segment("a1="), Segment("b", 1), Segment(" b2=-bab.b"),
                              Segment(" a2="), Segment("a", 2), Segment("\n")], ())
    ids, diff = encode_document(doc, ByteTokenizer())
    assert ids[0] == ByteTokenizer.bos_id and ByteTokenizer().decode(ids) == doc.text
    assert [(doc.text[i - 1], d) for i, d in enumerate(diff) if d] == [("b", 1), ("a", 2)]


def test_answer_scoring_matches_a_hand_computation():
    # two positions are scored: token 2 (difficulty 1) and token 3 (difficulty 2), predicted from 1 and 2
    V = 4
    logits = torch.full((1, 4, V), -1e4)
    logits[0, 1] = torch.tensor([0.0, math.log(3.0), 0.0, 0.0])  # p(target 1) = 3/6
    logits[0, 2] = torch.tensor([math.log(4.0), 0.0, 0.0, math.log(2.0)])  # p(target 3) = 2/8, argmax 0 (wrong)
    ids = torch.tensor([[0, 0, 1, 3]])
    diff = torch.tensor([[0, 0, 1, 2]])
    s = AnswerScores()
    s.add(logits, ids, diff)
    out = s.summary()
    assert out["nll"]["1"] == pytest.approx(math.log(2.0), rel=1e-5)
    assert out["nll"]["2"] == pytest.approx(math.log(4.0), rel=1e-5)
    assert out["nll"]["all"] == pytest.approx((math.log(2.0) + math.log(4.0)) / 2, rel=1e-5)
    assert out["acc"] == {"all": 0.5, "1": 1.0, "2": 0.0}
    assert out["count"] == {"all": 2, "1": 1, "2": 1}
    assert out["nll_raw"] == out["nll"]
    # without token 0 (a chain's opening mark at the answer position): p(1) = 3/5 and p(3) = 2/4, now the argmax
    s = AnswerScores(without=[0])
    s.add(logits, ids, diff)
    out = s.summary()
    assert out["nll"]["1"] == pytest.approx(math.log(5 / 3), rel=1e-5)
    assert out["nll"]["2"] == pytest.approx(math.log(2.0), rel=1e-5)
    assert out["nll_raw"]["2"] == pytest.approx(math.log(4.0), rel=1e-5)
    assert out["acc"] == {"all": 1.0, "1": 1.0, "2": 1.0}


def test_score_answers_on_a_tiny_model_is_consistent():
    from quietstar.model import ModelConfig, Transformer
    from quietstar.methods.quietstar.thinker import QuietStar
    from quietstar.methods.quietstar.config import ThoughtConfig

    torch.manual_seed(0)
    tok = ByteTokenizer()
    qs = QuietStar(Transformer(ModelConfig.from_preset("tiny")), tok, ThoughtConfig(n_ahead=5, n_ahead_talk=1))
    docs = make_documents(ReasoningConfig(n_queries=4), 6, seed=0)
    res = score_answers(qs, docs, tok, batch_size=4, seed=0, n_examples=2)
    plain = score_answers(qs, docs, tok, batch_size=3, thoughts=False)
    # the mixing head starts at zero: the prediction after a thought is the base prediction
    assert res["thought"]["nll"]["all"] == pytest.approx(res["no_thought"]["nll"]["all"], rel=1e-5)
    assert plain["no_thought"]["nll"] == pytest.approx(res["no_thought"]["nll"], rel=1e-5)
    n_answers = sum(1 for d in docs for s in d.segments if s.difficulty)
    assert res["thought"]["count"]["all"] == n_answers
    assert len(res["examples"]) == 2 and all(len(e["answer"]) == 1 for e in res["examples"])


def test_decoys_repeat_the_first_step_and_leave_the_answers_alone():
    plain = make_documents(ReasoningConfig(n_queries=12), 10, seed=1)
    same = make_documents(ReasoningConfig(n_queries=12, decoy_share=0.0), 10, seed=1)
    assert [d.text for d in same] == [d.text for d in plain]
    n_worked = 0
    for doc in make_documents(ReasoningConfig(n_queries=12, decoy_share=1.0), 10, seed=1):
        f = _map(doc.text, ReasoningConfig())
        for a, hops, rest in re.findall(r"([a-g])(\d)=(\S+)", doc.text.split("\n")[1]):
            x = a
            for _ in range(int(hops)):
                x = f[x]
            if rest.startswith("-"):  # a decoy: the queried symbol repeated, then the true answer
                n_worked += 1
                assert rest == f"-{a * (int(hops) + 1)}.{x}"
            else:
                assert rest == x
    assert n_worked > 20


def test_thoughts_are_sorted_into_chain_chain_later_decoy_and_other(monkeypatch):
    import itertools

    from quietstar import reasoning
    from quietstar.model import ModelConfig, Transformer
    from quietstar.methods.quietstar.report import chain_share
    from quietstar.methods.quietstar.thinker import QuietStar
    from quietstar.methods.quietstar.config import ThoughtConfig

    torch.manual_seed(0)
    tok = ByteTokenizer()
    qs = QuietStar(Transformer(ModelConfig.from_preset("tiny")), tok, ThoughtConfig(n_ahead=5, n_ahead_talk=1))
    cfg = ReasoningConfig(n_queries=4)
    docs = make_documents(cfg, 6, seed=0)
    # every query's chain is `xyz` and its decoy `xxx`; the thoughts cycle through the four kinds
    monkeypatch.setattr(reasoning, "lookup_chain", lambda *a, **k: ("xyz", "xxx"))
    thoughts = itertools.cycle(["xyz.", "a3=-xyz.", "xxx.", "b2=c"])
    monkeypatch.setattr(qs, "decode_thought", lambda *a: next(thoughts))
    res = score_answers(qs, docs, tok, batch_size=4, seed=0, chains=cfg)
    kinds = res["thought_kinds"]
    n = sum(sum(c.values()) for c in kinds.values())
    assert n == sum(1 for d in docs for s in d.segments if s.difficulty)
    totals = [sum(c[k] for c in kinds.values()) for k in ("chain", "chain_later", "decoy", "other")]
    assert totals == [len(range(i, n, 4)) for i in range(4)]
    top = kinds[max(kinds, key=int)]
    assert chain_share(res) == top["chain"] / sum(top.values())
    assert chain_share(res, later=True) == (top["chain"] + top["chain_later"]) / sum(top.values())
