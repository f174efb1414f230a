"""Checkpoints: an exact round trip of everything a resume needs, atomic writes, keep-last-k, plain keys,
and refusal (naming the file) of partial, corrupt or mismatched checkpoints."""

import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quietstar.checkpoint import CheckpointError, find_checkpoint, load_checkpoint, save_checkpoint, verify_checkpoint
from quietstar.methods.quietstar.load import load_thinker_checkpoint
from quietstar.config import OptimConfig
from quietstar.data import ListDocs, SequenceStream, synthetic_math
from quietstar.model import ModelConfig, Transformer
from quietstar.optim import build_optimizer, maybe_compile
from quietstar.tokenizer import ByteTokenizer
from quietstar.methods.quietstar.thinker import QuietStar
from quietstar.methods.quietstar.config import ThoughtConfig

THOUGHT = ThoughtConfig(n_ahead=4, n_ahead_talk=2)


def make(seed=0, n_layers=2):
    """A tiny QuietStar with its optimizer, schedule, thought generator and data stream."""
    torch.manual_seed(seed)
    tok = ByteTokenizer()
    qs = QuietStar(Transformer(ModelConfig.from_preset("tiny", n_layers=n_layers)), tok, THOUGHT)
    opt, sched = build_optimizer(qs, OptimConfig(lr=1e-3, warmup_steps=1, schedule="cosine"), max_steps=10)
    gen = torch.Generator().manual_seed(seed + 1)
    stream = SequenceStream(ListDocs(synthetic_math(20, 0), 0), tok, 24, "crop", 0, batch_size=2)
    return qs, opt, sched, gen, stream


def step(qs, opt, sched, gen, stream):
    b = stream.next_batch()
    out = qs(b.input_ids, attention_mask=b.attention_mask, generator=gen)
    out.loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return float(out.loss.detach())


def save(root, n, parts, **kw):
    qs, opt, sched, gen, stream = parts
    return save_checkpoint(root, n, qs, opt, sched, data_state=stream.state_dict(), generator=gen,
                           config_yaml="thought: {n_ahead: 4, n_ahead_talk: 2}\n", tokenizer=qs.tokenizer, **kw)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint after 2 steps, and the losses of steps 3-4 of the uninterrupted run."""
    root = tmp_path_factory.mktemp("run") / "checkpoints"
    parts = make()
    for _ in range(2):
        step(*parts)
    path = save(root, 2, parts)
    torch.manual_seed(123)  # the global RNG state was captured before this
    later = [step(*parts) for _ in range(2)]
    return path, later


def test_round_trip_continues_exactly(saved):
    path, later = saved
    parts = make(seed=7)  # different init, RNG and position: all overwritten by the load
    state = load_checkpoint(path, parts[0], parts[1], parts[2], parts[3])
    parts[4].load_state_dict(state["data"])
    assert state["step"] == 2 and parts[2].last_epoch == 2
    assert [step(*parts) for _ in range(2)] == later


def test_layout_keys_and_manifest(saved):
    path, _ = saved
    manifest = verify_checkpoint(path)
    assert path.name == "step_0000002" and manifest["step"] == 2
    for f in ["model.safetensors", "optimizer.pt", "train_state.pt", "rng_rank0.pt", "config.yaml",
              "model_config.json", "tokenizer_config.json", "state.json"]:
        assert f in manifest["files"] and manifest["files"][f]["sha256"]
    keys = set(load_file(path / "model.safetensors"))
    assert {"start_embedding", "end_embedding", "talk_head.net.0.weight", "model.tok_embeddings.weight"} <= keys
    assert not any(k.startswith(("_orig_mod", "module.")) or "._orig_mod." in k for k in keys)
    qs = load_thinker_checkpoint(path)
    assert isinstance(qs, QuietStar) and isinstance(qs.tokenizer, ByteTokenizer)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised by torch's own compile machinery
def test_compiled_blocks_keep_plain_state_dict_keys():
    qs = make()[0]
    before = list(qs.state_dict())
    maybe_compile(qs.model, True)
    assert list(qs.state_dict()) == before


def corrupt_copy(src, dst, how):
    shutil.copytree(src, dst)
    if how == "truncate":
        f = dst / "model.safetensors"
        f.write_bytes(f.read_bytes()[:100])
        return "model.safetensors", "truncated"
    if how == "flip":
        f = dst / "optimizer.pt"
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
        return "optimizer.pt", "sha256 does not match"
    if how == "no_manifest":
        (dst / "manifest.json").unlink()
        return "manifest.json", "partial checkpoint"
    if how == "missing_file":
        (dst / "rng_rank0.pt").unlink()
        return "rng_rank0.pt", "missing"
    raise ValueError(how)


@pytest.mark.parametrize("how", ["truncate", "flip", "no_manifest", "missing_file"])
def test_partial_or_corrupt_checkpoints_are_refused_naming_the_file(saved, tmp_path, how):
    path, _ = saved
    bad = tmp_path / "step_0000002"
    name, what = corrupt_copy(path, bad, how)
    qs, opt, sched, gen, _ = parts = make(seed=3)
    before = {k: v.clone() for k, v in qs.state_dict().items()}
    with pytest.raises(CheckpointError, match=rf"{bad / name}.*{what}"):
        load_checkpoint(bad, qs, opt, sched, gen)
    assert all(torch.equal(before[k], v) for k, v in qs.state_dict().items())  # nothing was half-loaded
    assert verify_checkpoint(path)  # the original is untouched


def test_a_checkpoint_for_another_model_is_refused(saved):
    path, _ = saved
    qs, opt, sched, gen, _ = make(n_layers=3)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: does not match this model"):
        load_checkpoint(path, qs, opt, sched, gen)


def test_atomic_save_keep_last_and_find(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    parts = make()
    for n in (1, 2, 3):
        save(root, n, parts, keep_last=2, verify_hashes=False)
    assert sorted(p.name for p in root.iterdir()) == ["step_0000002", "step_0000003"]
    # a crash while saving step 4 (before the rename) leaves the completed checkpoints as they were
    real_rename = os.rename

    def crash(src, dst):
        if Path(dst).name == "step_0000004":
            raise OSError("simulated crash")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(OSError, match="simulated crash"):
        save(root, 4, parts, keep_last=2)
    monkeypatch.setattr(os, "rename", real_rename)
    assert not (root / "step_0000004").exists()
    assert find_checkpoint(tmp_path) == find_checkpoint(root) == root / "step_0000003"
    # a step dir left without its manifest (e.g. copied half-way) is never picked as the newest
    (root / "step_0000009").mkdir()
    assert find_checkpoint(tmp_path) == root / "step_0000003"
    save(root, 4, parts, keep_last=0)  # the stale temporary dir is replaced
    assert find_checkpoint(root) == root / "step_0000004" and not (root / ".tmp-step_0000004").exists()
    with pytest.raises(CheckpointError, match="does not exist"):
        find_checkpoint(tmp_path / "nope")
