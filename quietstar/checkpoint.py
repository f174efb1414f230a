"""The checkpoint format: a step dir written atomically, verified, read back and loaded; keep-last-k.

Layout of `<output dir>/checkpoints/step_0000120/`:

    model.safetensors      the whole QuietStar state dict: base model (`model.*`), start/end thought
                           embeddings, talk head (`talk_head.*`); fp32 master weights. Not with FSDP:
    sharded/               FSDP: model + optimizer as torch.distributed.checkpoint shards
    optimizer.pt           AdamW state (one process or DDP; absent with FSDP, or save_optimizer=false)
    train_state.pt         step, LR scheduler, data cursor, wandb run id, counters (tokens seen)
    rng_rank{r}.pt         per rank: torch CPU / CUDA, Python, numpy, and the thought-sampling generator
    model_config.json      the base model's ModelConfig (so the model is rebuilt without its source file)
    tokenizer.json, tokenizer_config.json   the tokenizer (or a byte-tokenizer marker; tokenizer.py)
    config.yaml            the fully resolved training config
    state.json             human-readable step, data cursor and wandb id
    manifest.json          written last: every file with its size and sha256

Writing is atomic: everything goes to a temporary sibling dir `.tmp-step_N/`, each file is fsynced, the
manifest is renamed in last, then the dir is renamed into place (and the parent fsynced). Saving a step
that exists renames the old copy to `.old-step_N/` first and deletes it only once the new one is in place;
`recover_checkpoints` (run before every save and when a run starts) finishes or rolls back a save that a
crash interrupted, so at every instruction a complete `step_N` exists or is restored (SAVE_POINTS). No
checkpoint is written from non-finite weights. Loading checks the manifest first and refuses a partial or
corrupt checkpoint with an error naming the offending file.

The run dir around the checkpoints (its lock, setting later steps aside on resume) is rundir.py's.

Checkpoints are saved from the unwrapped, uncompiled module (compile is per block and in place), so keys
never carry `_orig_mod.` or DDP's `module.` prefix.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn

from quietstar.errors import UserError
from quietstar.tokenizer import save_tokenizer

FORMAT_VERSION = 1
STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp-"  # a checkpoint being written
OLD_PREFIX = ".old-"  # the previous copy of a step being saved again, until the new one is in place


class CheckpointError(UserError):
    """A checkpoint that cannot be used (partial, corrupt, or for another model); names the file."""


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:07d}"


def step_of(path: Path) -> int:
    return int(Path(path).name[len(STEP_PREFIX):])


# --------------------------------------------------------------------------------------------------
# RNG state


def capture_rng(generator: Optional[torch.Generator] = None) -> dict:
    """Every RNG the training step can touch, plus the thought-sampling generator."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def restore_rng(state: dict, generator: Optional[torch.Generator] = None) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


# --------------------------------------------------------------------------------------------------
# files


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not support fsync on a directory
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


# --------------------------------------------------------------------------------------------------
# finding and verifying


def find_checkpoint(path) -> Path:
    """A step dir from a step dir, a `checkpoints/` dir or a run dir (the newest complete step)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if path.name.startswith(STEP_PREFIX) or (path / "manifest.json").exists() or (path / "model.safetensors").exists():
        return path
    steps = complete_checkpoints(path)
    if not steps:
        raise CheckpointError(f"no complete checkpoint ({STEP_PREFIX}XXXXXXX/manifest.json) under {str(path)!r}")
    return steps[-1]


def complete_checkpoints(path) -> list[Path]:
    """The complete step dirs (manifest written) under a `checkpoints/` dir or a run dir, oldest first."""
    path = Path(path).expanduser()
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    return sorted((p for p in root.glob(f"{STEP_PREFIX}*") if p.is_dir() and (p / "manifest.json").is_file()),
                  key=step_of)


def verify_checkpoint(path, check_hashes: bool = True) -> dict:
    """The manifest of a complete, intact checkpoint; CheckpointError naming the bad file otherwise."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"{manifest_path}: missing: {path} is a partial checkpoint (interrupted while saving?) "
                              "or not a checkpoint")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({type(e).__name__}: {e})") from e
    _check_manifest_entries(manifest_path, files)
    for name, meta in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing from the checkpoint (listed in manifest.json)")
        size = f.stat().st_size
        if size != meta["size"]:
            raise CheckpointError(f"{f}: corrupt or truncated: {size} bytes, the manifest says {meta['size']}")
        if check_hashes and meta.get("sha256") and _sha256(f) != meta["sha256"]:
            raise CheckpointError(f"{f}: corrupt: sha256 does not match the manifest")
    return manifest


