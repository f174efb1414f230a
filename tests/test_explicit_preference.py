"""The preference-based explicit methods (quietstar/methods/explicit/preference.py) on tiny random models: the preference
losses (DPO, RPO, IPO, SimPO) against hand computations, TPO's best-vs-worst pairs and what it skips, V-STaR's
verifier pairs from every round and its best-of-k wired to bestofk, CPO's tree search over the real sampler (its
step filter, proposal temperature and pairs per question), and one round of each end to end through the config
entry point."""

import dataclasses
import json
import math
from pathlib import Path

import pytest

import torch
import torch.nn.functional as F

from quietstar.methods.explicit import preference, tree
from quietstar.methods.explicit.bestofk import accuracy_vs_k
from quietstar.methods.explicit.dataset import PreferencePair, Skips
from quietstar.methods.explicit.judge import Score
from quietstar.methods.explicit.losses import (PreferenceLoss, fit_dpo, pair_batch, preference_loss, reference_logprobs,
                                               sequence_logprobs)
from quietstar.methods.explicit.tasks import Question
from test_explicit import DOT, Q1, Q2, TOK, comp, method_ctx, reference_seq_logprob, scripted, tiny_qs

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------- losses


def _pairs(qs):
    S, E = qs.start_token_id, qs.end_token_id  # sides and prompts of different lengths: every row is padded
    return [PreferencePair([1, 40, 41, S], [60, E, 70, 32], [61, 62, 63, E, 71, 32]),
            PreferencePair([1, 50, 51, 52, 53, S], [64, 65, E, 72], [66, E, 73, 32]),
            PreferencePair([1, 54, S], [67, 68, 69, 70, E, 74, 32], [75, E, 76])]


def _hand_loss(kind, qs, pairs, ref_lp, beta, nll_weight, gamma):
    """The loss written out per pair from full-logit autograd log-probs and the sides' token counts."""
    terms = []
    for p, (rc, rr) in zip(pairs, ref_lp):
        pc = reference_seq_logprob(qs, p.prompt_ids, p.chosen_ids, DOT)
        pr = reference_seq_logprob(qs, p.prompt_ids, p.rejected_ids, DOT)
        nc, nr = len(p.chosen_ids), len(p.rejected_ids)
        h = (pc - rc) - (pr - rr)
        if kind == "dpo":
            terms.append(-F.logsigmoid(beta * h))
        elif kind == "rpo":
            terms.append(-F.logsigmoid(beta * h) + nll_weight * (-pc / nc))
        elif kind == "ipo":
            terms.append((h - 1 / (2 * beta)) ** 2)
        else:
            terms.append(-F.logsigmoid(beta * (pc / nc - pr / nr) - gamma))
    return torch.stack(terms).mean()


@pytest.mark.parametrize("kind", ["dpo", "rpo", "ipo", "simpo"])
def test_each_preference_loss_and_its_gradients_equal_a_hand_computation(kind):
    qs, ref = tiny_qs(0, torch.float64), tiny_qs(1, torch.float64)
    pairs, E = _pairs(qs), qs.end_token_id
    spec = PreferenceLoss(kind, beta=0.3, nll_weight=0.7, gamma=0.4)
    ref_lp = reference_logprobs(ref, pairs, TOK.pad_id, E, DOT)
    # simpo reads no reference: it is given none
    loss, m = preference_loss(qs, pair_batch(pairs, TOK.pad_id, E, DOT), ref_lp if spec.needs_reference else None, spec)
    assert spec.needs_reference == (kind != "simpo")
    loss.backward()
    got = {n: p.grad.clone() for n, p in qs.named_parameters() if p.grad is not None}
    qs.zero_grad()
    want = _hand_loss(kind, qs, pairs, ref_lp, 0.3, 0.7, 0.4)
    want.backward()
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-10, atol=1e-10)
    assert got and {n for n, p in qs.named_parameters() if p.grad is not None} == set(got)
    for n, p in qs.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-8, atol=1e-10, msg=n)
    assert 0 <= m[f"{kind}/accuracy"] <= 1 and (f"{kind}/chosen_nll" in m) == (kind == "rpo")
    if kind != "dpo":  # the losses differ: a wrong branch would not match the hand computation of another
        other = _hand_loss("dpo", qs, pairs, ref_lp, 0.3, 0.7, 0.4)
        assert abs(float(other.detach()) - float(loss.detach())) > 1e-3


