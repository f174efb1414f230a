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


# what the progress line shows, in order: (metric, label, format); the whole objective comes last because
# it is dominated by the weighted policy term (policy_weight 1e6 in the official preset)
PROGRESS_FIELDS = [
    ("train/nll_talk", "nll_thought", "{:.4f}"),
    ("train/nll_base", "nll_base", "{:.4f}"),
    ("thought/reward_mean", "reward", "{:+.4f}"),
    ("thought/mix_weight_mean", "w", "{:+.4f}"),
    ("perf/tok_per_s", "tok/s", "{:,.0f}"),
    ("train/loss", "loss", "{:.4g}"),
]


def progress_text(metrics: dict) -> str:
    """The readable parts of a step's metrics, in PROGRESS_FIELDS order (absent ones are left out)."""
    parts = []
    for key, label, fmt in PROGRESS_FIELDS:
        v = metrics.get(key)
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            parts.append(f"{label} {fmt.format(float(v))}")
    return " ".join(parts)


def progress_bar(total: int, stream, desc: str = "", initial: int = 0, enabled: bool = True, unit: str = "it",
                 min_interval: float = 0.5):
    """A tqdm bar on `stream`: redrawn in place on a terminal; in a log file, about ten plain lines per run
    (one per tenth of the total, and the last)."""
    from tqdm import tqdm

    tty = hasattr(stream, "isatty") and stream.isatty()
    return tqdm(total=total, initial=initial, desc=desc or None, disable=not enabled,
                file=stream if tty else _Lines(stream), unit=unit, dynamic_ncols=tty, ascii=not tty,
                mininterval=min_interval if tty else 0.0, miniters=None if tty else max(1, (total - initial) // 10),
                smoothing=0.1, maxinterval=10.0 if tty else float("inf"))


class Progress:
    """The training progress bar (tqdm; rank 0 only): NLL with and without a thought, reward, mixing weight,
    throughput, then the whole objective. On a terminal it redraws in place; in a log file it writes about
    ten lines per run."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True, stream=None):
        import sys

        self.bar = progress_bar(total, stream or sys.stdout, initial=start, enabled=enabled, unit="step")

    def update(self, step: int, metrics: dict) -> None:
        if self.bar.disable:
            return
        self.bar.set_postfix_str(progress_text(metrics), refresh=False)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        self.bar.close()


class _Lines:
    """A text stream that turns tqdm's in-place redraws into one line each (for log files)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "\n").lstrip("\n") if text.strip() else ""
        if text:
            self.stream.write(text if text.endswith("\n") else text + "\n")

    def flush(self) -> None:
        self.stream.flush()
