"""GSM8K as a task of the explicit loop (quietstar/methods/explicit/tasks.py: gsm8k_splits, gsm8k_worked, gsm8k_stop_rule):
the splits of a small jsonl written here (validation carved from train, the held-out split test's first
problems, the worked examples never asked), the prompt, the final-answer marker and the answer check, and
one round of STaR, TPO and Constitutional AI end to end through the config on a tiny random model."""

import json
from pathlib import Path

import pytest
import torch

from quietstar.errors import UserError
from quietstar.methods.explicit.judge import AnswerCheck
from quietstar.methods.explicit.tasks import (GSM8K_MARK, GSM8K_SHOTS, gsm8k_splits, gsm8k_stop_rule, gsm8k_worked,
                                              normalise_answer)
from test_explicit import TOK, comp, tiny_qs

pytestmark = pytest.mark.usefixtures("one_thread")


def write_gsm8k(root: Path, n_train: int = 16, n_test: int = 5) -> Path:
    """train.jsonl and test.jsonl of short made-up problems in GSM8K's format (steps with calculator
    annotations, "#### <n>"); problem i of a split has the answer i + 2 (test: i + 100)."""
    root.mkdir(parents=True, exist_ok=True)
    for name, n, off in (("train", n_train, 2), ("test", n_test, 100)):
        with open(root / f"{name}.jsonl", "w") as f:
            for i in range(n):
                a = i + off
                f.write(json.dumps({"question": f"{name} {i}: Tom has {a - 1} pens and gets 1. How many?",
                                    "answer": f"He has {a - 1}+1 = <<{a - 1}+1={a}>>{a} pens.\n#### {a:,}"}) + "\n")
    return root


def test_the_splits_carve_validation_from_train_and_hold_out_tests_first_problems(tmp_path):
    root = write_gsm8k(tmp_path / "gsm8k")
    train, val, held = gsm8k_splits(root / "train.jsonl", root / "test.jsonl", 4, 3, 2)
    assert [q.id for q in train] == [f"gsm8k/{i}" for i in (1, 2, 3, 4)]  # train.jsonl's first problems
    assert [q.id for q in val] == [f"gsm8k/{i}" for i in (6, 7, 8)]  # the 3 before the last GSM8K_SHOTS
    assert [q.query.split(":")[1] for q in held] == [" test 0", " test 1"] and [q.gold for q in held] == ["100", "101"]
    assert all(q.query.startswith("Q: train ") for q in train + val)  # never a test problem outside held-out
    assert [q.gold for q in train] == ["2", "3", "4", "5"] and all(q.kind == "gsm8k" for q in train + val + held)
    q = train[0]
    assert q.prompt() == "Q: train 0: Tom has 1 pens and gets 1. How many?\nA: Let's think step by step."
    # the worked examples: the last GSM8K_SHOTS training problems, annotations removed, marked answer
    assert len(q.examples) == GSM8K_SHOTS and q.examples[0] == (
        "Q: train 8: Tom has 9 pens and gets 1. How many?\nA: Let's think step by step. He has 9+1 = 10 pens."
        f"{GSM8K_MARK} 10\n\n")
    assert q.prompt(few_shot=2) == q.examples[0] + q.examples[1] + q.query
    assert q.prompt(hint=True) == "(The answer is 2.)\n" + q.query  # STaR's rationalisation hint
    asked = {x.query for x in train + val}
    assert not any(e.split("\nA:")[0] in asked for e in q.examples)  # a worked example is never asked
    with pytest.raises(UserError, match=r"train.jsonl: 16 problems, the GSM8K task needs 17"):
        gsm8k_splits(root / "train.jsonl", root / "test.jsonl", 6, 3, 2)


def test_the_rationale_ends_at_the_final_answer_marker_and_the_answer_is_its_integer(tmp_path):
    rule = gsm8k_stop_rule(TOK, 32)
    assert rule.rationale_stop == TOK.encode("#") and rule.max_rationale == 32  # bytes: the marker's first token
    assert set(rule.answer_stop) == {TOK.encode("\n")[0], TOK.eos_id}
    assert gsm8k_stop_rule(TOK, 32, rationale=False).max_rationale == 0
    check = AnswerCheck()
    root = write_gsm8k(tmp_path)
    q = gsm8k_splits(root / "train.jsonl", root / "test.jsonl", 1, 1, 1)[0][0]  # gold 2
    assert check.score(q, comp("1 + 1 = 2 pens.", " 2")).value == 1.0
    assert check.score(q, comp("1 + 1 = 2", " 3 pens, not 2")).value == 0.0  # the first integer after the marker
    assert check.score(q, comp("2", " none")).reason == "no answer"
    assert normalise_answer(" 1,234.", "gsm8k") == "1234"


