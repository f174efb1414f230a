"""Fault injection and bad input: every way a run, checkpoint, export or evaluation could be lost or be
silently wrong, and every bad input that must give one readable line. All on the tiny model."""

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from quietstar import train as train_script
from quietstar import checkpoint as ckpt_mod
from quietstar.checkpoint import (SAVE_POINTS, CheckpointError, find_checkpoint, prune_checkpoints, read_config_node,
                                  recover_checkpoints, verify_checkpoint)
from quietstar.cli import parse_kv
from quietstar.config import HealthConfig
from quietstar.data import read_jsonl
from quietstar.errors import LoadError, UserError, run_main
from quietstar.eval import common
from quietstar.export import export, load_thinker
from quietstar.generate import RULES as GENERATE_RULES
from quietstar.generate import generate
from quietstar.health import HealthMonitor
from quietstar.hf_dir import config_from_hf
from quietstar.model import ModelConfig, Transformer
from quietstar.rundir import RunDirInUse, RunLock
from quietstar.tokenizer import ByteTokenizer
from quietstar.methods.quietstar.thinker import QuietStar
from quietstar.methods.quietstar.config import ThoughtConfig
from test_checkpoint import make, save
from test_train import ENV, ROOT, TINY, records, tiny_cfg


def step_dirs(root):
    return sorted(p.name for p in Path(root).glob("step_*"))


def all_finite(step_dir):
    return all(bool(torch.isfinite(t).all()) for t in load_file(step_dir / "model.safetensors").values())


OVERRIDDEN_STEP = pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")


def poison_optimizer(monkeypatch, at_call: int, action):
    """build_optimizer as train.py calls it, but `action(optimizer)` runs before its `at_call`-th step."""
    build = train_script.build_optimizer

    def built(*args, **kwargs):
        opt, sched = build(*args, **kwargs)
        real, calls = opt.step, {"n": 0}

        def step(*a, **k):
            calls["n"] += 1
            if calls["n"] >= at_call:
                action(opt)
            return real(*a, **k)

        opt.step = step
        return opt, sched

    monkeypatch.setattr(train_script, "build_optimizer", built)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished 2-step tiny run with a checkpoint at each step."""
    out = tmp_path_factory.mktemp("run")
    result = train_script.train(tiny_cfg(out, "train.max_steps=2", "checkpoint.every=1", "checkpoint.keep_last=0"))
    assert result.status == "done"
    return out


@pytest.fixture
def ckpt_copy(run_dir, tmp_path):
    """A private copy of the run's step-2 checkpoint, free to damage."""
    dst = tmp_path / "checkpoints" / "step_0000002"
    shutil.copytree(run_dir / "checkpoints" / "step_0000002", dst)
    return dst


def tiny_thinker():
    torch.manual_seed(0)
    return QuietStar(Transformer(ModelConfig.from_preset("tiny")), ByteTokenizer(), ThoughtConfig(n_ahead=4))


# ---------------------------------------------------------------------------------------- 1. non-finite weights


@OVERRIDDEN_STEP
def test_a_checkpoint_is_never_written_from_non_finite_weights(tmp_path, monkeypatch):
    def blow_up(opt):  # the update of step 2 leaves an inf weight; its loss and gradient were finite
        opt.param_groups[0]["params"][0].data[0, 0] = float("inf")

    poison_optimizer(monkeypatch, 2, blow_up)
    result = train_script.train(tiny_cfg(tmp_path, "train.max_steps=4", "checkpoint.every=1", "checkpoint.keep_last=5"))
    assert result.status == "diverged" and result.step == 2
    assert step_dirs(tmp_path / "checkpoints") == ["step_0000001"]
    assert result.checkpoint == tmp_path / "checkpoints" / "step_0000001"  # "last good" is true
    assert all_finite(result.checkpoint)


def test_an_infinite_learning_rate_is_refused_naming_the_field(tmp_path):
    with pytest.raises(UserError, match=r"optim\.lr must be a finite number, got inf"):
        tiny_cfg(tmp_path, "optim.lr=inf")


# ---------------------------------------------------------------------------------------- 2. silent divergence


