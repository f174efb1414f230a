"""Training end to end on the tiny model: outputs, multirun, exact kill-and-resume, divergence, the
optimizer's groups and schedule, and (slow) the embedded default config."""

import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from quietstar import train as train_script
from quietstar.checkpoint import verify_checkpoint
from quietstar.config import OptimConfig
from quietstar.methods.registry import register_configs
from quietstar.model import ModelConfig, Transformer
from quietstar.optim import WarmupSchedule, build_optimizer, param_groups
from quietstar.methods.quietstar.thinker import QuietStar
from quietstar.methods.quietstar.config import ThoughtConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=tiny", "logger=none", "data.seq_len=24", "data.batch_size=2", "thought.n_ahead=4",
        "thought.n_ahead_talk=2", "train.progress=false", "train.device=cpu", "optim.warmup_steps=2"]
ENV = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "1"}


def compose_node(overrides):
    GlobalHydra.instance().clear()
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        node = compose(config_name="train", overrides=list(overrides))
    GlobalHydra.instance().clear()
    return node


def tiny_cfg(out_dir, *overrides):
    node = compose_node([*TINY, *overrides])
    node.output_dir = str(out_dir)
    return OmegaConf.to_object(node)


def records(run_dir):
    return [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]


def run_cli(args, env=None, check=True):
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env={**ENV, **(env or {})},
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py {args} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


KILL_DRIVER = """
import os, signal, sys
sys.path.insert(0, {root!r})
from omegaconf import OmegaConf
from tests.test_train import compose_node
from quietstar import train
node = compose_node(sys.argv[2:])
train.train(OmegaConf.to_object(node),
            on_step=lambda step, result: os.kill(os.getpid(), signal.SIGKILL) if step == int(sys.argv[1]) else None)
"""


def run_killed_after(step, overrides):
    """A training process that SIGKILLs itself right after `step` (its logging and checkpoint done)."""
    return subprocess.run([sys.executable, "-c", KILL_DRIVER.format(root=str(ROOT)), str(step), *overrides],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def test_tiny_run_writes_checkpoints_metrics_and_an_offline_wandb_run(tmp_path):
    cfg = tiny_cfg(tmp_path, "logger=wandb", "train.max_steps=3", "checkpoint.every=1", "checkpoint.keep_last=2")
    result = train_script.train(cfg)
    assert result.status == "done" and result.step == 3 and len(result.losses) == 3
    recs = records(tmp_path)
    assert [r["step"] for r in recs] == [1, 2, 3] and [r["loss"] for r in recs] == result.losses
    assert all(k in recs[0] for k in ("train/loss", "thought/reward_mean", "thought/mix_weight_mean", "perf/tok_per_s"))
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["step_0000002", "step_0000003"]  # keep_last=2, no temporary dirs left behind
    manifest = verify_checkpoint(tmp_path / "checkpoints" / "step_0000003")
    assert {"model.safetensors", "optimizer.pt", "train_state.pt", "rng_rank0.pt", "config.yaml"} <= set(manifest["files"])
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    saved = OmegaConf.load(tmp_path / "config.yaml")
    assert saved.model.preset == "tiny" and saved.output_dir == str(tmp_path)
    assert isinstance(result.sample["thought"], str) and result.sample["position"] >= 0


def test_multirun_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    run_cli(["-m", *TINY, "train.max_steps=1", "thought.n_ahead=4,5", f"hydra.sweep.dir={sweep}"])
    for job, n_ahead in [("0", 4), ("1", 5)]:
        assert OmegaConf.load(sweep / job / "config.yaml").thought.n_ahead == n_ahead
        assert records(sweep / job)[0]["step"] == 1
        assert (sweep / job / "checkpoints" / "step_0000001" / "manifest.json").is_file()


def test_sigkill_and_resume_gives_a_bitwise_identical_loss_curve(tmp_path):
    args = [*TINY, "train.max_steps=5", "checkpoint.every=2", "optim.schedule=cosine", "data.mode=pack"]
    run_cli([*args, f"hydra.run.dir={tmp_path / 'full'}"])
    killed = run_killed_after(3, [*args, f"output_dir={tmp_path / 'killed'}"])
    assert killed.returncode == -9
    assert sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()) == ["step_0000002"]
    run_cli([f"resume={tmp_path / 'killed'}", f"hydra.run.dir={tmp_path / 'resumed'}"])

    full = [(r["step"], r["loss"]) for r in records(tmp_path / "full")]
    before = [(r["step"], r["loss"]) for r in records(tmp_path / "killed")]
    after = [(r["step"], r["loss"]) for r in records(tmp_path / "resumed")]
    assert [s for s, _ in before] == [1, 2, 3] and [s for s, _ in after] == [3, 4, 5]
    assert before[:2] + after == full  # exact float equality, step 3 included (redone after the kill)
    assert records(tmp_path / "resumed")[-1]["perf/tokens_seen"] == records(tmp_path / "full")[-1]["perf/tokens_seen"]
    # the resumed run used the checkpoint's config, not the command line's defaults
    assert OmegaConf.load(tmp_path / "resumed" / "config.yaml").data.mode == "pack"