def test_rpo_raises_the_chosen_likelihood_above_where_dpo_leaves_it():
    from quietstar.config import OptimConfig

    base = tiny_qs(0)
    pairs, E = _pairs(base), base.end_token_id
    batch = pair_batch(pairs, TOK.pad_id, E, DOT)
    chosen = {}
    for kind in ("dpo", "rpo"):
        qs = tiny_qs(0)
        fit_dpo(qs, base, pairs, 0.1, steps=15, batch_size=3, optim_cfg=OptimConfig(lr=1e-2, warmup_steps=0), seed=0,
                end_target=DOT, pad_id=TOK.pad_id, loss=PreferenceLoss(kind, 0.1, nll_weight=1.0))
        chosen[kind] = float(sequence_logprobs(qs, batch)[:len(pairs)].sum())
    start = float(sequence_logprobs(base, batch)[:len(pairs)].sum())
    assert chosen["rpo"] > chosen["dpo"] + 1.0 and chosen["rpo"] > start  # the same pairs, steps and seed


def test_a_reference_free_loss_never_runs_the_reference_and_the_option_is_checked():
    from quietstar.config import OptimConfig
    from quietstar.errors import ConfigError
    from quietstar.methods.explicit.config import ExplicitConfig

    qs, ref = tiny_qs(0), tiny_qs(1)
    calls = []
    forward = ref.model.forward
    ref.model.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    losses = fit_dpo(qs, ref, _pairs(qs), 2.0, steps=2, batch_size=2, optim_cfg=OptimConfig(lr=1e-2, warmup_steps=0),
                     seed=0, end_target=DOT, pad_id=TOK.pad_id, loss=PreferenceLoss("simpo", 2.0, gamma=1.0))
    assert calls == [] and len(losses) == 2
    assert ExplicitConfig(method="tpo").loss == "dpo"  # the default: recorded runs are DPO
    with pytest.raises(ConfigError, match="explicit.loss"):
        ExplicitConfig(method="tpo", loss="kto")
    with pytest.raises(ConfigError, match="explicit.nll_weight"):
        ExplicitConfig(method="tpo", loss="rpo", nll_weight=-1.0)


# ---------------------------------------------------------------------------------------------- TPO


def test_tpo_pairs_the_best_and_the_worst_and_counts_what_it_cannot_pair():
    qs, ctx = tiny_qs(), method_ctx("tpo", k=4)
    cs = [comp("ab", "x", 1), comp("ac", "d", 2), comp("ad", "d", 3), comp("ae", "y", 4)]
    skips = Skips()
    p = preference.best_and_worst(ctx, qs, Q1, cs, [Score(0.2, ""), Score(0.9, ""), Score(0.9, ""), Score(0.1, "")], 1,
                                  skips)
    # the best (ties to the first drawn: sample 1, not 2) against the worst; over thought + response
    assert p.meta["samples"] == [1, 3] and p.meta["scores"] == [0.9, 0.1]
    assert p.chosen_ids == TOK.encode("ac") + [qs.end_token_id] + TOK.encode("d ")
    assert p.rejected_ids == TOK.encode("ae") + [qs.end_token_id] + TOK.encode("y ")
    assert TOK.decode(p.prompt_ids) == Q1.prompt() and p.prompt_ids[-1] == qs.start_token_id and skips.total == 0
    # a tie, an identical pair, an unparseable judge output, an empty answer: counted, no pair
    assert preference.best_and_worst(ctx, qs, Q1, cs[:2], [Score(1.0, ""), Score(1.0, "")], 1, skips) is None
    same = [comp("ab", "d", 1), comp("ab", "d", 2)]
    assert preference.best_and_worst(ctx, qs, Q1, same, [Score(1.0, ""), Score(0.0, "")], 1, skips) is None
    assert preference.best_and_worst(ctx, qs, Q1, [cs[0], comp("ab", "", 5)],
                                     [Score(None, "judge output has no number: 'x'"), Score(1.0, "")], 1, skips) is None
    assert skips.as_dict() == {"best and worst score the same": 1, "identical pair": 1, "empty generation": 1,
                               "judge output has no number: 'x'": 1, "fewer than two scored samples": 1}