@OVERRIDDEN_STEP
def test_a_run_that_stops_learning_stops_and_keeps_the_last_healthy_checkpoint(tmp_path, monkeypatch):
    def huge_lr(opt):  # from the 3rd update on: the loss freezes and the gradient is exactly 0
        for g in opt.param_groups:
            g["lr"] = 1e4

    poison_optimizer(monkeypatch, 3, huge_lr)
    result = train_script.train(tiny_cfg(tmp_path, "train.max_steps=10", "checkpoint.every=1", "checkpoint.keep_last=1",
                                         "optim.warmup_steps=0"))
    root = tmp_path / "checkpoints"
    assert result.status == "diverged" and result.step < 10
    # step 3's checkpoint holds the broken weights (written before step 4 showed it): set aside, not resumed
    assert step_dirs(root) == ["step_0000002"] and result.checkpoint == root / "step_0000002"
    assert (root / "diverged_after_step_0000003" / "step_0000003" / "manifest.json").is_file()
    assert find_checkpoint(tmp_path) == root / "step_0000002"


def test_a_loss_spike_is_divergence_and_thresholds_are_config_fields():
    monitor = HealthMonitor(HealthConfig(spike_factor=4.0, min_history=3))
    assert [monitor.update(x, 1.0).status for x in (5.0, 5.1, 4.9, 5.0)] == ["ok"] * 4
    verdict = monitor.update(40.0, 1.0)
    assert verdict.status == "diverged" and "spike_factor" in verdict.reason
    frozen = HealthMonitor(HealthConfig(frozen_steps=2))
    assert [frozen.update(5.0, g).status for g in (1.0, 0.0, 0.0)] == ["ok", "suspect", "diverged"]
    with pytest.raises(UserError, match="health.spike_factor"):
        HealthConfig(spike_factor=float("nan"))


# ---------------------------------------------------------------------------------------- 3. the save sequence


REPLACE_POINTS = ["written", "old_aside", "new_in_place", "old_removed"]
NEW_STEP_POINTS = ["written", "new_in_place", "pruned"]


def _save_killed_at(root, n, parts, point):
    """Save step n in a forked child that SIGKILLs itself at `point` of the sequence. -> the wait status."""
    pid = os.fork()
    if pid == 0:  # the child: no cleanup, no atexit, exactly as a power cut or an OOM kill
        try:
            def hook(name):
                if name == point:
                    os.kill(os.getpid(), signal.SIGKILL)

            save(root, n, parts, keep_last=2, on_point=hook)
        finally:
            os._exit(0)
    return os.waitpid(pid, 0)[1]


@pytest.mark.parametrize("case,point", [("replace", p) for p in REPLACE_POINTS] + [("new", p) for p in NEW_STEP_POINTS])
def test_a_kill_at_every_point_of_the_save_leaves_a_complete_checkpoint(tmp_path, case, point):
    assert set(REPLACE_POINTS) | set(NEW_STEP_POINTS) == set(SAVE_POINTS)
    parts, root = make(), tmp_path / "checkpoints"
    save(root, 1, parts)
    save(root, 2, parts, keep_last=2)
    status = _save_killed_at(root, 2 if case == "replace" else 3, parts, point)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    recover_checkpoints(root)
    assert not list(root.glob(".tmp-*")) and not list(root.glob(".old-*"))
    verify_checkpoint(root / "step_0000002")  # never lost, whatever the point
    newest = find_checkpoint(root)
    verify_checkpoint(newest)
    if case == "new" and point != "written":
        assert newest == root / "step_0000003"
    if case == "replace":
        assert step_dirs(root) == ["step_0000001", "step_0000002"]


def test_a_run_restarted_into_its_dir_rolls_back_a_half_done_replace_first(run_dir, tmp_path):
    shutil.copytree(run_dir / "checkpoints", tmp_path / "checkpoints")
    root = tmp_path / "checkpoints"
    os.rename(root / "step_0000002", root / ".old-step_0000002")  # killed between the two renames
    result = train_script.train(tiny_cfg(tmp_path, f"resume={tmp_path}", "train.max_steps=3"))
    assert result.status == "done" and len(result.losses) == 1  # resumed from step 2, not step 1
    assert step_dirs(root) == ["step_0000002", "step_0000003"]  # keep_last=2
    assert not list(root.glob(".old-*"))