def test_a_curriculum_sets_the_lengths_by_step_and_resumes_mid_stage_exactly(tmp_path):
    from quietstar.methods.quietstar.load import load_thinker_checkpoint

    curriculum = "thought.curriculum=[{n_ahead:6,n_ahead_talk:2,steps:2},{n_ahead:4,n_ahead_talk:1,steps:2}]"
    args = [*TINY, "train.max_steps=5", "checkpoint.every=2", "checkpoint.keep_last=5", curriculum]
    full = run_cli([*args, f"hydra.run.dir={tmp_path / 'full'}"])
    assert "[curriculum] stage 2/2 from step 3: n_ahead=4 n_ahead_talk=1" in full.stdout
    rows = records(tmp_path / "full")
    assert [(r["thought/curriculum_stage"], r["thought/n_ahead"], r["thought/n_ahead_talk"]) for r in rows] == \
        [(0, 6, 2), (0, 6, 2), (1, 4, 1), (1, 4, 1), (1, 4, 1)]  # the last stage's lengths stay
    # killed mid-stage 2 (after step 3, checkpoint at 2): the resumed run redoes step 3 at stage 2's lengths
    killed = run_killed_after(3, [*args, f"output_dir={tmp_path / 'killed'}"])
    assert killed.returncode == -9
    run_cli([f"resume={tmp_path / 'killed'}", f"hydra.run.dir={tmp_path / 'resumed'}"])
    resumed = records(tmp_path / "killed")[:2] + records(tmp_path / "resumed")
    assert [(r["step"], r["loss"], r["thought/n_ahead"]) for r in resumed] == \
        [(r["step"], r["loss"], r["thought/n_ahead"]) for r in rows]  # exact float equality
    # a checkpoint is loaded for inference at the lengths of the stage it was saved in
    ckpts = tmp_path / "full" / "checkpoints"
    assert load_thinker_checkpoint(ckpts / "step_0000002").cfg.n_ahead == 6
    final = load_thinker_checkpoint(ckpts / "step_0000005").cfg
    assert (final.n_ahead, final.n_ahead_talk, final.curriculum) == (4, 1, [])


def test_a_bad_curriculum_stage_is_refused_by_name():
    from quietstar.methods.quietstar.config import ThoughtConfig

    with pytest.raises(ValueError, match=r"ThoughtConfig.curriculum\[1\] needs n_ahead >= 3"):
        ThoughtConfig(curriculum=[dict(n_ahead=5, n_ahead_talk=1, steps=2), dict(n_ahead=2, n_ahead_talk=1, steps=2)])
    with pytest.raises(ValueError, match=r"curriculum\[0\]"):
        ThoughtConfig(curriculum=[dict(n_ahead=5, n_ahead_talk=1, steps=0)])
    assert ThoughtConfig().at_step(7)[1] == ThoughtConfig()


def test_resume_keeps_the_saved_config_and_applies_named_overrides(tmp_path):
    cfg = tiny_cfg(tmp_path / "a", "train.max_steps=1", "thought.n_ahead=5")
    train_script.train(cfg)
    node = compose_node([f"resume={tmp_path / 'a'}", "train.max_steps=2", "logger=none"])
    merged = train_script.resume_config(node, [f"resume={tmp_path / 'a'}", "train.max_steps=2", "logger=none"])
    assert merged.thought.n_ahead == 5 and merged.model.preset == "tiny"  # from the checkpoint
    assert merged.train.max_steps == 2 and merged.logger.backend == "none"  # from the command line
    with pytest.raises(ValueError, match="experiment"):
        train_script.resume_config(node, [f"resume={tmp_path / 'a'}", "experiment=gpu"])


def test_a_non_finite_loss_stops_cleanly_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    forward = QuietStar.forward

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(QuietStar, "forward", poisoned)
    result = train_script.train(tiny_cfg(tmp_path, "train.max_steps=5", "checkpoint.every=1", "checkpoint.keep_last=5"))
    assert result.status == "diverged" and result.step == 2
    # step 2's checkpoint holds the weights that gave the non-finite loss: kept, but set aside from resume
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["diverged_after_step_0000002",
                                                                            "step_0000001"]
    assert result.checkpoint == tmp_path / "checkpoints" / "step_0000001"
    verify_checkpoint(tmp_path / "checkpoints" / "diverged_after_step_0000002" / "step_0000002")
    assert [r["step"] for r in records(tmp_path)] == [1, 2]


def test_jsonl_training_on_the_shared_math_web(tmp_path, shared_data):
    path = shared_data / "math_web" / "train.jsonl"
    result = train_script.train(tiny_cfg(tmp_path, "data=jsonl", f"data.path={path}", "train.max_steps=1"))
    assert result.status == "done" and records(tmp_path)[0]["loss"] > 0


