"""Data parallel on CPU (gloo): 2-process DDP and FSDP2 runs give the loss of a 1-process run with the same
global batch; the FSDP checkpoint is sharded and consolidates to the same weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from quietstar import train as train_script
from quietstar.checkpoint import read_model_state
from quietstar.methods.registry import register_configs

pytestmark = pytest.mark.skipif(not (tdist.is_available() and tdist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

ROOT = Path(__file__).resolve().parents[1]
# near-zero sampling temperature makes every thought the argmax, so the thoughts do not depend on how the
# batch is split over processes (each process has its own sampling generator)
COMMON = ["model=tiny", "logger=none", "data.seq_len=24", "thought.n_ahead=4", "thought.n_ahead_talk=2",
          "thought.gumbel_temperature=1e-6", "train.max_steps=2", "train.progress=false", "train.device=cpu",
          "optim.lr=1e-3", "optim.warmup_steps=0", "train.seed=3"]


def losses(run_dir):
    return [json.loads(line)["loss"] for line in open(Path(run_dir) / "metrics.jsonl")]


def torchrun(kind, out):
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           *COMMON, "data.batch_size=2", f"dist={kind}", f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{kind} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    GlobalHydra.instance().clear()
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        node = compose(config_name="train", overrides=[*COMMON, "data.batch_size=4"])
    GlobalHydra.instance().clear()
    node.output_dir = str(out)
    train_script.train(OmegaConf.to_object(node))
    return out


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_two_processes_match_one_with_the_same_global_batch(single, tmp_path, kind):
    torchrun(kind, tmp_path)
    assert len(losses(tmp_path)) == 2
    torch.testing.assert_close(torch.tensor(losses(tmp_path)), torch.tensor(losses(single)), rtol=1e-5, atol=1e-6)
    ckpt = tmp_path / "checkpoints" / "step_0000002"
    assert {"rng_rank0.pt", "rng_rank1.pt"} <= {p.name for p in ckpt.iterdir()}
    if kind == "fsdp":
        assert (ckpt / "sharded").is_dir() and not (ckpt / "model.safetensors").exists()
    ours, ref = read_model_state(ckpt), read_model_state(single / "checkpoints" / "step_0000002")
    assert set(ours) == set(ref)
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-4, atol=1e-5, msg=k)
