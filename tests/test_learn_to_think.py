"""The learn_to_think recipe end to end at toy size (its plumbing, not its result), the compute matching,
and the plain-LM stage."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from safetensors.torch import load_file

from quietstar import train as train_script
from quietstar.methods.registry import register_configs
from quietstar.tokenizer import ByteTokenizer
from quietstar.errors import UserError
from quietstar.flops import step_flops
from quietstar.model import ModelConfig, Transformer
from quietstar.methods.plain.model import PlainLM
from quietstar.methods.quietstar.learn_to_think import baseline_steps, median_over_seeds, micro_step_flops

ROOT = Path(__file__).resolve().parents[1]
TOY = ["experiment=learn_to_think", "logger=none", "train.progress=false", "train.device=cpu", "train.max_steps=2",
       "learn_to_think.pretrain_steps=3", "learn_to_think.eval_batch_size=8", "data.reasoning.eval_docs=6",
       "data.synthetic_docs=40", "data.batch_size=2", "model.dim=32", "model.intermediate_size=64",
       "model.n_heads=2", "model.n_kv_heads=2"]


def toy_cfg(out_dir, *overrides):
    GlobalHydra.instance().clear()
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        node = compose(config_name="train", overrides=[*TOY, *overrides])
    GlobalHydra.instance().clear()
    node.output_dir = str(out_dir)
    return OmegaConf.to_object(node)


def test_the_recipe_runs_its_stages_and_writes_results_and_curves(tmp_path, capsys):
    from quietstar.methods.registry import run_recipe

    cfg = toy_cfg(tmp_path)
    run_recipe(cfg, train_script.train)
    res = json.loads((tmp_path / "results.json").read_text())
    for metric in ("answer_nll", "answer_acc"):
        for model in ("thought", "no_thought", "baseline"):
            assert {"all", "1", "2", "3"} <= set(res[metric][model]), (metric, model)
    assert res["compute"]["baseline_steps"] == baseline_steps(cfg) > cfg.train.max_steps
    assert res["examples"]["before"] and res["examples"]["after"]
    for stage in ("pretrain", "quietstar", "baseline"):
        assert (tmp_path / stage / "metrics.jsonl").is_file() and (tmp_path / stage / "curves.png").is_file()
    assert (tmp_path / "learning_curves.png").stat().st_size > 10_000
    assert "held-out direct answers" in capsys.readouterr().out
    # the same command again reuses every finished stage and only re-evaluates
    calls = []
    run_recipe(cfg, lambda c: calls.append(c))
    assert calls == []
    # ... but not a finished stage that was run with other settings
    from quietstar.errors import UserError

    with pytest.raises(UserError, match=r"quietstar stage run with other settings \(thought.policy_weight\)"):
        run_recipe(toy_cfg(tmp_path, "thought.policy_weight=2"), lambda c: calls.append(c))
    assert calls == []


def test_stages_side_by_side_give_the_results_of_stages_one_after_another(tmp_path):
    """learn_to_think.workers=2 trains quietstar, baseline and policy_off in two spawned processes: the scores
    and every stage's final checkpoint equal those of the same recipe run in one process."""
    from quietstar.methods.registry import run_recipe

    scores = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        run_recipe(toy_cfg(out, "experiment=policy_decoy", "train.threads=1", f"learn_to_think.workers={workers}"),
                   train_script.train)
        res = json.loads((out / "results.json").read_text())
        assert [s["stage"] for s in res["stages"]] == ["pretrain", "quietstar", "baseline", "policy_off"]
        scores[workers] = {k: res[k] for k in ("answer_nll", "answer_acc", "policy_off", "chain_share")}
        for stage in ("quietstar", "baseline", "policy_off"):
            ckpt = max((out / stage / "checkpoints").iterdir())
            scores[workers][stage] = {k: v.tolist() for k, v in load_file(ckpt / "model.safetensors").items()}
    assert scores[1] == scores[2]
    # run again, every stage is reused in this process: nothing is trained, so train_fn need not be picklable
    calls = []
    run_recipe(toy_cfg(tmp_path / "w2", "experiment=policy_decoy", "train.threads=1", "learn_to_think.workers=2"),
               lambda c: calls.append(c))
    assert calls == []


