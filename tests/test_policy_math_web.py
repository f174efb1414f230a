"""The policy_math_web recipe end to end at toy size (its plumbing, not its result): four stages from one
starting checkpoint, each scored on held-out records at every saved step, reuse across launches, the split
check."""

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from quietstar import train as train_script
from quietstar.methods.registry import register_configs
from quietstar.errors import UserError
from quietstar.methods.registry import run_recipe
from quietstar.methods.quietstar.learn_to_think import micro_step_flops
from quietstar.methods.quietstar.math_web import stage_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=tiny", "model.dim=32", "model.intermediate_size=64", "model.n_heads=2", "model.n_kv_heads=2",
        "model.n_layers=1", "logger=none", "train.progress=false", "train.device=cpu", "data.seq_len=24",
        "data.batch_size=1"]


def compose_cfg(out_dir, *overrides):
    GlobalHydra.instance().clear()
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        node = compose(config_name="train", overrides=[*TINY, *overrides])
    GlobalHydra.instance().clear()
    node.output_dir = str(out_dir)
    return OmegaConf.to_object(node)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A jsonl of 30 short records and a tiny checkpoint trained on its first 20 (the 'pretrained' start)."""
    root = tmp_path_factory.mktemp("math_web")
    path = root / "text.jsonl"
    lines = [json.dumps({"text": f"Let x = {i}. Then x + {i % 7} = {i + i % 7}, and 2x = {2 * i}."}) for i in range(30)]
    path.write_text("\n".join(lines) + "\n")
    cfg = compose_cfg(root / "start", "data=jsonl", f"data.path={path}", "data.max_docs=20", "thought.enabled=false",
                      "train.max_steps=2")
    result = train_script.train(cfg)
    return path, result.checkpoint


def recipe_cfg(out_dir, corpus, *overrides):
    path, start = corpus
    return compose_cfg(out_dir, "experiment=policy_math_web", f"data.path={path}", "data.max_docs=20",
                       f"init_from={start}", "train.max_steps=2", "checkpoint.every=1", "policy_math_web.qa_limit=0",
                       "policy_math_web.eval_start=22", "policy_math_web.eval_docs=4", "policy_math_web.curve_docs=2",
                       "policy_math_web.eval_seq_len=16", "thought.n_ahead=3", "thought.n_ahead_talk=1", "optim.lr=0.01",
                       *overrides)


def test_stages_differ_only_where_they_should(tmp_path, corpus):
    cfg = recipe_cfg(tmp_path, corpus)
    off, rlp, off0, base = (stage_config(cfg, s) for s in ("official", "rlp", "policy_off", "baseline"))
    assert (off.thought.objective, off.thought.policy_weight, off.thought.clamp_negative_advantage) == ("official", 1e6, True)
    assert (rlp.thought.objective, rlp.thought.policy_weight, rlp.thought.clamp_negative_advantage) == ("rlp", 1.0, False)
    assert off0.thought == rlp.thought.__class__(**{**rlp.thought.__dict__, "policy_weight": 0.0})
    assert not base.thought.enabled and base.train.max_steps > cfg.train.max_steps
    # the baseline's steps buy the thought stage's model FLOPs
    ratio = micro_step_flops(cfg, plain=False) / micro_step_flops(cfg, plain=True)
    assert base.train.max_steps == round(cfg.train.max_steps * ratio)
    assert {s.init_from for s in (off, rlp, off0, base)} == {cfg.init_from}
    assert len({s.output_dir for s in (off, rlp, off0, base)}) == 4


def test_launches_per_stage_share_a_run_dir_and_the_last_writes_results(tmp_path, corpus, capsys):
    first = recipe_cfg(tmp_path, corpus, "policy_math_web.stages=[rlp,baseline]")
    run_recipe(first, train_script.train)
    assert not (tmp_path / "results.json").exists()
    assert "waits for the stages ['before', 'official', 'policy_off']" in capsys.readouterr().out
    run_recipe(recipe_cfg(tmp_path, corpus), train_script.train)
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res["models"]) == {"before", "official", "rlp", "policy_off", "baseline"}
    for name, m in res["models"].items():
        assert m["tokens"] > 0 and abs(m["nll_base"] - m["nll_thought"] - m["gain"]) < 1e-9
        assert len(m["entropy_quintiles"]) == 5
    # the starting model and the plain baseline are scored without thoughts; the thought stages with them
    assert res["models"]["before"]["gain"] == 0 and res["models"]["baseline"]["gain"] == 0
    assert res["models"]["rlp"]["gain"] != 0
    assert {s: [p["step"] for p in pts] for s, pts in res["curves"].items()} == {
        "official": [0, 1, 2], "rlp": [0, 1, 2], "policy_off": [0, 1, 2]}
    assert res["curves"]["rlp"][0] == res["curves"]["official"][0] and res["curves"]["rlp"][0]["gain"] == 0
    assert res["compute"]["baseline_flops"] == pytest.approx(res["compute"]["thought_stage_flops"], rel=0.5)
    assert [s["stage"] for s in res["stages"]] == ["official", "rlp", "policy_off", "baseline"]
    assert res["stages"][1]["reused"] and res["stages"][3]["reused"]  # trained by the first launch
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    rows = [json.loads(x) for x in (tmp_path / "rlp" / "metrics.jsonl").read_text().splitlines()]
    last = res["training"]["rlp"]["last"]["thought/mix_weight_mean"]
    assert last == pytest.approx(sum(r["thought/mix_weight_mean"] for r in rows[-4:]) / len(rows[-4:]))
    # the stages' starting point is the same checkpoint: their first-step base NLL on the same batch agrees
    first_nll = {s: json.loads((tmp_path / s / "metrics.jsonl").read_text().splitlines()[0])["train/nll_base"]
                 for s in ("official", "rlp", "policy_off")}
    assert len({round(v, 5) for v in first_nll.values()}) == 1, first_nll


def test_a_split_that_trains_on_scored_records_is_refused(tmp_path, corpus):
    with pytest.raises(UserError, match="data.max_docs"):
        run_recipe(recipe_cfg(tmp_path, corpus, "data.max_docs=25"), train_script.train)
    with pytest.raises(UserError, match="data.path"):
        run_recipe(recipe_cfg(tmp_path, corpus, f"data.path={tmp_path / 'missing.jsonl'}"), train_script.train)
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_the_summary_prints_question_scores_of_models_scored_without_thoughts(tmp_path, capsys):
    from quietstar.methods.quietstar.math_web import print_results

    nll = {"nll_base": 2.5, "nll_thought": 2.5, "gain": 0.0}
    models = {"before": {**nll, "gsm8k_soft": {"no_thought": 0.011, "thought": None, "n": 2},
                         "csqa_soft": {"no_thought": 0.139, "thought": None, "n": 2}},
              "rlp": {**nll, "gain": 0.001, "gsm8k_soft": {"no_thought": 0.02, "thought": 0.031, "n": 2}}}
    print_results({"models": models, "eval": {"held_out_records": "1800..1847"}}, tmp_path)
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()
            if line.split() and line.split()[0] in models}
    assert rows["before"][-2:] == ["0.011", "0.139"]  # no thought: its no-thought accuracy
    assert rows["rlp"][-2:] == ["0.031", "-"]  # with thoughts: the accuracy after one; CSQA not scored
