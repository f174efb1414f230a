"""Constitutional AI on the explicit loop (quietstar/methods/explicit/constitutional.py), on tiny random models: the
multiple-choice label against a hand computation from the full logits, the supervised stage with a scripted
critic and reviser (what it trains on, what it skips), the AI-feedback stage with a scripted labeller (which
side is chosen, the pair's weight, the dropped pairs), the weighted preference loss, the worked examples and
principles per task, and one supervised and one feedback round end to end through the config."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from quietstar.methods.explicit import constitutional as cai
from quietstar.methods.explicit.dataset import Skips
from quietstar.methods.explicit.losses import PreferenceLoss
from quietstar.methods.explicit.tasks import Question
from quietstar.seeds import derive_seed
from test_explicit import TOK, comp, method_ctx, scripted, tiny_qs

pytestmark = pytest.mark.usefixtures("one_thread")

# a document's question with worked neighbours: a right chain, a decoy (never shown as a good one), another right one
QA = Question("train/0/0", "a3=", "d", "!#$\n", ["b1=-bc.c ", "e2=-eee.b ", "f2=-fab.b "], "a3=d ", 3)
QB = Question("train/0/1", "c1=", "g", "!#$\n", ["b1=-bc.c "], "c1=g ", 1)
QC = Question("train/0/2", "d2=", "a", "!#$\n", [], "d2=a ", 2)
QD = Question("train/0/3", "e1=", "b", "!#$\n", [], "e1=b ", 1)


# ---------------------------------------------------------------------------------------------- the label


def test_the_soft_label_is_the_two_option_probabilities_renormalised():
    # by hand: logits (2.0, 0.5) -> p(A) = e^2 / (e^2 + e^0.5) = sigmoid(1.5)
    p = cai.soft_label(torch.tensor([[2.0, 0.5], [-1.0, 3.0], [0.0, 0.0]]))
    assert p.tolist() == pytest.approx([1 / (1 + math.exp(-1.5)), 1 / (1 + math.exp(4.0)), 0.5], abs=1e-12)
    # on a model: the option logits at the position after each prompt (prompts of different lengths, padded)
    # are the full forward's logits there, and p(A) is p_full(A) / (p_full(A) + p_full(B))
    qs = tiny_qs(0, torch.float64)
    prompts = ["!#$\n(A) a3=-afcd.d\n(B) a3=-aaaa.d\nBetter: (", "x\nBetter: ("]
    ids = cai.option_ids(TOK)
    assert ids == [TOK.encode("A")[0], TOK.encode("B")[0]]
    got = cai.option_logits(qs, TOK, prompts, ids)
    for row, text in zip(got, prompts):
        with torch.no_grad():
            full = qs.model(torch.tensor([[TOK.bos_id] + TOK.encode(text)] if TOK.bos_id is not None else
                                         [TOK.encode(text)]))[0, -1].double()
        torch.testing.assert_close(row.double(), full[ids], rtol=1e-5, atol=1e-5)
        probs = torch.softmax(full, -1)
        want = probs[ids[0]] / (probs[ids[0]] + probs[ids[1]])
        assert float(cai.soft_label(row[None])[0]) == pytest.approx(float(want), abs=1e-6)


def test_both_orders_are_asked_and_averaged(monkeypatch):
    ctx = method_ctx("cai", k=2)
    cai._constitution(ctx)
    calls = []

    def fake(qs, tok, prompts, options, batch_rows=64):
        calls.append(list(prompts))
        return torch.tensor([[1.0, 0.0]] if len(calls) == 1 else [[0.0, 2.0]])  # p(A) = s(1), then s(-2)
    monkeypatch.setattr(cai, "option_logits", fake)
    (p1, p2), = cai.preference_probs(ctx, None, [QA], ["the answer is the chain's last symbol"],
                                     [("a3=-afcd.d", "a3=-afcd.a")], [[]])
    assert calls[0][0].endswith("(A) a3=-afcd.d\n(B) a3=-afcd.a\nBetter: (")
    assert calls[1][0].endswith("(A) a3=-afcd.a\n(B) a3=-afcd.d\nBetter: (")  # swapped: b asked as (A)
    s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert p1 == pytest.approx(s(1.0)) and p2 == pytest.approx(1 - s(-2.0))  # both: the chance a is better


# ---------------------------------------------------------------------------------------------- the stages


def test_the_supervised_stage_trains_on_revisions_and_counts_what_it_cannot_parse(capsys):
    qs, ctx = tiny_qs(), method_ctx("cai", cai_shots=2)
    seen = scripted(ctx, [
        [[comp("aaaa", "a", 1)], [comp("cg", "g", 2)], [comp("dx", "x", 3)], [comp("eb", "b", 4)]],  # responses
        [[comp("", " the chain aaaa repeats a: violates")], [comp("", "   ")],  # critiques: QB's is empty,
         [comp("", "looks fine to me")], [comp("", "the chain eb ends with b: follows")]],  # QC's has no verdict
        [[comp("afcd", "d", 5)], [comp("", "b", 6)]],  # revisions of QA (fixed) and QD (no chain)
    ])
    skips = Skips()
    out, stats = cai.collect_revisions(ctx, qs, [QA, QB, QC, QD], 1, 7, skips)
    assert skips.as_dict() == {"empty critique": 1, "critique has no verdict": 1, "revision has no chain": 1}
    # what the model wrote instead of a verdict is shown, so that a round with nothing to train on can be read
    assert "round 1: 2 of 4 critiques have no verdict; the first: '   '" in capsys.readouterr().out
    assert skips.examples["empty critique"] == [QB.id] and skips.examples["revision has no chain"] == [QD.id]
    assert stats == {"critiques_violates": 1, "critiques_follows": 1, "revisions_changed": 1, "revisions_correct": 1,
                     "revisions_fixed": 1, "revisions_broke": 0, "responses_correct": 2, "revisions": 1}
    (e,) = out  # trained on the question alone, then the revision: no principle, critique or response in it
    assert TOK.decode(e.prompt_ids) == QA.prompt() and e.prompt_ids[-1] == qs.start_token_id
    assert e.completion_ids == TOK.encode("afcd") + [qs.end_token_id] + TOK.encode("d ")
    principle = ctx.constitution.draw(QA, derive_seed(7, "cai principle", 0))
    assert e.meta["principle"] == principle and e.meta["verdict"] == "violates" and e.meta["stage"] == "supervised"
    assert e.meta["critique"] == "the chain aaaa repeats a: violates" and e.meta["scores"] == {"response": 0.0,
                                                                                               "revision": 1.0}
    # the critic read the response as the corpus writes it, after worked critiques of the same principle
    crit_prompt = seen[1][0]
    assert crit_prompt.startswith(f"!#$\nPrinciple: {principle}\n") and crit_prompt.endswith(
        "Response: a3=-aaaa.a\nCritique:")
    assert crit_prompt.count("Critique:") == 3 and "e2=-eee.b" not in crit_prompt  # 2 shots; the decoy never shown
    # only the parsed critiques are revised; the reviser reads the critique, then writes after the query
    assert seen[2] == [crit_prompt + " the chain aaaa repeats a: violates\nRevision: a3=",
                       seen[1][3] + " the chain eb ends with b: follows\nRevision: e1="]


def test_the_principle_is_drawn_by_the_seed_from_the_tasks_list():
    con = cai.Constitution()
    drawn = [con.draw(QA, derive_seed(s, "cai principle", 0)) for s in range(40)]
    assert set(drawn) == set(cai.REASONING_PRINCIPLES["lookup"]) and drawn == [
        con.draw(QA, derive_seed(s, "cai principle", 0)) for s in range(40)]
    state = Question("train/1/0", "4712=", "4", "", ["93=-92.2 "])
    assert con.principles(state) == cai.REASONING_PRINCIPLES["state"]
    gsm = Question("gsm8k/3", "Q: Tim has 5 pens and buys 2 more. How many pens?\nA: Let's think step by step.", "7",
                   kind="gsm8k")
    for p in cai.GSM8K_PRINCIPLES:  # the steps' principles, with a violating and a following worked critique each
        shots = con.examples(gsm, p, 2)
        assert [e.violates for e in shots] == [True, False]
        assert [cai.parse_critique(e.critique)[0] for e in shots] == ["violates", "follows"]
        text = cai.critique_prompt(gsm, p, shots, con.render(gsm, comp("5 + 2 = 7 pens.", "7")), con)
        assert text.endswith(f"{gsm.query}\nResponse: 5 + 2 = 7 pens. #### 7\nCritique:")
    # the reasoning corpus' worked critiques: the decoy repeated first step, an answer that is not the last symbol
    steps, answer = (con.examples(QA, p, 2) for p in cai.REASONING_PRINCIPLES["lookup"])
    assert steps[0].response == "b1=-bb.c" and answer[0].response == "b1=-bc.b" and steps[0].revision == "b1=-bc.c"
    assert steps[1].response == steps[1].revision == "f2=-fab.b"
    assert cai.parse_critique("it follows, but also violates") == ("follows", "")
    assert cai.parse_critique("unfollowsome") == (None, "critique has no verdict")


def test_the_feedback_stage_orients_and_weights_each_pair_by_its_soft_label(monkeypatch):
    qs, ctx = tiny_qs(), method_ctx("cai", k=3, cai_min_confidence=0.3)
    ctx.base = qs
    scripted(ctx, [[[comp("afcd", "d", 1), comp("afcd", "d", 2), comp("aaaa", "a", 3)],  # QA: samples 0 and 2
                    [comp("cg", "g", 4), comp("cx", "x", 5), comp("cy", "y", 6)],  # QB: 0 and 1
                    [comp("dq", "q", 7), comp("dr", "r", 8), comp("ds", "s", 9)],  # QC: 0 and 1
                    [comp("eb", "b", 1), comp("eb", "b", 2), comp("eb", "", 3)]]])  # QD: one distinct answer
    # per pair, the logits of (A, B) asked as (a, b), then as (b, a): p(a better) = (s(x1) + 1 - s(x2)) / 2
    logits = iter([torch.tensor([[0.0, 3.0], [2.0, 0.0], [0.1, 0.0]]),
                   torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.0, 0.1]])])
    monkeypatch.setattr(cai, "option_logits", lambda *a, **k: next(logits))
    skips = Skips()
    pairs, stats = cai.collect_feedback(ctx, qs, [QA, QB, QC, QD], 2, 0, skips)
    s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    pa, pb = (s(-3.0) + 1 - s(2.0)) / 2, (s(2.0) + 1 - s(-2.0)) / 2  # QA: b preferred; QB: a preferred
    assert skips.as_dict() == {"empty generation": 1, "fewer than two distinct responses": 1}
    assert [p.meta["question_id"] for p in pairs] == [QA.id, QB.id]  # QC's label is near 0.5: dropped
    qa, qb = pairs
    assert qa.chosen_ids == TOK.encode("aaaa") + [qs.end_token_id] + TOK.encode("a ")  # the labeller preferred b
    assert qa.meta["samples"] == [2, 0] and qa.weight == pytest.approx(abs(2 * pa - 1))
    assert qa.meta["p_chosen"] == pytest.approx(1 - pa) and qa.meta["p_orders"] == pytest.approx([s(-3.0), 1 - s(2.0)])
    assert qb.chosen_ids == TOK.encode("cg") + [qs.end_token_id] + TOK.encode("g ") and qb.meta["samples"] == [0, 1]
    assert qb.weight == pytest.approx(abs(2 * pb - 1)) and qb.meta["p_chosen"] == pytest.approx(pb)
    # the answer check never chooses, and the label's agreement with it is reported: QA (b wrong, chosen) no,
    # QB (a right, chosen) yes, QC (both wrong) not checkable
    assert stats["checkable_pairs"] == 2 and stats["label_agrees_with_answer_check"] == 1
    assert stats["low_confidence"] == 1 and stats["pairs"] == 2 and stats["labelled"] == 3
    assert stats["orders_agree"] == 3
    # hard labels: the same pairs, each weighing 1
    ctx.ex.cai_soft_label = "hard"
    scripted(ctx, [[[comp("afcd", "d", 1), comp("aaaa", "a", 3)], [comp("cg", "g", 4), comp("cx", "x", 5)]]])
    logits = iter([torch.tensor([[0.0, 3.0], [2.0, 0.0]]), torch.tensor([[2.0, 0.0], [0.0, 2.0]])])
    hard, _ = cai.collect_feedback(ctx, qs, [QA, QB], 2, 0, Skips())
    assert [p.weight for p in hard] == [1.0, 1.0] and [p.chosen_ids for p in hard] == [qa.chosen_ids, qb.chosen_ids]


def test_a_pairs_weight_scales_its_term_of_each_preference_loss():
    torch.manual_seed(0)
    s, n = torch.randn(6, dtype=torch.float64), torch.tensor([3.0, 4, 5, 2, 6, 3], dtype=torch.float64)
    ref, w = torch.randn(3, 2, dtype=torch.float64), torch.tensor([0.2, 1.0, 0.5], dtype=torch.float64)
    for kind in ("dpo", "rpo", "ipo", "simpo"):
        spec = PreferenceLoss(kind, beta=0.3, nll_weight=0.7, gamma=0.4)
        r = ref if spec.needs_reference else None
        per_pair = torch.stack([spec.value(s[[i, 3 + i]], n[[i, 3 + i]], None if r is None else r[i:i + 1])[0]
                                for i in range(3)])
        got, _ = spec.value(s, n, r, w)
        assert float(got) == pytest.approx(float((w * per_pair).mean()), abs=1e-12)
        assert float(spec.value(s, n, r)[0]) == pytest.approx(float(per_pair.mean()), abs=1e-12)
        assert abs(float(got) - float(per_pair.mean())) > 1e-3
    assert float(PreferenceLoss("dpo").value(s, n, ref, torch.zeros(3))[0]) == 0.0
    assert F.logsigmoid(torch.zeros(1)).item() == pytest.approx(-math.log(2))


def test_the_options_are_checked():
    from quietstar.errors import ConfigError
    from quietstar.methods.explicit.config import ExplicitConfig

    with pytest.raises(ConfigError, match="explicit.k"):
        ExplicitConfig(method="cai", iterations=2, cai_sl_rounds=1, k=1)
    assert ExplicitConfig(method="cai", iterations=1, cai_sl_rounds=1, k=1).k == 1  # the supervised stage only
    for field, bad in (("cai_labeller", "judge"), ("cai_soft_label", "soft"), ("cai_min_confidence", 1.5),
                       ("cai_shots", -1), ("cai_critique_tokens", 0)):
        with pytest.raises(ConfigError, match=f"explicit.{field}"):
            ExplicitConfig(method="cai", k=2, **{field: bad})


# ---------------------------------------------------------------------------------------------- end to end


def test_a_supervised_and_a_feedback_round_end_to_end_through_the_config(tmp_path, monkeypatch):
    """explicit=cai on the toy reasoning setup: round 1 SFT on revisions, round 2 the labelled pairs. The toy
    model's critiques are its own text; where one has no verdict, the critic's verdict is scripted ("violates")
    so that its revision is still written by the model and trained on."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf
    from test_learn_to_think import ROOT, TOY

    from quietstar import train as train_script
    from quietstar.methods.registry import register_configs
    from quietstar.methods.registry import run_recipe

    parse, written = cai.parse_critique, []

    def critic(text):
        written.append(text)
        verdict, why = parse(text)
        return (verdict, why) if verdict else ("violates", "")
    monkeypatch.setattr(cai, "parse_critique", critic)
    GlobalHydra.instance().clear()
    register_configs()
    overrides = ["explicit=cai", *TOY[1:], "learn_to_think.pretrain_steps=80", "learn_to_think.pretrain_lr=1e-2",
                 "learn_to_think.pretrain_warmup=5", "explicit.train_questions=16", "explicit.val_questions=8",
                 "explicit.eval_questions=8", "explicit.steps=2", "explicit.batch_size=4", "explicit.eval_samples=0",
                 "explicit.cai_critique_tokens=8", "explicit.keep_checkpoints=false", "train.threads=null"]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        node = compose(config_name="train", overrides=overrides)
    GlobalHydra.instance().clear()
    node.output_dir = str(tmp_path)
    cfg = OmegaConf.to_object(node)
    assert cfg.explicit.method == "cai" and cfg.explicit.cai_sl_rounds == 1 and cfg.explicit.iterations == 2
    summary = run_recipe(cfg, train_script.train)
    res = json.loads((tmp_path / "results.json").read_text())
    assert [r["round"] for r in res["rounds"]] == [0, 1, 2] and summary.status == "done"
    sl, fb = res["rounds"][1], res["rounds"][2]
    assert len(written) == 16 and all(len(t) <= 8 for t in written)  # one critique per question, 8 bytes at most
    assert Path(sl["dataset"]).name == "sft.jsonl" and Path(fb["dataset"]).name == "pairs.jsonl"
    revisions = [json.loads(x) for x in Path(sl["dataset"]).read_text().splitlines()]
    assert len(revisions) == sl["examples"] == sl["stats"]["revisions"] > 0 and sl["loss_last"] is not None
    assert sum(sl["skips"].values()) + len(revisions) == 16  # every question trained on or counted
    principles = set(cai.REASONING_PRINCIPLES["lookup"])
    for x in revisions:
        assert x["meta"]["stage"] == "supervised" and x["meta"]["principle"] in principles
        assert x["meta"]["critique"] in [t.strip() for t in written]
    pairs = [json.loads(x) for x in Path(fb["dataset"]).read_text().splitlines()]
    assert len(pairs) == fb["examples"] == fb["stats"]["pairs"] > 0 and fb["from_round"] == 1
    for x in pairs:
        assert x["meta"]["stage"] == "feedback" and x["chosen_ids"] != x["rejected_ids"]
        p = x["meta"]["p_chosen"]
        assert 0.5 <= p <= 1 and x["weight"] == pytest.approx(2 * p - 1)  # the chosen side is the preferred one
    # the first step's model is its reference: each pair's DPO term is log 2, scaled by its weight (<= 1)
    assert fb["loss_first"] is not None and 0 <= fb["loss_first"] <= math.log(2) + 1e-6
    assert res["settings"]["cai_soft_label"] == "weight" and 0 <= fb["eval"]["cot"]["acc"] <= 1