def _check_manifest_entries(manifest_path: Path, files) -> None:
    """Each entry of manifest.json's `files` is {"size": int, "sha256": str or null}."""
    if not isinstance(files, dict):
        raise CheckpointError(f"{manifest_path}: 'files' must be an object, got {type(files).__name__}")
    for name, meta in files.items():
        ok = (isinstance(meta, dict) and isinstance(meta.get("size"), int) and not isinstance(meta["size"], bool)
              and isinstance(meta.get("sha256"), (str, type(None))))
        if not ok:
            raise CheckpointError(f"{manifest_path}: malformed entry for {name!r} (expected "
                                  f'{{"size": <bytes>, "sha256": <hex or null>}}, got {meta!r})')


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from e


def read_model_state(path) -> dict[str, torch.Tensor]:
    """The full QuietStar state dict of a checkpoint (consolidating FSDP shards if needed), on CPU."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        try:
            return load_file(path / "model.safetensors")
        except Exception as e:
            raise CheckpointError(f"{path / 'model.safetensors'}: unreadable ({type(e).__name__}: {e})") from e
    if (path / "sharded").is_dir():
        import tempfile

        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(path / "sharded", Path(tmp) / "full.pt")
            state = _torch_load(Path(tmp) / "full.pt")
        if isinstance(state.get("model"), dict):
            return state["model"]
        return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    raise CheckpointError(f"{path / 'model.safetensors'}: missing (and no sharded/ FSDP checkpoint)")


def read_model_config(path):
    from quietstar.model import ModelConfig

    f = Path(path) / "model_config.json"
    if not f.is_file():
        raise CheckpointError(f"{f}: missing")
    return ModelConfig(**json.loads(f.read_text()))


def read_config_node(path):
    """The saved config.yaml of a checkpoint as a DictConfig, after verifying the checkpoint (a damaged file
    is reported by the manifest check, not as a YAML error)."""
    from omegaconf import DictConfig, OmegaConf

    path = find_checkpoint(path)
    meta = verify_checkpoint(path, check_hashes=False)["files"].get("config.yaml")  # sizes; one hash below
    f = path / "config.yaml"
    if not f.is_file():
        raise CheckpointError(f"{f}: missing")
    if meta and meta.get("sha256") and _sha256(f) != meta["sha256"]:
        raise CheckpointError(f"{f}: corrupt: sha256 does not match the manifest")
    try:
        node = OmegaConf.load(f)
    except Exception as e:  # yaml's and omegaconf's own error types
        raise CheckpointError(f"{f}: not a readable config ({type(e).__name__}: {' '.join(str(e).split())})") from e
    if not isinstance(node, DictConfig):
        raise CheckpointError(f"{f}: not a config mapping")
    return node


def read_train_config(path, schema: type):
    """The config saved with a checkpoint, as an instance of `schema` (the root config class, TrainConfig)."""
    from quietstar.config import load_config

    try:
        return load_config(read_config_node(path), schema)
    except CheckpointError:
        raise
    except UserError as e:
        raise CheckpointError(f"{Path(path) / 'config.yaml'}: {e}") from e


def read_config_section(path, name: str, cls: type):
    """One section of the config saved with a checkpoint, as `cls` (e.g. "thought", ThoughtConfig)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    node = read_config_node(path)
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), node.get(name) or {}))
    except (OmegaConfBaseException, ValueError, TypeError) as e:
        raise CheckpointError(f"{Path(path) / 'config.yaml'}: {name}: {' '.join(str(e).split())}") from e


# --------------------------------------------------------------------------------------------------
# save


SAVE_POINTS = ("written", "old_aside", "new_in_place", "old_removed", "pruned")
"""The points of the save sequence after which `save_checkpoint(on_point=...)` is called, in order:
  written       every file of `.tmp-step_N` is written and fsynced, manifest.json last
  old_aside     an existing `step_N` (the same step saved again) is renamed to `.old-step_N`
  new_in_place  `.tmp-step_N` is renamed to `step_N`
  old_removed   `.old-step_N` is deleted
  pruned        keep_last: older checkpoints are deleted
At every point a complete `step_N` (old or new) exists or is restored by `recover_checkpoints`."""


