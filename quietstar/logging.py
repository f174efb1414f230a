"""Run tracking: wandb on rank 0 (offline unless the user says online) or a null run; always metrics.jsonl.

    run = start_run(cfg.logger, out_dir, config=config_to_dict(cfg), rank=rank, resume_id=...)
    run.log({"train/loss": 2.31, "thought/reward_mean": 0.01, "perf/tok_per_s": 950.0}, step=12)
    run.finish()

Keys are namespaced (`train/`, `thought/`, `perf/`), every record carries an explicit step, and every
record is also appended, as one JSON object with `step` and the bare `loss`, to `<out_dir>/metrics.jsonl`
so a run can be analysed offline. Non-zero ranks get a run that does nothing.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

# wandb is quiet and local unless the user opts in; set before wandb is imported anywhere
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_CONSOLE", "off")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")
os.environ.setdefault("WANDB_DISABLE_CODE", "true")


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # JSON has no nan/inf
    return value


class NullRun:
    """A run that records nothing (logger=none, or a non-zero rank); `id` is None."""

    id: Optional[str] = None
    dir: Optional[str] = None

    def log(self, metrics: dict, step: int) -> None:
        pass

    def summary(self, values: dict) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class JsonlRun(NullRun):
    """Appends each record to metrics.jsonl, and forwards it to an inner run (wandb or null)."""

    def __init__(self, path: Path, inner: NullRun):
        self.path, self.inner = Path(path), inner
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", buffering=1)  # line-buffered: a killed run loses at most a partial line
        self.id, self.dir = inner.id, inner.dir

    def log(self, metrics: dict, step: int) -> None:
        rec = {"step": int(step)}
        if "train/loss" in metrics:
            rec["loss"] = _plain(metrics["train/loss"])
        rec.update({k: _plain(v) for k, v in metrics.items()})
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()
        self.inner.log(metrics, step)

    def summary(self, values: dict) -> None:
        self.inner.summary(values)

    def finish(self, exit_code: int = 0) -> None:
        if not self._f.closed:
            self._f.close()
        self.inner.finish(exit_code)


class WandbRun(NullRun):
    def __init__(self, cfg, out_dir: Path, config: dict, resume_id: Optional[str] = None):
        import wandb

        self._wandb = wandb
        settings = wandb.Settings(console="off", disable_git=True, disable_code=True, silent=True)
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.run_name, group=cfg.group,
                              tags=list(cfg.tags) or None, mode=cfg.mode, dir=str(out_dir), config=config,
                              id=resume_id, resume="allow" if resume_id else None, settings=settings)
        self.id = self.run.id
        self.dir = str(Path(self.run.dir).parent)  # the run's folder (wandb's run.dir is its files/ subfolder)

    def log(self, metrics: dict, step: int) -> None:
        self.run.log({k: _plain(v) for k, v in metrics.items()}, step=int(step))

    def summary(self, values: dict) -> None:
        for k, v in values.items():
            self.run.summary[k] = _plain(v)

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def start_run(cfg, out_dir, config: Optional[dict] = None, rank: int = 0, resume_id: Optional[str] = None) -> NullRun:
    """The run for this process: wandb (rank 0, logger.backend=wandb) or null, wrapped by metrics.jsonl on rank 0."""
    if rank != 0:
        return NullRun()
    out_dir = Path(out_dir)
    inner: NullRun = NullRun()
    if cfg.backend == "wandb" and cfg.mode != "disabled":
        inner = WandbRun(cfg, out_dir, config or {}, resume_id)
    return JsonlRun(out_dir / "metrics.jsonl", inner)


class Progress:
    """A one-line progress bar; plain lines when not on a terminal. `loss` is the whole objective (NLL plus
    the weighted REINFORCE term), `nll` the language-model part of it."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True, stream=None):
        import sys
        import time

        self.total, self.start, self.enabled = total, start, enabled
        self.stream = stream or sys.stdout
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every = 1 if self.tty else max(1, (total - start) // 10)
        self._t0, self._time = time.time(), time.time

    def update(self, step: int, loss: float, nll: float, reward: float, mix: float, tok_s: float) -> None:
        if not self.enabled or (not self.tty and step % self.every and step != self.total):
            return
        done = (step - self.start) / max(1, self.total - self.start)
        elapsed = self._time() - self._t0
        eta = elapsed / max(done, 1e-9) - elapsed
        width = 24
        bar = "#" * int(done * width) + "-" * (width - int(done * width))
        line = (f"[{bar}] {step}/{self.total} loss {loss:.4g} nll {nll:.4f} reward {reward:+.4f} mix {mix:+.4f} "
                f"{tok_s:,.0f} tok/s  {elapsed:.0f}s<{eta:.0f}s")
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