def test_a_full_disk_during_a_save_says_so_and_removes_the_partial_dir(tmp_path, monkeypatch):
    import safetensors.torch

    parts, root = make(), tmp_path / "checkpoints"
    save(root, 1, parts)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(CheckpointError, match=f"no space left on {root}"):
        save(root, 2, parts)
    assert sorted(p.name for p in root.iterdir()) == ["step_0000001"]
    verify_checkpoint(root / "step_0000001")


# ---------------------------------------------------------------------------------------- 4. export


def test_export_refuses_to_overwrite_or_enter_its_checkpoint(ckpt_copy):
    with pytest.raises(UserError, match="overlaps the checkpoint"):
        export(ckpt_copy, ckpt_copy)
    with pytest.raises(UserError, match="overlaps the checkpoint|inside a training checkpoint"):
        export(ckpt_copy, ckpt_copy / "hf")
    with pytest.raises(UserError, match="overlaps the checkpoint"):
        export(ckpt_copy, ckpt_copy.parent.parent, overwrite=True)  # the run dir holding it
    verify_checkpoint(ckpt_copy)
    assert not (ckpt_copy / "hf").exists()


def test_export_refuses_non_empty_dirs_files_and_non_float_dtypes(ckpt_copy, tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "model-00002-of-00002.safetensors").write_text("stale")
    with pytest.raises(UserError, match="not empty; pass overwrite=true"):
        export(ckpt_copy, out)
    export(ckpt_copy, out, overwrite=True)
    assert not (out / "model-00002-of-00002.safetensors").exists() and (out / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.glob(".old-*"))
    assert load_thinker(out).model.tok_embeddings.weight.abs().sum() > 0
    with pytest.raises(UserError, match="dtype must be one of"):
        export(ckpt_copy, tmp_path / "int8", dtype="int8")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="exists and is not a directory"):
        export(ckpt_copy, tmp_path / "afile")
    assert not (tmp_path / "int8").exists() and (tmp_path / "afile").read_text() == "x"


# ---------------------------------------------------------------------------------------- 5. resuming an older step


def test_resuming_an_older_step_into_its_own_run_sets_the_later_timeline_aside(tmp_path):
    train_script.train(tiny_cfg(tmp_path, "train.max_steps=3", "checkpoint.every=1", "checkpoint.keep_last=0"))
    root = tmp_path / "checkpoints"
    old_step3 = load_file(root / "step_0000003" / "model.safetensors")
    result = train_script.train(tiny_cfg(tmp_path, f"resume={root / 'step_0000001'}", "train.max_steps=3",
                                         "checkpoint.every=1", "checkpoint.keep_last=1"))
    assert result.status == "done" and result.checkpoint == root / "step_0000003"
    # the new timeline's; keep_last=1 also keeps step 2, the newest checkpoint confirmed by a healthy step
    assert step_dirs(root) == ["step_0000002", "step_0000003"]
    aside = [p for p in root.iterdir() if p.name.startswith("abandoned_after_step_0000001")]
    assert len(aside) == 1 and step_dirs(aside[0]) == ["step_0000002", "step_0000003"]
    assert [r["step"] for r in records(tmp_path)] == [1, 2, 3]  # one timeline, no duplicates
    assert [json.loads(x)["step"] for x in (aside[0] / "metrics.jsonl").read_text().splitlines()] == [2, 3]
    assert torch.equal(load_file(aside[0] / "step_0000003" / "model.safetensors")["model.norm.weight"],
                       old_step3["model.norm.weight"])


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path):
    for n in (1, 2, 3):
        (tmp_path / f"step_000000{n}").mkdir()
    prune_checkpoints(tmp_path, 1, keep=(tmp_path / "step_0000002",))
    assert step_dirs(tmp_path) == ["step_0000002", "step_0000003"]


def test_resuming_past_max_steps_is_an_error(run_dir, tmp_path):
    with pytest.raises(UserError, match=r"at step 2, and train.max_steps=2: nothing to train"):
        train_script.train(tiny_cfg(tmp_path, f"resume={run_dir}", "train.max_steps=2"))


# ---------------------------------------------------------------------------------------- 6. one run per dir