def test_the_policy_recipes_write_the_ablation_and_the_chain_share(tmp_path):
    from quietstar.methods.registry import run_recipe

    experiment = "policy_decoy"
    cfg = toy_cfg(tmp_path, f"experiment={experiment}", "checkpoint.every=1")
    assert cfg.thought.objective == "rlp" and cfg.learn_to_think.policy_off and cfg.data.reasoning.decoy_share == 0.5
    discovery = toy_cfg(tmp_path, "experiment=policy_discovery")  # the same recipe from a space
    assert discovery.thought.objective == "rlp" and discovery.thought.init_token == discovery.thought.end_init_token == " "
    run_recipe(cfg, train_script.train)
    res = json.loads((tmp_path / "results.json").read_text())
    off = res["policy_off"]
    for metric in ("answer_nll", "answer_acc"):
        assert {"thought", "no_thought", "baseline"} <= set(off[metric])
        assert off[metric]["baseline"] == res[metric]["baseline"]  # one baseline for both
    assert 0 <= res["chain_share"]["before"] <= 1 and 0 <= res["chain_share"]["after"] <= 1
    assert 0 <= off["chain_share"]["after"] <= 1
    for r in (res, off):  # the chain-like thoughts include the chains
        assert r["chain_like_share"]["after"] >= r["chain_share"]["after"]
    kinds = res["thought_kinds"]["after"]["3"]
    assert sum(kinds.values()) == res["answer_count"]["3"]  # every 3-hop answer's thought is classified
    assert read_config(tmp_path / "policy_off").thought.policy_weight == 0
    # every saved step of both thought stages, from the pretrained start; the last is the final checkpoint,
    # scored with the same split and thought seed as the results above
    curves = res["over_training"]
    assert [p["step"] for p in curves["quietstar"]] == [p["step"] for p in curves["policy_off"]] == [1, 2]
    start, last = curves["start"], curves["quietstar"][-1]
    assert start["step"] == 0 and start["chain_share"] == res["chain_share"]["before"]
    assert last["nll_thought"] == pytest.approx(res["answer_nll"]["thought"][last["hops"]], abs=1e-9)
    assert last["nll_no_thought"] == pytest.approx(res["answer_nll"]["no_thought"][last["hops"]], abs=1e-9)
    assert last["chain_share"] == pytest.approx(res["chain_share"]["after"])
    assert last["chain_like_share"] == pytest.approx(res["chain_like_share"]["after"])
    assert curves["policy_off"][-1]["chain_share"] == pytest.approx(off["chain_share"]["after"])
    assert (tmp_path / "over_training.png").stat().st_size > 10_000
    # another setting of the policy term alone retrains the Quiet-STaR stage, and reuses the ablation
    calls = []
    with pytest.raises(UserError, match=r"quietstar stage run with other settings \(thought.reward_floor\)"):
        run_recipe(toy_cfg(tmp_path, f"experiment={experiment}", "thought.reward_floor=-1"), calls.append)
    from quietstar.methods.quietstar.learn_to_think import changed_fields

    saved, now = read_config(tmp_path / "policy_off"), read_config(tmp_path / "policy_off")
    now.thought.reward_floor, now.thought.objective = -1.0, "official"
    assert changed_fields(saved, now) == []
    now.thought.n_thoughts = 3  # the NLL's talk terms average over the thoughts: read without the policy
    assert changed_fields(saved, now) == ["thought.n_thoughts"]


def read_config(stage_dir):
    from quietstar.checkpoint import read_train_config
    from quietstar.methods.registry import TrainConfig

    return read_train_config(sorted((stage_dir / "checkpoints").iterdir())[-1], TrainConfig)


def test_the_baseline_gets_the_quietstar_stage_s_flops(tmp_path):
    cfg = toy_cfg(tmp_path, "train.max_steps=10")
    ratio = micro_step_flops(cfg, plain=False) / micro_step_flops(cfg, plain=True)
    assert ratio > 5  # a thinking step costs many plain steps
    assert baseline_steps(cfg) == round(10 * ratio)
    assert baseline_steps(toy_cfg(tmp_path, "learn_to_think.baseline_compute=steps")) == 2
    m = cfg.model.architecture()
    assert step_flops(m, "plain", 2, 16, 5, 1, 2) == pytest.approx(2 * step_flops(m, "plain", 1, 16, 5, 1, 2))


def test_the_recipe_refuses_another_data_source(tmp_path):
    from quietstar.methods.registry import run_recipe

    with pytest.raises(ValueError, match="data=reasoning"):
        run_recipe(toy_cfg(tmp_path, "data=synthetic"), train_script.train)
    from quietstar.errors import UserError

    with pytest.raises(UserError, match="thought.curriculum is not supported"):
        run_recipe(toy_cfg(tmp_path, "thought.curriculum=[{n_ahead:5,n_ahead_talk:1,steps:1}]"), train_script.train)