class NonFiniteStateError(RuntimeError):
    """The model holds NaN / inf: it is never written as a checkpoint."""


def non_finite_tensor(qs: nn.Module) -> Optional[str]:
    """The name of the first parameter or buffer of `qs` with a NaN / inf, or None."""
    for name, t in [*qs.named_parameters(), *qs.named_buffers()]:
        t = t.to_local() if hasattr(t, "to_local") else t  # FSDP: this rank's shard
        if t.is_floating_point() and not bool(torch.isfinite(t.detach()).all()):
            return name
    return None


def recover_checkpoints(root) -> list[str]:
    """Finish or roll back a save that a crash interrupted. -> one line per action taken.

    A complete `.tmp-step_N` (its manifest is written last) whose `step_N` is missing is renamed into place
    (finish); else a `.old-step_N` whose `step_N` is missing is renamed back (roll back). Leftover `.old-*`
    and incomplete `.tmp-*` dirs are then deleted. Call only while no process is saving into `root`."""
    root, done = Path(root), []
    if not root.is_dir():
        return done
    for tmp in sorted(root.glob(f"{TMP_PREFIX}{STEP_PREFIX}*")):
        final = root / tmp.name.removeprefix(TMP_PREFIX)
        if not final.exists() and _is_complete(tmp):
            os.rename(tmp, final)
            done.append(f"{final}: finished an interrupted save")
    for old in sorted(root.glob(f"{OLD_PREFIX}{STEP_PREFIX}*")):
        final = root / old.name.removeprefix(OLD_PREFIX)
        if not final.exists():
            os.rename(old, final)
            done.append(f"{final}: rolled back an interrupted replace")
    for leftover in [*root.glob(f"{TMP_PREFIX}*"), *root.glob(f"{OLD_PREFIX}*")]:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:  # a manifest being written (.tmp-step_N.manifest.part)
            leftover.unlink(missing_ok=True)
    fsync_dir(root)
    return done


def _is_complete(path: Path) -> bool:
    """Every file of the manifest is there with its size (hashes are checked on load)."""
    try:
        verify_checkpoint(path, check_hashes=False)
        return True
    except CheckpointError:
        return False


def save_checkpoint(root, step: int, qs: nn.Module, optimizer, scheduler, *, data_state: dict,
                    generator: Optional[torch.Generator], config_yaml: str, tokenizer, dist=None,
                    wandb_id: Optional[str] = None, keep_last: int = 0, save_optimizer: bool = True,
                    verify_hashes: bool = True, extra: Optional[dict] = None, protect: Optional[Path] = None,
                    on_point: Optional[Callable[[str], None]] = None) -> Path:
    """Write `<root>/step_XXXXXXX/` atomically (every rank calls this under FSDP/DDP). -> its path.

    NonFiniteStateError (nothing written) if any weight is NaN / inf. A write error removes the partial
    temporary dir; a full disk is a CheckpointError saying so. keep_last pruning never deletes the checkpoint
    just written nor `protect`. `on_point(name)` is called at each of
    SAVE_POINTS (a test hook: fault injection at every step of the sequence)."""
    from quietstar.dist import DistInfo

    dist = dist or DistInfo()
    bad = non_finite_tensor(qs)
    if dist.any(bad is not None):
        raise NonFiniteStateError(f"step {step}: the model holds non-finite values ({bad or 'on another rank'}); "
                                  "no checkpoint written")
    root = Path(root)
    final, tmp = root / step_dir_name(step), root / f"{TMP_PREFIX}{step_dir_name(step)}"
    if dist.is_main:
        root.mkdir(parents=True, exist_ok=True)
        recover_checkpoints(root)
        tmp.mkdir()
    dist.barrier()
    try:
        _write_rank_files(tmp, qs, optimizer, generator, dist, save_optimizer)
        if dist.is_main:
            info = {"step": step, "data": data_state, "wandb_id": wandb_id, "world_size": dist.world_size,
                    "dist": dist.kind, "extra": extra or {}}
            _write_main_files(tmp, qs, optimizer, scheduler, info, config_yaml, tokenizer, dist, save_optimizer)
            _write_manifest(tmp, step, verify_hashes)
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_write_error(e, tmp)
    if dist.is_main:
        _commit(tmp, final, keep_last, on_point or (lambda name: None), protect)
    dist.barrier()
    return final