def test_a_second_run_into_a_locked_dir_fails_at_once_naming_the_holder(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunDirInUse, match=f"pid {os.getpid()}"):
            train_script.train(tiny_cfg(tmp_path, "train.max_steps=1"))
        assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "config.yaml").exists()
    assert train_script.train(tiny_cfg(tmp_path, "train.max_steps=1")).status == "done"  # released


def test_default_output_dirs_are_unique_within_one_second():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from quietstar.methods.registry import register_configs

    a, b = train_script.default_output_dir(), train_script.default_output_dir()
    assert a != b and str(os.getpid()) in a.name
    GlobalHydra.instance().clear()
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        node = compose(config_name="train", return_hydra_config=True)
    GlobalHydra.instance().clear()
    run_dir = OmegaConf.select(node, "hydra.run.dir")
    assert run_dir.endswith(f"-{os.getpid()}") and "." in Path(run_dir).name  # microseconds, then the pid


# ---------------------------------------------------------------------------------------- 7. Unicode and BOM


def test_a_bom_and_a_lone_surrogate_are_handled_naming_file_and_line(tmp_path, caplog):
    f = tmp_path / "d.jsonl"
    lines = [json.dumps({"text": "first record"}), json.dumps({"text": "bad \ud800 text"}),
             json.dumps({"text": "third record"})]
    f.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode("utf-8") + b"\n")
    skipped = {}
    assert read_jsonl(f, skipped=skipped) == ["first record", "third record"]
    assert skipped[str(f)] == 1 and f"{f}:line 2: skipped record: field 'text' is not valid Unicode" in caplog.text
    assert [r["text"] for _, r in common.read_jsonl(f)][0] == "first record"  # eval's reader too
    with pytest.raises(common.DataError, match=r"d.jsonl:2: field 'text' is not valid Unicode"):
        [common.field(f, n, r, "text") for n, r in common.read_jsonl(f)]


# ---------------------------------------------------------------------------------------- 8. eval outputs


@pytest.fixture
def eval_data(tmp_path, monkeypatch):
    qs = tiny_thinker()
    monkeypatch.setattr(common, "load_model", lambda *a, **k: (qs, ByteTokenizer(), "tiny random model"))
    f = tmp_path / "t.jsonl"
    f.write_text("".join(json.dumps({"text": f"{i} + {i} = {2 * i}. Good."}) + "\n" for i in range(3)))
    return f


def test_eval_checks_that_out_is_writable_before_it_runs(eval_data, tmp_path, monkeypatch):
    from quietstar.eval.__main__ import main

    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(common, "load_model", lambda *a, **k: pytest.fail("the model loaded before out was checked"))
    with pytest.raises(UserError, match=r"out=.*file/n.json: cannot be written \(.*file is a file"):
        main(["nll", f"data.path={eval_data}", f"out={tmp_path / 'file' / 'n.json'}", "seq_len=16"])


def test_a_late_write_error_still_prints_the_results(eval_data, tmp_path, monkeypatch, capsys):
    from quietstar.eval.__main__ import main

    def disk_gone(path, obj):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(common, "write_json", disk_gone)
    with pytest.raises(UserError, match="cannot write the results"):
        main(["nll", f"data.path={eval_data}", f"out={tmp_path / 'n.json'}", "seq_len=16"])
    printed = json.loads(capsys.readouterr().out.strip())
    assert printed["n"] == 3 and math.isfinite(printed["nll_base"])


# ---------------------------------------------------------------------------------------- 9. numeric CLI values


@pytest.mark.parametrize("override,field", [("optim.grad_clip=nan", "optim.grad_clip"), ("optim.lr=nan", "optim.lr"),
                                            ("thought.policy_weight=nan", "thought.policy_weight"),
                                            ("thought.policy_weight=-1", "thought.policy_weight"),
                                            ("train.seed=-3", "train.seed")])
def test_bad_numeric_config_values_name_their_field(tmp_path, override, field):
    with pytest.raises(UserError, match=field.replace(".", r"\.")):
        tiny_cfg(tmp_path, override)


@pytest.mark.parametrize("arg,says", [("temperature=-1", "temperature=-1.0: must be >= 0"),
                                      ("max_new_tokens=-1", "max_new_tokens=-1: must be >= 1"),
                                      ("top_p=nan", "top_p='nan': must be a finite number"),
                                      ("max_new_tokens=abc", "max_new_tokens='abc': expected an integer")])