def test_a_subword_tokenizers_marker_is_one_token_with_or_without_its_space(smollm2):
    _, tok = smollm2
    rule = gsm8k_stop_rule(tok, 8)
    assert [tok.decode([t]) for t in rule.rationale_stop] == [" ####", "####"]
    assert tok.encode("\n", add_bos=False)[0] in rule.answer_stop and tok.eos_id in rule.answer_stop


def test_the_shared_gsm8k_splits(shared_data):
    root = shared_data / "gsm8k"
    train, val, held = gsm8k_splits(root / "train.jsonl", root / "test.jsonl", 1024, 256, 512)
    assert (len(train), len(val), len(held)) == (1024, 256, 512)
    assert all(q.gold is not None for q in train + val + held)
    test_text = {json.loads(x)["question"] for x in (root / "test.jsonl").read_text().splitlines() if x.strip()}
    assert not any(q.query[3:].split("\nA:")[0] in test_text for q in train + val)
    assert "<<" not in "".join(train[0].examples) and train[0].examples[0].count(GSM8K_MARK) == 1


@pytest.mark.parametrize("method", ["star", "tpo", "cai"])
def test_one_round_of_a_method_on_gsm8k_end_to_end_through_the_config(tmp_path, monkeypatch, method):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf
    from test_learn_to_think import ROOT, TOY

    from quietstar import train as train_script
    from quietstar.methods.registry import register_configs
    from quietstar.methods.explicit import constitutional as cai
    from quietstar.methods.explicit import loop
    from quietstar.methods.registry import run_recipe

    root = write_gsm8k(tmp_path / "data" / "gsm8k", n_train=24, n_test=6)
    loaded = []
    # a tiny random model stands in for the pretrained one (its loading is loading.load_pretrained's)
    monkeypatch.setattr(loop, "_pretrained", lambda cfg, name, device: loaded.append(name) or (name, tiny_qs(0)))
    if method == "cai":  # the tiny model's critiques are noise: a missing verdict is scripted as "violates"
        parse = cai.parse_critique
        monkeypatch.setattr(cai, "parse_critique", lambda t: parse(t) if parse(t)[0] else ("violates", ""))
    GlobalHydra.instance().clear()
    register_configs()
    overrides = [f"explicit={method}", *TOY[1:], "explicit.task=gsm8k", f"explicit.gsm8k_dir={root}",
                 "explicit.base=tiny-gsm8k", "explicit.train_questions=8", "explicit.val_questions=4",
                 "explicit.eval_questions=4", "explicit.steps=2", "explicit.batch_size=4", "explicit.iterations=1",
                 "explicit.rationale_tokens=12", "explicit.eval_samples=0", "explicit.keep_checkpoints=false",
                 "explicit.few_shot=1", "train.threads=null"]
    if method == "tpo":
        overrides += ["explicit.judge=choice", "explicit.judge_shots=1"]
    if method == "cai":
        overrides += ["explicit.iterations=2", "explicit.cai_shots=0", "explicit.cai_critique_tokens=8"]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        node = compose(config_name="train", overrides=overrides)
    GlobalHydra.instance().clear()
    node.output_dir = str(tmp_path / "run")
    cfg = OmegaConf.to_object(node)
    summary = run_recipe(cfg, train_script.train)
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert loaded == ["tiny-gsm8k"] and summary.status == "done" and res["task"] == "gsm8k"
    assert res["questions"]["train"] == 8 and res["questions"]["val"] == 4 and res["questions"]["eval"] == 4
    assert "test.jsonl" in res["questions"]["eval_split"]
    for r in res["rounds"]:
        assert r["eval"]["cot"]["n"] == 4 and 0 <= r["eval"]["cot"]["acc"] <= 1
        ex = r["eval"]["cot"]["examples"][0]
        assert ex["question"].startswith("Q: test 0:") and ex["gold"] == "100"
        assert "#" not in ex["rationale"]  # the rationale ends where the marker is sampled
    last = res["rounds"][-1]
    lines = [json.loads(x) for x in Path(last["dataset"]).read_text().splitlines()]
    assert len(lines) == last["examples"]
    if method != "star":  # star: the random model's answers are rarely right, its data may be empty
        assert lines and last["loss_last"] is not None
    for x in lines:
        prompt = TOK.decode(x["prompt_ids"])
        assert prompt.startswith("Q: train ") and prompt.endswith("\nA: Let's think step by step.")
    if method == "tpo":
        assert "judge_ranked" in last["stats"] and "pairs_with_chains" not in last["stats"]  # no chains on GSM8K
    if method == "cai":
        principles = set(cai.GSM8K_PRINCIPLES)
        sl = [json.loads(x) for x in Path(res["rounds"][1]["dataset"]).read_text().splitlines()]
        assert all(x["meta"]["principle"] in principles for x in sl + lines)