# ---- optimizer


def test_parameter_groups_and_lr_multipliers():
    torch.manual_seed(0)
    qs = QuietStar(Transformer(ModelConfig.from_preset("tiny")), None, ThoughtConfig(n_ahead=4, n_ahead_talk=2))
    cfg = OptimConfig(lr=1e-3, weight_decay=0.1, thought_embedding_lr_mult=10.0, talk_head_lr_mult=2.0,
                      warmup_steps=0)
    opt, sched = build_optimizer(qs, cfg, max_steps=10)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"decay", "no_decay", "thought", "talk_head", "talk_head_no_decay"}
    assert groups["thought"]["lr"] == pytest.approx(1e-2) and groups["talk_head"]["lr"] == pytest.approx(2e-3)
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in groups["no_decay"]["params"])
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    assert n_params == len(list(qs.parameters()))
    frozen = param_groups(qs, OptimConfig(base_lr_mult=0.0))
    assert {g["name"] for g in frozen} == {"thought", "talk_head", "talk_head_no_decay"}
    assert not qs.model.tok_embeddings.weight.requires_grad


def test_adamw_is_fused_on_cpu_by_default_and_steps_as_the_unfused_one():
    """optim.fused=None fuses on the CPU too (one kernel per parameter); the update is the for-loop AdamW's to
    float32 rounding, and optim.fused=false keeps the unfused one."""
    def after_two_steps(fused):
        torch.manual_seed(0)
        qs = QuietStar(Transformer(ModelConfig.from_preset("tiny")), None, ThoughtConfig(n_ahead=4, n_ahead_talk=2))
        opt, _ = build_optimizer(qs, OptimConfig(lr=1e-2, weight_decay=0.1, warmup_steps=0, fused=fused), 10)
        for step in range(2):
            for i, p in enumerate(qs.parameters()):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + i))
            opt.step()
        return opt, [p.detach().clone() for p in qs.parameters()]

    fused_opt, fused = after_two_steps(None)
    plain_opt, plain = after_two_steps(False)
    assert fused_opt.defaults["fused"] and not plain_opt.defaults.get("fused")
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_precision_trains_on_cpu_under_autocast(tmp_path, monkeypatch):
    """train.precision=bf16 on CPU runs every micro-step under bf16 autocast and trains; auto stays fp32 there."""
    enabled = []
    real = train_script.autocast_context

    @contextlib.contextmanager
    def recording(device, precision):
        with real(device, precision):
            enabled.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
            yield

    monkeypatch.setattr(train_script, "autocast_context", recording)
    result = train_script.train(tiny_cfg(tmp_path / "bf16", "train.max_steps=2", "train.precision=bf16"))
    assert result.status == "done" and all(math.isfinite(x) for x in result.losses)
    assert len(enabled) == 2 and all(enabled)
    enabled.clear()
    train_script.train(tiny_cfg(tmp_path / "auto", "train.max_steps=1"))
    assert enabled == [False]


def test_schedules():
    warm = WarmupSchedule(warmup_steps=4, max_steps=14, kind="cosine", min_ratio=0.1)
    assert [round(warm(s), 3) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert warm(4) == pytest.approx(1.0) and warm(14) == pytest.approx(0.1) and warm(9) == pytest.approx(0.55)
    assert WarmupSchedule(0, 10, "linear", 0.0)(5) == pytest.approx(0.5)
    assert WarmupSchedule(2, 10, "constant")(7) == 1.0


# ---- the embedded default


@pytest.mark.slow
def test_the_default_config_trains_two_steps(tmp_path, smollm2):
    node = compose_node(["train.max_steps=2", "logger=none", "data.seq_len=16", "train.progress=false",
                         "checkpoint.save_optimizer=false"])
    node.output_dir = str(tmp_path)
    cfg = OmegaConf.to_object(node)
    assert cfg.model.name == "smollm2-135m" and cfg.data.source == "synthetic"
    result = train_script.train(cfg)
    assert result.status == "done" and result.step == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert (tmp_path / "checkpoints" / "step_0000002" / "tokenizer.json").is_file()


def test_metrics_become_numbers_once_per_log_every_and_every_loss_is_kept(tmp_path, monkeypatch):
    calls = {"n": 0}
    to_numbers = train_script.to_numbers

    def counted(s, pending):
        calls["n"] += 1
        return to_numbers(s, pending)

    monkeypatch.setattr(train_script, "to_numbers", counted)
    result = train_script.train(tiny_cfg(tmp_path, "train.max_steps=5", "train.log_every=2"))
    assert [r["step"] for r in records(tmp_path)] == [2, 4, 5]
    assert calls["n"] == 3 and len(result.losses) == 5 and all(isinstance(x, float) for x in result.losses)
    assert [r["loss"] for r in records(tmp_path)] == [result.losses[1], result.losses[3], result.losses[4]]