def test_tpo_collects_one_pair_per_question_with_a_contrast_judged_on_the_answer_only():
    qs, ctx = tiny_qs(), method_ctx("tpo", k=3)
    no_gold = Question("train/0/4", "e1=", None, "!#$\n")
    scripted(ctx, [[[comp("a", "d"), comp("b", "x"), comp("c", "d")],  # Q1 (gold d): right, wrong, right
                    [comp("a", "e"), comp("b", "e"), comp("c", "e")],  # Q2: all right, a tie
                    [comp("a", "k"), comp("b", "j"), comp("c", "k")]]])  # no gold: not scorable
    skips = Skips()
    pairs, stats = preference.collect_tpo(ctx, qs, [Q1, Q2, no_gold], 1, 0, skips)
    assert len(pairs) == 1 and pairs[0].meta["question_id"] == Q1.id and pairs[0].meta["samples"] == [0, 1]
    assert stats == {"samples_scored_1": 5, "pairs": 1}
    assert skips.as_dict() == {"best and worst score the same": 1, "no gold answer": 3,
                               "fewer than two scored samples": 1}
    # judge=model reads the response, never the thought
    judge = preference.response_judge(method_ctx("tpo", judge="model"), qs)
    text = judge.prompt(Q1, comp("SECRET", "d"))
    assert "SECRET" not in text and Q1.prompt() in text and "Answer: d" in text


# TPO's questions on the reasoning corpus carry their chain and its decoy (tasks.query_chain)
C1 = dataclasses.replace(Q1, chain="afcd", decoy="aaaa")
C2 = dataclasses.replace(Q2, chain="bce", decoy="bbb")
SIG = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731


def _choice_labeller(monkeypatch, favoured):
    """A scripted multiple-choice judge: the asked option whose response is in `favoured` gets logit +2, and
    (A) always +1 more (a position bias, which asking both orders cancels). Records the prompts."""
    from quietstar.methods.explicit import constitutional

    asked = []

    def fake(qs, tok, prompts, options, batch_rows=64):
        rows = []
        for text in prompts:
            asked.append(text)
            a, b = text.rsplit("(A) ", 1)[1].split("\nBetter: (")[0].split("\n(B) ")
            rows.append([1.0 + 2.0 * (a in favoured), 2.0 * (b in favoured)])
        return torch.tensor(rows)
    monkeypatch.setattr(constitutional, "option_logits", fake)
    return asked


def test_tpo_records_which_pairs_choose_the_querys_chain():
    qs, ctx = tiny_qs(), method_ctx("tpo", k=2)
    scripted(ctx, [[[comp("afcd", "d"), comp("aaaa", "x")],  # C1 (gold d): the chain right, the decoy wrong
                    [comp("bbb", "e"), comp("bcx", "q")],  # C2 (gold e): the decoy right, another chain wrong
                    [comp("ab", "d"), comp("ac", "x")]]])  # Q1: its chain not known, not counted
    pairs, stats = preference.collect_tpo(ctx, qs, [C1, C2, Q1], 1, 0, Skips())
    assert [p.meta["kinds"] for p in pairs[:2]] == [["chain", "decoy"], ["decoy", "other"]]
    assert "kinds" not in pairs[2].meta
    assert stats == {"samples_scored_1": 3, "pairs": 3, "pairs_with_chains": 2,
                     "chosen_chain": 1, "chosen_decoy": 1, "chosen_other": 0,
                     "rejected_chain": 0, "rejected_decoy": 1, "rejected_other": 1,
                     "chosen_chain_share": 0.5, "chosen_decoy_share": 0.5, "chosen_other_share": 0.0,
                     "rejected_chain_share": 0.0, "rejected_decoy_share": 0.5, "rejected_other_share": 0.5}
    # a chain that runs on past the query's is still its chain (reasoning.thought_kind: it begins with it)
    scripted(ctx, [[[comp("afcdd", "d"), comp("afcb", "b")]]])
    (p,), stats = preference.collect_tpo(ctx, qs, [C1], 1, 0, Skips())
    assert p.meta["kinds"] == ["chain", "other"] and stats["chosen_chain_share"] == 1.0