def _write_rank_files(tmp: Path, qs, optimizer, generator, dist, save_optimizer: bool) -> None:
    """Every rank: its RNG; FSDP: the model and optimizer shards."""
    torch.save(capture_rng(generator), tmp / f"rng_rank{dist.rank}.pt")
    if dist.kind == "fsdp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(qs, optimizer)
        dcp.save({"model": msd, "optim": osd} if save_optimizer else {"model": msd},
                 checkpoint_id=str(tmp / "sharded"))
    dist.barrier()


def _write_main_files(tmp: Path, qs, optimizer, scheduler, info: dict, config_yaml: str, tokenizer, dist,
                      save_optimizer: bool) -> None:
    from safetensors.torch import save_file

    if dist.kind != "fsdp":
        state = {k: v.detach().contiguous().cpu() for k, v in qs.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "step": str(info["step"])})
        if save_optimizer:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({**info, "scheduler": scheduler.state_dict()}, tmp / "train_state.pt")
    _write_json(tmp / "state.json", info)
    _write_json(tmp / "model_config.json", qs.model.cfg.to_dict())
    save_tokenizer(tokenizer, tmp)
    (tmp / "config.yaml").write_text(config_yaml)


def _write_manifest(tmp: Path, step: int, verify_hashes: bool) -> None:
    """fsync every file, then write manifest.json (the mark of a complete checkpoint) and fsync the dirs."""
    files = {}
    for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
        fsync_file(f)
        files[str(f.relative_to(tmp))] = {"size": f.stat().st_size, "sha256": _sha256(f) if verify_hashes else None}
    part = tmp.parent / f"{tmp.name}.manifest.part"  # outside tmp: never listed in the manifest
    _write_json(part, {"format_version": FORMAT_VERSION, "step": step, "files": files})
    fsync_file(part)
    os.rename(part, tmp / "manifest.json")  # whole or absent, never half written
    for d in sorted({p.parent for p in tmp.rglob("*")}, key=lambda p: -len(p.parts)):
        fsync_dir(d)


def _raise_write_error(e: BaseException, tmp: Path):
    """A full disk -> CheckpointError naming the filesystem; any other write error is re-raised."""
    import errno

    text = str(e)
    full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text or (
        "unexpected pos" in text or "file write failed" in text)
    if full:
        raise CheckpointError(f"no space left on {tmp.parent} while writing checkpoint {tmp.name}; the partial "
                              "checkpoint was removed and the earlier ones are intact") from e
    raise e


def _commit(tmp: Path, final: Path, keep_last: int, point: Callable[[str], None], protect: Optional[Path]) -> None:
    """Rename the complete `tmp` into place; an existing `final` is set aside first and deleted only after."""
    root = final.parent
    point("written")
    old = root / f"{OLD_PREFIX}{final.name}"
    if final.exists():  # the same step saved again (e.g. a resumed run into the same dir)
        os.rename(final, old)
        fsync_dir(root)
        point("old_aside")
    os.rename(tmp, final)
    fsync_dir(root)
    point("new_in_place")
    if old.exists():
        shutil.rmtree(old)
        fsync_dir(root)
        point("old_removed")
    if keep_last > 0:
        prune_checkpoints(root, keep_last, keep=(final, protect))
        point("pruned")


def prune_checkpoints(root, keep_last: int, keep=()) -> None:
    """Delete all but the newest `keep_last` checkpoints; those in `keep` (paths or None) are never deleted."""
    root = Path(root)
    spared = {Path(k).name for k in keep if k is not None}
    steps = sorted(p for p in root.glob(f"{STEP_PREFIX}*") if p.is_dir())
    for p in steps[:-keep_last]:
        if p.name not in spared:
            shutil.rmtree(p, ignore_errors=True)
    fsync_dir(root)


# --------------------------------------------------------------------------------------------------
# load


