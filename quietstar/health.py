"""Is the run still healthy? Divergence detection beyond NaN / inf.

`HealthMonitor.update(nll, grad_norm)` is called once per optimizer step and says one of
  ok        the step looks like the steps before it;
  suspect   a zero gradient or an unchanged loss: the run may have stopped learning. Checkpoints are not
            written from a suspect step, so `checkpoint.keep_last` never prunes a healthy checkpoint in
            favour of one from a run that has gone bad;
  diverged  `health.frozen_steps` suspect steps in a row, or the NLL jumped above `health.spike_factor`
            times the median of the recent steps. train.py warns and (health.on_divergence=stop, the
            default) stops without writing a checkpoint, so the newest checkpoint is the last healthy one.
A non-finite loss, gradient or weight (train.py; checkpoint.non_finite_tensor) ends the run the same way:
`RunWatch.stop`.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import NamedTuple


class Health(NamedTuple):
    status: str  # ok | suspect | diverged
    reason: str = ""


class HealthMonitor:
    def __init__(self, cfg):
        self.cfg = cfg
        self.history: deque = deque(maxlen=cfg.window)  # the NLL of the recent healthy steps
        self.frozen = 0  # suspect steps in a row
        self.last: float | None = None

    def update(self, nll: float, grad_norm: float) -> Health:
        cfg, last = self.cfg, self.last
        self.last = nll
        unchanged = last is not None and abs(nll - last) <= cfg.frozen_rtol * max(abs(last), 1e-12)
        if grad_norm == 0.0 or unchanged:
            self.frozen += 1
            what = "a zero gradient norm" if grad_norm == 0.0 else "an unchanged loss"
            if self.frozen >= cfg.frozen_steps:
                return Health("diverged", f"{what} for {self.frozen} steps in a row (health.frozen_steps="
                                          f"{cfg.frozen_steps}): the run has stopped learning")
            return Health("suspect", what)
        self.frozen = 0
        if len(self.history) >= cfg.min_history and math.isfinite(nll):
            median = statistics.median(self.history)
            if nll > cfg.spike_factor * median:
                return Health("diverged", f"train/nll {nll:.4g} is above health.spike_factor={cfg.spike_factor} "
                                          f"times the median {median:.4g} of the last {len(self.history)} steps")
        self.history.append(nll)
        return Health("ok")


class CheckpointKeeper:
    """Which checkpoints of this run are known to be healthy.

    A checkpoint written after step k holds the weights that step k+1 runs on, so it is confirmed healthy only
    when step k+1 is `ok`. train.py passes `confirmed` to save_checkpoint(protect=...), so pruning never
    deletes it; when the run diverges, the unconfirmed newer checkpoint is moved aside into
    `<checkpoints>/diverged_after_step_N/` (kept for inspection, never picked by resume), leaving the
    confirmed one as the newest."""

    def __init__(self):
        self.confirmed = None  # Path of the newest checkpoint followed by a healthy step
        self.pending = None  # Path of a newer checkpoint not yet followed by a healthy step

    def step_ok(self) -> None:
        if self.pending is not None:
            self.confirmed, self.pending = self.pending, None

    def saved(self, path) -> None:
        self.pending = path

    def diverged(self):
        """Move the unconfirmed checkpoint aside. -> (the confirmed checkpoint or None, where it went or None)."""
        import os
        from pathlib import Path

        moved = None
        if self.pending is not None and Path(self.pending).is_dir():
            pending = Path(self.pending)
            moved = pending.parent / f"diverged_after_{pending.name}" / pending.name
            moved.parent.mkdir(parents=True, exist_ok=True)
            os.rename(pending, moved)
            self.pending = None
        return self.confirmed, moved


class RunWatch:
    """HealthMonitor + CheckpointKeeper as the training loop uses them: one call after each step, one before
    each checkpoint. Messages are printed on the main process only; the verdicts agree on every rank (the
    metrics and gradient norm they read are all-reduced)."""

    def __init__(self, cfg, is_main: bool = True):
        self.cfg, self.is_main = cfg, is_main
        self.monitor, self.keeper = HealthMonitor(cfg), CheckpointKeeper()
        self.verdict = Health("ok")

    def _say(self, text: str) -> None:
        if self.is_main:
            print(f"\n{text}", flush=True)

    def after_step(self, step: int, nll: float, grad_norm: float) -> bool:
        """Judge the step just taken. -> True when the run must stop (diverged, health.on_divergence=stop)."""
        self.verdict = self.monitor.update(nll, grad_norm)
        if self.verdict.status == "ok":
            self.keeper.step_ok()
        if self.verdict.status != "diverged":
            return False
        if self.cfg.on_divergence != "stop":
            self._say(f"WARNING: the run has diverged at step {step}: {self.verdict.reason}; going on "
                      "(health.on_divergence=warn)")
            return False
        self.stop(step, self.verdict.reason)
        return True

    def stop(self, step: int, reason: str):
        """The run ends as diverged at `step`: set the unconfirmed checkpoint aside and say which checkpoint
        is the last healthy one. -> that checkpoint (None if this run wrote none)."""
        confirmed, moved = self.keeper.diverged() if self.is_main else (self.keeper.confirmed, None)
        self._say(f"WARNING: the run has diverged at step {step}: {reason}; stopping. Last healthy checkpoint: "
                  f"{confirmed or 'none written by this run'}"
                  + (f"; the newer one, not confirmed by a healthy step, was moved to {moved}" if moved else ""))
        return confirmed

    def may_checkpoint(self, step: int) -> bool:
        """False (with a note) while the run is suspect: no checkpoint is written from such a step."""
        if self.verdict.status == "suspect":
            self._say(f"step {step}: no checkpoint written ({self.verdict.reason}: the run may have stopped learning)")
            return False
        return True

    def saved(self, path) -> None:
        self.keeper.saved(path)

    @property
    def last_healthy(self):
        return self.keeper.confirmed

    @property
    def protected(self):
        """The checkpoint that keep_last pruning must not delete."""
        return self.keeper.confirmed