def test_the_choice_judge_ranks_by_mean_win_probability_and_its_agreement_with_the_answer_check_is_recorded(
        monkeypatch):
    qs, ctx = tiny_qs(), method_ctx("tpo", k=4, judge="choice", judge_shots=1)
    asked = _choice_labeller(monkeypatch, {"a3=d", "b2=q"})  # right on C1, a wrong answer on C2
    scripted(ctx, [[[comp("afcd", "d"), comp("aaaa", "x"), comp("abc", "y"), comp("afcd", "d")],
                    [comp("bce", "e"), comp("bbb", "q"), comp("bcx", "e"), comp("bq", "")]]])
    skips = Skips()
    pairs, stats = preference.collect_tpo(ctx, qs, [C1, C2], 1, 0, skips)
    win = (SIG(3.0) + 1 - SIG(-1.0)) / 2  # the favoured response against another, asked in both orders
    c1, c2 = pairs
    # C1: d beats x and y; x and y tie each other (0.5): the first d against the first of x, y
    assert c1.meta["samples"] == [0, 1] and c1.meta["scores"] == pytest.approx([win, (1 - win + 0.5) / 2])
    assert c1.meta["kinds"] == ["chain", "decoy"]
    # C2: the judge prefers the wrong q; the empty answer is not asked about and is counted
    assert c2.meta["samples"] == [1, 0] and c2.meta["scores"] == pytest.approx([win, 1 - win])
    assert c2.meta["kinds"] == ["decoy", "chain"] and skips.as_dict() == {"empty generation": 1}
    # 3 distinct responses of C1 (3 pairs) and 2 of C2 (1 pair), each pair asked in both orders
    assert len(asked) == 8 and asked[0].endswith("(A) a3=d\n(B) a3=x\nBetter: (")
    assert asked[1].endswith("(A) a3=x\n(B) a3=d\nBetter: (")
    assert all("afcd" not in t and "aaaa" not in t and "bbb" not in t for t in asked)  # never the thought
    assert asked[0].startswith("!#$\nWhich response better follows the principle: the answer is correct?\n"
                               "(A) b1=c\n(B) b1=b\nBetter: (A)\n")  # a worked question: C1's worked b1=-bc.c
    # against the answer check: C1's 2 right x 2 wrong samples ranked right, C2's 2 right x 1 wrong not
    assert stats["samples_right"] == 4 and stats["judge_ranked"] == 6 and stats["judge_ranked_agree"] == 4
    assert stats["judge_ranking_agreement"] == pytest.approx(4 / 6) and stats["judge_ranked_ties"] == 0
    assert stats["judge_checkable_pairs"] == 2 and stats["judge_pair_agreement"] == 0.5
    assert stats["chosen_chain_share"] == 0.5 and stats["rejected_chain_share"] == 0.5


def test_the_choice_judges_scores_equal_a_hand_computation_from_the_full_logits():
    from quietstar.methods.explicit import constitutional as cai

    qs, ctx = tiny_qs(0, torch.float64), method_ctx("tpo", k=3, judge="choice")
    judge = preference.response_judge(ctx, qs)
    assert isinstance(judge, preference.ChoiceJudge) and judge.model is qs  # no base model set: the latest
    cs = [comp("afcd", "d"), comp("aaaa", "x"), comp("abc", "f")]
    (scores,) = judge.score_groups([C1], [cs])
    texts = ["a3=d", "a3=x", "a3=f"]
    shots = judge.examples(C1)

    def p_first(a, b):  # p(A) / (p(A) + p(B)) from the model's full next-token distribution
        text = cai.label_prompt(C1, preference.CHOICE_PRINCIPLE, shots, a, b, judge.con)
        ids = torch.tensor([[TOK.bos_id] + TOK.encode(text)] if TOK.bos_id is not None else [TOK.encode(text)])
        with torch.no_grad():
            probs = torch.softmax(qs.model(ids)[0, -1].double(), -1)
        pa, pb = probs[TOK.encode("A")[0]], probs[TOK.encode("B")[0]]
        return float(pa / (pa + pb))
    win = {(i, j): (p_first(texts[i], texts[j]) + 1 - p_first(texts[j], texts[i])) / 2
           for i in range(3) for j in range(3) if i != j}
    for i, s in enumerate(scores):
        assert s.value == pytest.approx(sum(win[i, j] for j in range(3) if j != i) / 2, abs=1e-6)
    assert win[0, 1] == pytest.approx(1 - win[1, 0], abs=1e-9)
    # the same response twice shares its score; one distinct response has no contrast (0.5)
    (dup,) = judge.score_groups([C1], [cs + [comp("zz", "d")]])
    assert dup[3].value == dup[0].value
    assert [s.value for s in judge.score_groups([C1], [[cs[0], cs[0]]])[0]] == [0.5, 0.5]