def load_checkpoint(path, qs: nn.Module, optimizer=None, scheduler=None, generator=None, dist=None,
                    check_hashes: bool = True) -> dict:
    """Restore a checkpoint into a (possibly FSDP-sharded) model, optimizer, scheduler and RNGs.

    -> the train state: {"step", "data" (cursor), "wandb_id", ...}. Refuses a partial or corrupt checkpoint.
    """
    import warnings

    from quietstar.dist import DistInfo

    dist = dist or DistInfo()
    path = find_checkpoint(path)
    verify_checkpoint(path, check_hashes and dist.is_main)
    state = _torch_load(path / "train_state.pt")
    sharded = (path / "sharded").is_dir()
    # the hyperparameters this run was configured with (they win over the saved ones; see _restore_schedule)
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups] if optimizer is not None else None

    if dist.kind == "fsdp" and sharded:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(qs, optimizer)
        want = {"model": msd, "optim": osd} if optimizer is not None else {"model": msd}
        dcp.load(want, checkpoint_id=str(path / "sharded"))
        set_state_dict(qs, optimizer, model_state_dict=want["model"],
                       optim_state_dict=want.get("optim", {}) if optimizer is not None else {})
    else:
        model_state = read_model_state(path)
        _load_model_state(qs, model_state, path, dist)
        if optimizer is not None:
            if sharded or not (path / "optimizer.pt").is_file():
                raise CheckpointError(f"{path / 'optimizer.pt'}: missing; cannot resume the optimizer "
                                      "(saved with save_optimizer=false or by a different dist.kind)")
            opt_state = _torch_load(path / "optimizer.pt")
            if dist.kind == "fsdp":
                from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

                set_optimizer_state_dict(qs, optimizer, opt_state)
            else:
                try:
                    optimizer.load_state_dict(opt_state)
                except (ValueError, KeyError) as e:
                    raise CheckpointError(f"{path / 'optimizer.pt'}: does not match this model's optimizer ({e})") from e
    if scheduler is not None:
        _restore_schedule(scheduler, optimizer, state["scheduler"], fresh)
    rng_file = path / f"rng_rank{dist.rank}.pt"
    if rng_file.is_file():
        restore_rng(_torch_load(rng_file), generator)
    else:
        warnings.warn(f"{rng_file}: missing (the checkpoint was written by {state.get('world_size')} process(es)); "
                      "RNG states are not restored, so the run is not bitwise identical to an uninterrupted one")
    return state


def _restore_schedule(scheduler, optimizer, saved: dict, fresh: Optional[list]) -> None:
    """Restore the schedule's position, keeping this run's configured LR, schedule shape and AdamW settings
    (so `resume=... optim.lr=...` changes the LR); with an unchanged config the values are the saved ones."""
    saved = {**saved, "lr_lambdas": [None] * len(saved.get("lr_lambdas", []))}
    base_lrs = list(scheduler.base_lrs)
    scheduler.load_state_dict(saved)
    scheduler.base_lrs = base_lrs
    if optimizer is None or fresh is None:
        return
    step = scheduler.last_epoch
    for g, f, base, fn in zip(optimizer.param_groups, fresh, base_lrs, scheduler.lr_lambdas):
        g.update(f)
        g["initial_lr"] = base
        g["lr"] = base * fn(step)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def _load_model_state(qs: nn.Module, sd: dict, path: Path, dist) -> None:
    if dist.kind == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(qs, sd, options=StateDictOptions(full_state_dict=True))
        return
    want = qs.state_dict()
    missing, unexpected = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    if missing or unexpected:
        raise CheckpointError(f"{path / 'model.safetensors'}: does not match this model (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(want[k].shape):
            raise CheckpointError(f"{path / 'model.safetensors'}: {k} has shape {tuple(v.shape)}, this model has "
                                  f"{tuple(want[k].shape)}")
    qs.load_state_dict(sd, strict=True)


def init_weights(qs: nn.Module, path) -> Path:
    """Load only the model weights of a checkpoint into `qs` (a new run starting from them). -> the step dir."""
    path = find_checkpoint(path)
    verify_checkpoint(path)
    from quietstar.dist import DistInfo

    sd, own = read_model_state(path), qs.state_dict()
    # thought.where=gate's head is the one part a new run may add or leave out: a run that starts one keeps
    # its fresh init, a run without one drops the source's
    sd = {k: v for k, v in sd.items() if not k.startswith("gate.") or k in own}
    sd.update({k: v for k, v in own.items() if k.startswith("gate.") and k not in sd})
    # thought.ema_decay's teacher starts at the weights the new run starts from, whatever the source held
    sd = {k: v for k, v in sd.items() if not k.startswith("ema.")}
    sd.update({k: v for k, v in own.items() if k.startswith("ema.")})
    _load_model_state(qs, sd, path, DistInfo())
    if getattr(qs, "ema", None) is not None:
        qs.ema.reset(qs.model)
    return path
