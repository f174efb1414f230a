"""Runs that continue by themselves: which checkpoint a starting run resumes, and a run dir that stays the same
across torchrun's restarts.

A run resumes the newest healthy checkpoint of its own run dir when

  - it is an elastic restart (torchrun's `--max-restarts`: TORCHELASTIC_RESTART_COUNT > 0),
  - `resume=auto` is given, or
  - the run dir already holds checkpoints (a job started again with the same `hydra.run.dir`),

and says so in one line. It never resumes another run silently: the checkpoint's saved config must agree
with this run's on every field that shapes the training (RESUMABLE_CHANGES lists the fields that may
differ); otherwise the start is refused in one line naming the fields. An explicit `resume=<path>` is
unchanged: the checkpoint's config, with the command line's changes on top.

The default run dir (configs/train.yaml: outputs/<date>/<time>-<pid>) is named after the launching process:
under torchrun that is the elastic agent, whose start time and pid are the same for every rank and every
restart, so a restarted group finds the dir and the checkpoints of the group before it.
"""

from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from quietstar.checkpoint import CheckpointError, complete_checkpoints, read_config_node, verify_checkpoint
from quietstar.dist import restart_count
from quietstar.errors import UserError
from quietstar.rundir import set_aside_later

RESUMABLE_CHANGES = ("resume", "output_dir", "init_from", "train.max_steps", "train.progress", "train.log_every",
                     "train.threads", "train.device", "train.memory_budget_gb", "train.record_samples",
                     "train.compile", "dist.", "logger.", "checkpoint.", "data.batch_size", "optim.grad_accum",
                     "attention.backend")
"""Fields (or prefixes ending in '.') a resumed run may change: the length of the run, where and how it
runs (the number of processes with it, so the per-process batch and accumulation), logging, checkpointing."""


class OtherRunError(UserError):
    """The run dir holds the checkpoints of a run with another config."""


# --------------------------------------------------------------------------------------------------
# the launching process: the same for every rank and restart under torchrun


_LAUNCH: dict = {}


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def launcher_pid() -> int:
    """The pid of the process that launched this run: torchrun's agent under torchrun, else this process."""
    return os.getppid() if under_torchrun() else os.getpid()


def _process_start_time(pid: int) -> Optional[float]:
    """The start time (seconds since the epoch) of a process, from /proc; None where there is no /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 of stat, counted from the state field (field 3)
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def launch_time(fmt: str = "%Y-%m-%d/%H-%M-%S") -> str:
    """When the run was launched, formatted (strftime): torchrun's agent's start time under torchrun (so every
    rank and every restart agree), else the first call's time in this process."""
    if "t" not in _LAUNCH:
        t = _process_start_time(launcher_pid()) if under_torchrun() else None
        _LAUNCH["t"] = t if t is not None else time.time()
    return datetime.datetime.fromtimestamp(_LAUNCH["t"]).strftime(fmt)


# --------------------------------------------------------------------------------------------------
# which checkpoint a starting run resumes


@dataclass
class ResumeChoice:
    path: Optional[Path]  # the checkpoint to resume, or None: a new run
    reason: str  # why (for the one line the run prints)


def config_differences(saved: dict, ours: dict) -> list[str]:
    """`field: saved -> ours` for every field both configs have that differs and may not change on resume."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    a, b = flat(saved), flat(ours)
    free = lambda key: any(key == f or (f.endswith(".") and key.startswith(f)) for f in RESUMABLE_CHANGES)  # noqa: E731
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in sorted(set(a) & set(b)) if not free(k) and a[k] != b[k]]


def own_checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoints of a run dir, newest first."""
    root = Path(run_dir) / "checkpoints"
    return complete_checkpoints(root)[::-1] if root.is_dir() else []


def choose_resume(cfg, run_dir: Path) -> ResumeChoice:
    """The checkpoint a run starting in `run_dir` with config `cfg` resumes (see the module docstring).

    Call on rank 0 only, holding the run dir's lock, after `recover_checkpoints`. An explicit resume=<path>
    is returned as it is; OtherRunError if the dir's newest checkpoint belongs to a run with another config."""
    from omegaconf import OmegaConf

    restarts = restart_count()
    if cfg.resume and cfg.resume != "auto" and not (restarts and own_checkpoints(run_dir)):
        return ResumeChoice(Path(cfg.resume), "")  # a restart of such a run resumes its own newer checkpoints
    reason = (f"elastic restart {restarts}" if restarts else "resume=auto" if cfg.resume == "auto"
              else "the run dir holds this run's checkpoints")
    ours = OmegaConf.to_container(OmegaConf.structured(cfg))
    for path in own_checkpoints(run_dir):
        try:
            verify_checkpoint(path, check_hashes=False)
            saved = OmegaConf.to_container(read_config_node(path))
        except CheckpointError as e:
            print(f"skipping {path}: {e}", flush=True)
            continue
        diff = config_differences(saved, ours)
        if diff:
            raise OtherRunError(f"{run_dir} holds the checkpoints of another run ({path.name} differs in "
                                f"{'; '.join(diff[:4])}{'; ...' if len(diff) > 4 else ''}): continue it with "
                                f"resume={path} (its config, with the command line's changes), or choose another "
                                "output dir (hydra.run.dir=...)")
        return ResumeChoice(path, reason)
    if restarts or cfg.resume == "auto":
        # no checkpoint yet: a new run; records an earlier attempt logged are set aside, never mixed in
        aside = set_aside_later(Path(run_dir) / "checkpoints", 0, Path(run_dir) / "metrics.jsonl")
        note = f"; the earlier attempt's records moved to {aside}" if aside else ""
        return ResumeChoice(None, f"{reason}: no checkpoint in {run_dir} yet, starting at step 0{note}")
    return ResumeChoice(None, "")