def test_the_judge_model_is_the_base_the_latest_or_a_checkpoint_with_the_runs_tokenizer(tmp_path):
    from quietstar.errors import ConfigError, UserError
    from quietstar.methods.explicit.config import ExplicitConfig

    qs, base = tiny_qs(0), tiny_qs(1)
    ctx = method_ctx("tpo", judge="choice")
    ctx.base = base
    assert preference.judge_model(ctx, qs) is base
    ctx.ex.judge_model = "latest"
    assert preference.judge_model(ctx, qs) is qs
    ctx.ex.judge_model = str(tmp_path / "missing")
    with pytest.raises(UserError, match="missing"):
        preference.judge_model(ctx, qs)
    with pytest.raises(ConfigError, match="explicit.judge "):
        ExplicitConfig(method="tpo", judge="pairs")
    with pytest.raises(ConfigError, match="explicit.judge_model"):
        ExplicitConfig(method="tpo", judge_model=" ")


# ---------------------------------------------------------------------------------------------- V-STaR


def test_vstar_trains_the_generator_as_star_and_keeps_verifier_pairs_from_every_round():
    qs, ctx = tiny_qs(), method_ctx("vstar", k=3, few_shot=0, rationalize=False, pairs_per_question=3)
    for r in (1, 2):
        scripted(ctx, [[[comp("ab", "d")], [comp("bc", "e")]],  # STaR's sample: both right
                       [[comp("a1", "d"), comp("a2", "x"), comp("a3", "y")],  # k for the verifier: 1 right, 2 wrong
                        [comp("b1", "e"), comp("b2", "e"), comp("b3", "e")]]])  # all right: nothing to contrast
        examples, stats = preference.collect_vstar(ctx, qs, [Q1, Q2], r, 0, Skips())
        assert len(examples) == 2 and stats["generated_correct"] == 2  # STaR's SFT data
        assert stats["verifier_pairs"] == 2 and stats["verifier_one_sided"] == 1
    pairs = ctx.verifier_pairs
    assert [p.meta["iteration"] for p in pairs] == [1, 1, 2, 2]  # every round's pairs are kept
    for p in pairs:  # pairs of the same question, correct over incorrect
        assert p.meta["question_id"] == Q1.id and p.meta["scores"] == [1.0, 0.0]
        assert p.chosen_ids[:2] == TOK.encode("a1") and p.rejected_ids[:2] in (TOK.encode("a2"), TOK.encode("a3"))
    assert {tuple(p.rejected_ids) for p in pairs[:2]} != {tuple(pairs[0].rejected_ids)}  # both wrong ones used


def test_vstar_answers_best_of_k_by_the_verifier_score(monkeypatch):
    base = tiny_qs()
    ctx = method_ctx("vstar", best_of_n=3, verifier_steps=0, verifier_score="likelihood")
    ctx.base = base
    sols = [[comp("a", "d"), comp("b", "x"), comp("c", "x")],  # Q1 (gold d): the verifier's top is right
            [comp("a", "e"), comp("b", "z"), comp("c", "e")]]  # Q2 (gold e): its top is wrong
    scripted(ctx, [sols])
    fixed = {"likelihood": [3.0, 1.0, 2.0, 1.0, 3.0, 2.0], "ratio": [1.0, 2.0, 3.0, 1.0, 3.0, 2.0]}
    monkeypatch.setattr(preference, "verifier_scores", lambda *a: fixed)
    res = preference.verify(ctx, base, base, [Q1, Q2], 0, log=lambda *_: None)
    correct = [[True, False, False], [True, False, True]]
    answers = [["d", "x", "x"], ["e", "z", "e"]]
    want = accuracy_vs_k(correct, [fixed["likelihood"][:3], fixed["likelihood"][3:]], answers)
    assert res["best_of_k"] == res["best_of_k_likelihood"] == want["best_of_k"]
    assert res["best_of_k"][-1] == 0.5 and res["best_of_k"][0] == pytest.approx(0.5)  # all 3: Q1 right, Q2 wrong
    assert res["best_of_k_ratio"][-1] == 0.0  # by the ratio, the top picks are Q1's "x" and Q2's "z": both wrong
    assert res["majority_vote"] == want["majority_vote"] and res["pass_at_k"][-1] == 1.0 and res["pairs"] == 0