def test_bad_generate_arguments_name_the_argument(arg, says):
    with pytest.raises(UserError, match=f"argument {says}"):
        parse_kv([arg], {"max_new_tokens": 48, "temperature": 0.7, "top_p": 0.95, "seed": 0}, GENERATE_RULES)


def test_bad_eval_limits_and_starts_name_the_argument(eval_data):
    from quietstar.eval.__main__ import main

    with pytest.raises(UserError, match="argument limit=-1: must be >= 0"):
        main(["nll", f"data.path={eval_data}", "limit=-1"])
    with pytest.raises(UserError, match=r"data.start=3: .*t.jsonl has 3 records"):
        main(["nll", f"data.path={eval_data}", "data.start=3"])


# ---------------------------------------------------------------------------------------- 10. ordinary inputs


def test_an_empty_prompt_generates_from_bos_and_a_long_one_is_cropped_with_a_warning():
    qs, tok = tiny_thinker().eval(), ByteTokenizer()
    assert parse_kv(["prompt="], {"prompt": "Q:"})["prompt"] == ""  # the CLI's prompt= is the empty prompt
    g = generate(qs, tok, [""], max_new_tokens=3, temperature=0, think=True)
    assert len(g.tokens[0]) >= 1
    too_long = "7" * (qs.model.cfg.max_seq_len + 10)
    with pytest.warns(UserWarning, match="prompt: .* tokens, more than"):
        g = generate(qs, tok, [too_long], max_new_tokens=2, temperature=0, think=True)
    assert len(g.tokens[0]) >= 1


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_weights_on_cpu_are_refused_naming_the_field(tmp_path, dtype):
    with pytest.raises(UserError, match=f"model.dtype={dtype} is not supported on CPU"):
        train_script.train(tiny_cfg(tmp_path, f"model.dtype={dtype}", "train.max_steps=1"))
    assert not (tmp_path / "checkpoints").exists()


# ---------------------------------------------------------------------------------------- readable errors


def train_cli(args, env=None):
    return subprocess.run([sys.executable, "train.py", *TINY, *args], cwd=ROOT, capture_output=True, text=True,
                          env={**{k: v for k, v in ENV.items() if k != "HYDRA_FULL_ERROR"}, **(env or {})}, timeout=300)


