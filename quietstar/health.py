"""Is the run still healthy? Divergence detection beyond NaN / inf.

`HealthMonitor.update(nll, grad_norm)` is called once per optimizer step and says one of
  ok        the step looks like the steps before it;
  suspect   a zero gradient or an unchanged loss: the run may have stopped learning. Checkpoints are not
            written from a suspect step, so `checkpoint.keep_last` never prunes a healthy checkpoint in
            favour of one from a run that has gone bad;
  diverged  `health.frozen_steps` suspect steps in a row, or the NLL jumped above `health.spike_factor`
            times the median of the recent steps. train.py warns and (health.on_divergence=stop, the
            default) stops without writing a checkpoint, so the newest checkpoint is the last healthy one.
A non-finite loss, gradient or weight is handled before this (train.py, checkpoint.assert_finite).
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