# ---------------------------------------------------------------------------------------------- CPO


@pytest.mark.parametrize("self_eval", ["likelihood", "agreement"])
def test_cpo_searches_with_the_real_sampler_and_pairs_carry_their_prefix_steps(self_eval):
    qs = tiny_qs()
    ctx = method_ctx("cpo", temperature=1.0, beam=1, proposals=4, self_eval=self_eval, rollouts=2)
    ctx.rules["cot"] = dataclasses.replace(ctx.rules["cot"], max_rationale=4)
    s = preference.StepSearch(ctx, qs, Q1, seed=3)
    t = tree.search(s.propose, s.evaluate, s.is_final, beam=1, n=4, max_depth=5)
    path = tree.winning_path(t)
    assert path is not None and s.is_final(path[-1].step) and len(t.nodes) > len(path) + 1
    assert all(not s.is_final(n.step) and len(n.step) == 1 for n in path[:-1])  # one chain token a step
    assert sum(len(n.step) for n in path[:-1]) + path[-1].step.index(qs.end_token_id) <= 4  # the rationale cap
    pairs, skipped = tree.preference_pairs(t, path)
    assert pairs
    for p in pairs:
        assert len(p.prefix) == p.depth - 1 and p.chosen != p.rejected
        assert list(s.ids(p.prefix)) == s.root + [tok for step in p.prefix for tok in step]
    deep = [p for p in pairs if p.depth > 1]
    if deep:  # a later step's prompt is the question, <start>, and the chain so far
        assert len(s.ids(deep[0].prefix)) > len(s.root) and s.root[-1] == qs.start_token_id
    # collect_cpo turns them into DPO pairs with those prompts
    ctx.ex.beam, ctx.ex.proposals = 1, 4
    skips = Skips()
    out, stats = preference.collect_cpo(ctx, qs, [Q1], 1, 3, skips)
    assert stats["pairs"] == len(out) > 0 and stats["nodes"] > 0
    for p in out:
        assert p.prompt_ids[:len(s.root)] == s.root and len(p.prompt_ids) == len(s.root) + p.meta["depth"] - 1


def test_cpo_answer_check_scores_by_the_gold_and_agreement_by_the_majority(monkeypatch):
    """self_eval=answer: a finished chain scores 1 / 0 by whether its answer is the gold one, a partial chain by
    the share of its rollouts that reach the gold; agreement scores the same rollouts against the model's own
    majority answer instead; a question without a gold answer leaves every node unscored."""
    qs = tiny_qs()
    end, stop = qs.end_token_id, TOK.encode(" ")[0]
    finished = lambda answer: tuple(TOK.encode("ab.")) + (end,) + tuple(TOK.encode(answer)) + (stop,)
    root = [comp("ab.", a) for a in ("x", "x", "x", "d")]  # the model's majority answer is "x"; the gold is "d"
    rolled = [comp("b.", a) for a in ("d", "x", "d", "d")]  # 3 of 4 reach the gold, 1 of 4 the majority

    def scripted_sample(self, prefixes, n, max_tokens, temperature):
        return [list(root if p == () else rolled)[:n] for p in prefixes]

    monkeypatch.setattr(preference.StepSearch, "_sample", scripted_sample)
    paths = [(finished("d"),), (finished("x"),), (tuple(TOK.encode("a")),)]
    got = {}
    for how in ("answer", "agreement"):
        ctx = method_ctx("cpo", beam=1, proposals=3, temperature=1.0, self_eval=how, rollouts=4)
        got[how] = preference.StepSearch(ctx, qs, Q1, seed=0).evaluate(paths)
    assert got["answer"] == [1.0, 0.0, 0.75]
    assert got["agreement"] == [0.0, 1.0, 0.25]
    ctx = method_ctx("cpo", beam=1, proposals=3, temperature=1.0, self_eval="answer", rollouts=4)
    no_gold = dataclasses.replace(Q1, gold=None)
    assert preference.StepSearch(ctx, qs, no_gold, seed=0).evaluate(paths) == [None, None, None]