def test_the_plain_lm_stage_is_next_token_cross_entropy_with_padding_and_documents():
    torch.manual_seed(0)
    base = Transformer(ModelConfig.from_preset("tiny")).double()
    lm = PlainLM(base, ByteTokenizer()).double()
    ids = torch.randint(3, 256, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0
    out = lm(ids, mask)
    ce = F.cross_entropy(base(ids, attention_mask=mask)[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    ok = mask[:, 1:].double()
    assert float(out.loss.detach()) == pytest.approx(float((ce * ok).sum() / ok.sum()), rel=1e-12)
    out.loss.backward()
    g = base.layers[0].attention.wq.weight.grad.clone()
    base.zero_grad()
    ((ce * ok).sum() / ok.sum()).backward()
    assert torch.allclose(g, base.layers[0].attention.wq.weight.grad, rtol=1e-9, atol=1e-12)
    # packed: two documents per row, each causal within itself, no target across the boundary
    doc = torch.tensor([[0] * 5 + [1] * 5] * 2)
    packed = lm(ids, None, doc_ids=doc)
    ce1 = F.cross_entropy(base(ids[:, :5])[:, :-1].transpose(1, 2), ids[:, 1:5], reduction="sum")
    ce2 = F.cross_entropy(base(ids[:, 5:])[:, :-1].transpose(1, 2), ids[:, 6:], reduction="sum")
    assert float(packed.loss) == pytest.approx(float((ce1 + ce2) / 16), rel=1e-12)


def test_median_over_seeds(tmp_path):
    files = []
    for i, v in enumerate([0.3, 0.1, 0.2]):
        f = tmp_path / f"r{i}.json"
        f.write_text(json.dumps({"answer_nll": {"thought": {"all": v, "3": 2 * v}},
                                 "answer_acc": {"thought": {"all": 1 - v, "3": 0.5}}}))
        files.append(f)
    med = median_over_seeds(files)
    assert med["answer_nll"]["thought"] == {"all": 0.2, "3": 0.4}
    assert med["answer_acc"]["thought"]["all"] == pytest.approx(0.8)
    for i, f in enumerate(files):  # the policy recipes' keys
        r = json.loads(f.read_text())
        r["chain_share"] = {"before": 0.5, "after": [0.9, 0.7, 0.8][i], "of": "text"}
        r["policy_off"] = {"answer_nll": r["answer_nll"], "answer_acc": r["answer_acc"],
                           "chain_share": {"after": [0.4, 0.6, 0.5][i]}}
        f.write_text(json.dumps(r))
    med = median_over_seeds(files)
    assert med["chain_share"] == {"before": 0.5, "after": 0.8}
    assert med["policy_off"]["chain_share"] == {"after": 0.5}
    assert med["policy_off"]["answer_nll"]["thought"] == {"all": 0.2, "3": 0.4}


def test_quietstar_from_a_plain_lm_checkpoint_starts_its_thoughts_at_the_trained_init_token(tmp_path):
    pre = toy_cfg(tmp_path / "pre", "thought.enabled=false", "train.max_steps=3", "optim.lr=1e-2")
    ckpt = train_script.train(pre).checkpoint
    qs, tok = train_script.build_thinker(toy_cfg(tmp_path / "qs", f"init_from={ckpt}"), torch.device("cpu"))
    emb = lambda text: qs.model.tok_embeddings.weight[tok.encode(text)[0]] / qs.cfg.embedding_scale
    assert (qs.cfg.init_token, qs.cfg.end_init_token) == ("-", ".")  # the chain's opening and closing marks
    assert torch.equal(qs.start_embedding, emb("-")) and torch.equal(qs.end_embedding, emb("."))
    plain, _ = train_script.build_thinker(pre, torch.device("cpu"))  # the plain stage's untrained copy
    assert not torch.equal(plain.start_embedding, qs.start_embedding)


def test_end_init_token_starts_end_elsewhere_and_an_empty_one_is_refused():
    from quietstar.methods.quietstar.thinker import QuietStar
    from quietstar.methods.quietstar.config import ThoughtConfig

    tok = ByteTokenizer()
    base = Transformer(ModelConfig.from_preset("tiny"))
    emb = lambda text: base.tok_embeddings.weight[tok.encode(text)[0]]
    qs = QuietStar(base, tok, ThoughtConfig(init_token="-", end_init_token=".", embedding_scale=1.0))
    assert torch.equal(qs.start_embedding, emb("-")) and torch.equal(qs.end_embedding, emb("."))
    same = QuietStar(base, tok, ThoughtConfig(init_token="-", embedding_scale=1.0))  # None: as init_token
    assert torch.equal(same.end_embedding, emb("-"))
    with pytest.raises(ValueError, match="thought.end_init_token=''"):
        QuietStar(base, tok, ThoughtConfig(end_init_token=""))