def test_a_user_error_is_one_line_and_exit_2_and_the_env_var_shows_the_traceback(tmp_path):
    proc = train_cli(["optim.lr=nan", f"hydra.run.dir={tmp_path}"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: optim.lr must be > 0, got nan"
    proc = train_cli(["optim.lr=nan", f"hydra.run.dir={tmp_path}"], env={"QUIETSTAR_TRACEBACK": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "optim.lr must be > 0" in proc.stderr


def test_a_real_bug_keeps_its_traceback(capsys):
    def buggy():
        return {}["size"]

    with pytest.raises(KeyError):
        run_main(buggy)
    assert capsys.readouterr().err == ""


def test_out_of_memory_says_what_to_lower(tmp_path, monkeypatch, capsys):
    def no_memory(self, *args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: "
                           "you tried to allocate 85899345920 bytes.")

    monkeypatch.setattr(QuietStar, "forward", no_memory)
    with pytest.raises(SystemExit) as e:
        run_main(train_script.train, tiny_cfg(tmp_path, "train.max_steps=1"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "out of memory" in err and "data.batch_size" in err


def test_a_malformed_manifest_entry_names_the_manifest(ckpt_copy):
    m = json.loads((ckpt_copy / "manifest.json").read_text())
    m["files"]["config.yaml"] = {"bytes": 12}
    (ckpt_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=r"manifest.json: malformed entry for 'config.yaml'"):
        verify_checkpoint(ckpt_copy)


def test_a_garbage_config_yaml_is_caught_by_the_manifest_before_parsing(ckpt_copy):
    (ckpt_copy / "config.yaml").write_text(": : [unbalanced\n\t- {")
    with pytest.raises(CheckpointError, match=r"config.yaml: corrupt or truncated"):
        read_config_node(ckpt_copy)
    m = json.loads((ckpt_copy / "manifest.json").read_text())  # a manifest that agrees: the YAML itself is bad
    m["files"]["config.yaml"] = {"size": (ckpt_copy / "config.yaml").stat().st_size,
                                 "sha256": ckpt_mod._sha256(ckpt_copy / "config.yaml")}
    (ckpt_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=r"config.yaml: not a readable config"):
        read_config_node(ckpt_copy)


def test_a_wrong_typed_hf_config_field_is_named():
    hf = {"architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": "64", "num_hidden_layers": 2,
          "num_attention_heads": 4, "intermediate_size": 128}
    with pytest.raises(LoadError, match=r"config.json: field 'hidden_size' must be an integer, got '64'"):
        config_from_hf(hf)


def test_a_bad_quietstar_json_names_the_file(ckpt_copy, tmp_path):
    out = tmp_path / "exp"
    export(ckpt_copy, out, fmt="safetensors")
    (out / "quietstar.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"quietstar.json: not a valid export description"):
        load_thinker(out)


@pytest.mark.parametrize("argv,says", [
    (["stray"], "argument 'stray': expected key=value"),
    (["dtype=bogus"], "argument dtype='bogus': must be one of float32, bfloat16, float16"),
])
def test_bad_export_arguments_are_one_line(argv, says, capsys):
    from quietstar.export import main

    with pytest.raises(SystemExit) as e:
        run_main(main, ["ckpt=x", "out=y", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: {says}") and err.count("\n") == 1


# ---------------------------------------------------------------------------------------- 11. distributed runs
# torchrun with gloo on CPU, 2 processes. A near-zero thought temperature makes every thought the argmax, so
# the losses do not depend on which process's generator samples a row (as in test_dist.py).

DIST = ["model=tiny", "logger=none", "data.seq_len=24", "thought.n_ahead=4", "thought.n_ahead_talk=2",
        "thought.gumbel_temperature=1e-6", "train.progress=false", "train.device=cpu", "optim.lr=1e-3",
        "optim.warmup_steps=0", "train.seed=3", "train.record_samples=true", "checkpoint.keep_last=0"]
DIST_ENV = {**{k: v for k, v in ENV.items() if k != "HYDRA_FULL_ERROR"}, "OMP_NUM_THREADS": "1"}
needs_gloo = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()
                                     and Path("/proc/self/environ").exists()),
                                reason="needs torch.distributed with gloo, and /proc to find a worker to kill")


def torchrun(*args, restarts=0):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            f"--max-restarts={restarts}", str(ROOT / "train.py"), *args]


def one_process(*args):
    return [sys.executable, str(ROOT / "train.py"), *args]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cmd, cwd, check=True):
    proc = subprocess.Popen(cmd, cwd=cwd, env={**DIST_ENV, "MASTER_PORT": str(free_port())}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        proc.stdout, proc.stderr = proc.communicate(timeout=300)
    finally:
        kill_group(proc)
    if check:
        assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def kill_group(proc) -> None:
    """SIGKILL a launch and every process it started (torchrun's workers), if any is left."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def first_workers(cwd: Path, local_rank: int) -> list[int]:
    """The pids of the torchrun workers of local rank `local_rank`, first attempt, running in `cwd`."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if not d.name.isdigit() or os.readlink(d / "cwd") != str(cwd):
                continue
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"LOCAL_RANK={local_rank}".encode() in env and b"TORCHELASTIC_RESTART_COUNT=0" in env:
            pids.append(int(d.name))
    return pids


def by_step(path) -> dict:
    """{step: record} of a metrics.jsonl or samples.jsonl."""
    return {r["step"]: r for r in map(json.loads, Path(path).read_text().splitlines())}


def rows(samples: dict, steps) -> list[str]:
    """The ids of the rows all processes consumed in `steps`, sorted."""
    return sorted(i for s in steps for per_rank in samples[s]["rows"] for i in per_rank)


@pytest.fixture(scope="module")
def elastic_run(tmp_path_factory):
    """8 DDP steps on 2 processes under `torchrun --max-restarts=1`, checkpoints at 4 and 8, in the default
    output dir; worker 1 is killed (SIGKILL) once step 5 is logged. -> (process, run dir)."""
    cwd = tmp_path_factory.mktemp("elastic")
    cmd = torchrun("dist=ddp", "data.batch_size=2", "train.max_steps=8", "checkpoint.every=4", *DIST, restarts=1)
    logs = cwd / "stdout", cwd / "stderr"  # files, not pipes: a full pipe would stall the run
    with open(logs[0], "w") as out, open(logs[1], "w") as err:
        proc = subprocess.Popen(cmd, cwd=cwd, env=DIST_ENV, stdout=out, stderr=err, text=True, start_new_session=True)
    killed, deadline = False, time.time() + 240
    try:
        while not killed and proc.poll() is None and time.time() < deadline:
            logged = [by_step(m) for m in cwd.glob("outputs/*/*/metrics.jsonl")]
            if logged and 5 in logged[0]:
                for pid in first_workers(cwd, 1):
                    os.kill(pid, signal.SIGKILL)
                    killed = True
            time.sleep(0.02)
        proc.wait(timeout=max(1, deadline - time.time()))
    finally:
        kill_group(proc)
    proc.stdout, proc.stderr = logs[0].read_text(), logs[1].read_text()
    assert killed, f"worker 1 was never killed:\n{proc.stderr[-3000:]}"
    return proc, cwd


@needs_gloo
def test_an_elastic_restart_resumes_its_own_run_and_repeats_the_lost_steps_bitwise(elastic_run):
    proc, cwd = elastic_run
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    dirs = list(cwd.glob("outputs/*/*"))
    assert len(dirs) == 1, dirs  # every rank and the restart used the one default dir
    run = dirs[0]
    assert f"resumed from {run / 'checkpoints' / 'step_0000004'} at step 4 (elastic restart 1)" in proc.stdout
    metrics, samples = by_step(run / "metrics.jsonl"), by_step(run / "samples.jsonl")
    assert sorted(metrics) == sorted(samples) == list(range(1, 9))  # one timeline
    # the steps the killed group logged after its step-4 checkpoint, run again after the restart: bitwise
    aside = list((run / "checkpoints").glob("abandoned_after_step_0000004_*"))
    assert len(aside) == 1
    lost, lost_samples = by_step(aside[0] / "metrics.jsonl"), by_step(aside[0] / "samples.jsonl")
    assert 5 in lost and set(lost) <= set(range(5, 9))
    for step in lost:
        assert metrics[step]["loss"] == lost[step]["loss"], step
        assert samples[step]["rows"] == lost_samples.get(step, samples[step])["rows"]
    every = rows(samples, range(1, 9))
    assert len(every) == len(set(every)) == 8 * 2 * 2  # steps x processes x rows: none skipped or repeated


@needs_gloo
@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_a_checkpoint_moves_between_world_sizes_without_skipping_data(elastic_run, tmp_path, kind, monkeypatch,
                                                                      capsys):
    """2 processes -> 1 (steps 5-6) -> 2 (steps 7-8), against the elastic run (DDP, 2 processes, 8 steps). The
    one-process leg runs in this process: dist=none for DDP (the same checkpoint format), a world of one for
    FSDP (its sharded checkpoints)."""
    ref_proc, cwd = elastic_run
    assert ref_proc.returncode == 0
    ref = next(cwd.glob("outputs/*/*"))
    source = ref
    if kind == "fsdp":  # its own first 4 steps on 2 processes, sharded checkpoint at 4
        source = tmp_path / "two"
        launch(torchrun("dist=fsdp", "data.batch_size=2", "train.max_steps=4", "checkpoint.every=4", *DIST,
                        f"hydra.run.dir={source}"), tmp_path)
        assert (source / "checkpoints" / "step_0000004" / "sharded").is_dir()
        for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                         MASTER_PORT=str(free_port())).items():
            monkeypatch.setenv(k, v)
    one, two = tmp_path / "one", tmp_path / "two_again"
    train_script.train(tiny_cfg(one, *DIST, f"dist={'fsdp' if kind == 'fsdp' else 'none'}", "data.batch_size=4",
                                "train.max_steps=6", "checkpoint.every=4",
                                f"resume={source / 'checkpoints' / 'step_0000004'}"))
    out = capsys.readouterr().out
    assert "was written by 2 process(es), this run has 1" in out and "global batch stays 4 rows" in out
    p2 = launch(torchrun(f"resume={one / 'checkpoints' / 'step_0000006'}", f"dist={kind}", "data.batch_size=2",
                         "train.max_steps=8", f"hydra.run.dir={two}"), tmp_path)
    assert "was written by 1 process(es), this run has 2" in p2.stdout
    expect, expect_rows = by_step(ref / "metrics.jsonl"), by_step(ref / "samples.jsonl")
    for run, steps in ((one, (5, 6)), (two, (7, 8))):
        got, got_rows = by_step(run / "metrics.jsonl"), by_step(run / "samples.jsonl")
        assert sorted(got) == list(steps)
        assert rows(got_rows, steps) == rows(expect_rows, steps)  # the same rows, none skipped or repeated
        torch.testing.assert_close(torch.tensor([got[s]["loss"] for s in steps]),
                                   torch.tensor([expect[s]["loss"] for s in steps]), rtol=1e-5, atol=1e-6)
    if kind == "fsdp":
        assert (one / "checkpoints" / "step_0000006" / "sharded").is_dir()
        assert (two / "checkpoints" / "step_0000008" / "sharded").is_dir()
    ours = ckpt_mod.read_model_state(two / "checkpoints" / "step_0000008")
    theirs = ckpt_mod.read_model_state(ref / "checkpoints" / "step_0000008")
    for k in theirs:  # weights after 8 steps: the optimizer state carried over through both moves
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-4, atol=1e-5, msg=k)


@needs_gloo
def test_a_locked_run_dir_stops_every_process_with_one_line_and_no_traceback(tmp_path):
    with RunLock(tmp_path / "run"):
        proc = launch(torchrun("dist=ddp", "train.max_steps=2", *DIST, f"hydra.run.dir={tmp_path / 'run'}"),
                      tmp_path, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"in use by another run (pid {os.getpid()})" in errors[0], proc.stderr[-3000:]
    assert "Error executing job" not in proc.stderr and "quietstar/" not in proc.stderr  # torchrun's own summary only
    assert "exitcode  : 2" in proc.stderr and "exitcode  : 1" not in proc.stderr  # both ranks: a user error


def test_a_run_started_again_in_its_dir_resumes_it_and_never_another_run(tmp_path, capsys):
    train_script.train(tiny_cfg(tmp_path, "train.max_steps=2", "checkpoint.every=1"))
    again = train_script.train(tiny_cfg(tmp_path, "train.max_steps=3"))  # the same dir, no resume=: its own
    assert len(again.losses) == 1 and again.step == 3 and [r["step"] for r in records(tmp_path)] == [1, 2, 3]
    assert (f"resumed from {tmp_path / 'checkpoints' / 'step_0000002'} at step 2 (the run dir holds this run's "
            "checkpoints)") in capsys.readouterr().out
    with pytest.raises(UserError, match=r"holds the checkpoints of another run \(step_0000003 differs in "
                                        r"optim.lr: 1e-05 -> 0.002\): continue it with resume="):
        train_script.train(tiny_cfg(tmp_path, "train.max_steps=6", "optim.lr=2e-3", "resume=auto"))
    assert [r["step"] for r in records(tmp_path)] == [1, 2, 3]
    with RunLock(tmp_path):  # the refused run let go of the dir
        pass


def test_a_lock_left_by_a_dead_process_never_blocks(tmp_path):
    pid = os.fork()
    if pid == 0:  # takes the lock and dies holding it, as a killed rank 0 does
        RunLock(tmp_path).acquire()
        os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    assert (tmp_path / ".lock").read_text().strip() == str(pid)
    with RunLock(tmp_path):
        assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())


def test_a_prompt_past_the_models_positions_is_cropped_with_a_warning_on_every_path():
    from quietstar.generate import generate_stream

    qs, tok = tiny_thinker().eval(), ByteTokenizer()
    ids = torch.tensor([[tok.bos_id] + tok.encode("7 + 8 = 15. " * 300)])  # 3,601 byte tokens
    assert ids.shape[1] > qs.model.cfg.max_seq_len
    with pytest.warns(UserWarning, match=r"prompt: 3601 tokens, more than the .* keeping its last"):
        steps = list(generate_stream(qs, ids, max_new_tokens=3, temperature=0, think=True))
    assert len(steps) == 3
    with pytest.raises(UserError, match="max_new_tokens: too large"):
        list(generate_stream(qs, ids[:, :8], max_new_tokens=qs.model.cfg.max_seq_len))