def test_cpo_counts_an_unparseable_self_evaluation():
    qs, ctx = tiny_qs(), method_ctx("cpo", beam=1, proposals=3, temperature=1.0)
    s = preference.StepSearch(ctx, qs, Q2, seed=0)
    t = tree.search(s.propose, lambda paths: [None] * len(paths), s.is_final, beam=1, n=3, max_depth=5)
    pairs, skipped = tree.preference_pairs(t, tree.winning_path(t))
    assert pairs == [] and skipped["no_path"] == 1 and t.n_unscored > 0
    assert preference.SEARCH_SKIPS["unscored"] == "judge output could not be parsed"


def _search(ctx, qs, q=Q1, seed=5):
    s = preference.StepSearch(ctx, qs, q, seed=seed)
    return s, tree.search(s.propose, s.evaluate, s.is_final, beam=ctx.ex.beam, n=ctx.ex.proposals, max_depth=5)


def test_cpo_step_filter_drops_proposals_that_are_not_chain_symbols():
    qs = tiny_qs()
    kw = dict(temperature=1.0, propose_temperature=3.0, beam=2, proposals=6, self_eval="likelihood")
    letters = [TOK.encode(ch)[0] for ch in "abcdefg"]
    assert method_ctx("cpo", **kw).step_alphabet == set(letters)  # the default corpus's 7 map letters
    found = {}
    for on in (False, True):
        ctx = method_ctx("cpo", step_filter=on, **kw)
        ctx.rules["cot"] = dataclasses.replace(ctx.rules["cot"], max_rationale=3)
        s, t = _search(ctx, qs)
        found[on] = [n.step for n in t.nodes[1:]]
        assert (s.malformed > 0) == on  # a random model at temperature 3 proposes bytes that are no symbol
        assert all(s.well_formed(step) for step in found[on]) == on
    # the step itself: chain symbols; a final step's answer a symbol, not empty
    s, E, sp = preference.StepSearch(method_ctx("cpo"), qs, Q1, 0), qs.end_token_id, TOK.encode(" ")[0]
    a, d, junk = letters[0], letters[3], TOK.encode("#")[0]
    assert s.well_formed((a,)) and s.well_formed((a, E, d, sp)) and s.well_formed((E, d))
    assert not s.well_formed((junk,)) and not s.well_formed((a, E, sp)) and not s.well_formed((a, E, junk, sp))


def test_cpo_proposes_at_its_own_temperature_and_reports_pairs_per_question():
    qs = tiny_qs()
    for propose_t, want_more_than_one in ((None, False), (2.0, True)):
        # greedy sampling everywhere else: at temperature 0 the n proposals are the same step, merged into one
        ctx = method_ctx("cpo", temperature=0.0, propose_temperature=propose_t, beam=1, proposals=5,
                         self_eval="likelihood")
        ctx.rules["cot"] = dataclasses.replace(ctx.rules["cot"], max_rationale=3)
        _, t = _search(ctx, qs)
        assert (len(t.nodes[0].children) > 1) == want_more_than_one
    ctx.ex.pair_kept_siblings = True
    out, stats = preference.collect_cpo(ctx, qs, [Q1, Q2], 1, 3, Skips())
    per_q = [sum(p.meta["question_id"] == q.id for p in out) for q in (Q1, Q2)]
    assert stats["pairs"] == len(out) > 0 and stats["pairs_per_question"] == len(out) / 2
    assert stats["questions_with_pairs"] == sum(n > 0 for n in per_q) and stats["max_pairs_per_question"] == max(per_q)
    assert stats["malformed_steps"] == 0  # the filter is off
    assert {p.meta["depth"] for p in out} == set(range(1, max(p.meta["depth"] for p in out) + 1))  # every level


# ---------------------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("method", ["vstar", "tpo", "tpo/choice", "cpo", "cpo/dpo"])
def test_one_round_of_each_preference_method_end_to_end_through_the_config(tmp_path, method):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf
    from test_learn_to_think import ROOT, TOY

    from quietstar import train as train_script
    from quietstar.methods.registry import register_configs
    from quietstar.methods.registry import run_recipe

    method, _, variant = method.partition("/")
    loss, judge = (variant, "") if variant in ("dpo", "rpo", "ipo", "simpo") else ("", variant)
    GlobalHydra.instance().clear()
    register_configs()
    overrides = [f"explicit={method}", *TOY[1:], "learn_to_think.pretrain_steps=80", "learn_to_think.pretrain_lr=1e-2",
                 "learn_to_think.pretrain_warmup=5", "explicit.train_questions=16", "explicit.val_questions=8",
                 "explicit.eval_questions=8", "explicit.steps=2", "explicit.batch_size=4", "explicit.iterations=1",
                 "explicit.verifier_steps=2", "explicit.best_of_n=4", "explicit.eval_samples=2", "train.threads=null"]
    if loss:
        overrides += [f"explicit.loss={loss}", "explicit.nll_weight=0.5"]
    if judge:
        overrides += [f"explicit.judge={judge}"]
    if method == "vstar":  # a toy model trained longer, whose chains are right often enough for verifier pairs
        overrides += ["explicit.temperature=1.0", "explicit.train_questions=48", "learn_to_think.pretrain_steps=300"]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        node = compose(config_name="train", overrides=overrides)
    GlobalHydra.instance().clear()
    node.output_dir = str(tmp_path)
    cfg = OmegaConf.to_object(node)
    assert cfg.recipe == "explicit" and cfg.explicit.method == method
    summary = run_recipe(cfg, train_script.train)
    res = json.loads((tmp_path / "results.json").read_text())
    assert [r["round"] for r in res["rounds"]] == [0, 1] and summary.status == "done"
    r1 = res["rounds"][1]
    assert r1["from_round"] == 0 and res["seed"] == cfg.train.seed and res["optim"]["lr"] == cfg.optim.lr
    data = Path(r1["dataset"])
    assert data.name == ("sft.jsonl" if method == "vstar" else "pairs.jsonl")
    lines = [json.loads(x) for x in data.read_text().splitlines()]
    assert len(lines) == r1["examples"]
    for x in lines:
        assert x["meta"]["method"] == ("star" if method == "vstar" else method) and x["meta"]["iteration"] == 1
        if method != "vstar":
            assert x["chosen_ids"] != x["rejected_ids"]
    if method != "vstar" and lines:
        assert r1["loss_last"] is not None  # DPO ran
        # the first step's model is its reference: DPO's loss is log 2; RPO's adds the chosen side's NLL
        loss = loss or {"tpo": "rpo", "cpo": "rpo"}[method]  # the presets' losses (chosen on validation)
        assert res["settings"]["loss"] == loss
        if loss == "rpo":
            assert r1["loss_first"] > math.log(2) + 0.1
        else:
            assert r1["loss_first"] == pytest.approx(math.log(2), abs=1e-5)
    assert 0 <= r1["eval"]["sampled"]["acc"] <= 1 and r1["eval"]["sampled"]["n"] == 16
    assert lines or method == "vstar"  # a round with pairs to train on
    if method == "tpo":  # the corpus's questions carry their chains: every pair is classified
        st = r1["stats"]
        assert st["pairs_with_chains"] == st["pairs"] == len(lines) and all(len(x["meta"]["kinds"]) == 2 for x in lines)
        assert sum(st[f"chosen_{k}_share"] for k in ("chain", "decoy", "other")) == pytest.approx(1.0)
        assert ("judge_ranked" in st) == (judge == "choice")  # a model judge is measured against the answer check
    if method == "vstar":
        v = res["verifier"]
        assert v["n"] == 4 and len(v["best_of_k"]) == len(v["majority_vote"]) == len(v["pass_at_k"]) == 4
        assert all(0 <= a <= b + 1e-12 for a, b in zip(v["best_of_k"], v["pass_at_k"]))  # never above pass@k
        assert v["pairs"] == r1["stats"]["verifier_pairs"] > 0 and v["loss_last"] is not None  # the verifier trained
