"""Learning curves from a run's metrics.jsonl, as a PNG: written at the end of every training run.

    python -m quietstar.plots outputs/<date>/<time>      # (re)draw <run>/curves.png
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

# (metric, panel title); a panel is drawn when its metric was logged
PANELS = [
    (("train/nll_base", "train/nll_talk", "train/nll"), "NLL: no thought / after a thought / objective"),
    (("thought/reward_mean",), "reward (mean over positions)"),
    (("thought/advantage_pos_frac",), "advantage > 0 fraction"),
    (("thought/mix_weight_mean",), "mixing weight w"),
    (("thought/entropy_first_token",), "thought entropy (first token, nats)"),
    (("thought/policy_term",), "weighted policy term"),
    (("train/grad_norm",), "gradient norm"),
    (("train/lr",), "learning rate"),
]
LABELS = {"train/nll_base": "no thought", "train/nll_talk": "after a thought", "train/nll": "objective NLL"}


def read_metrics(path) -> list[dict]:
    """The records of a metrics.jsonl (a torn last line, e.g. from a killed run, is ignored); when a resumed
    run logged a step again, the later record wins."""
    rows: dict = {}
    path = Path(path)
    if not path.is_file():
        return []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            rows[int(rec["step"])] = {k: _num(v) for k, v in rec.items()}
    return [rows[k] for k in sorted(rows)]


def _num(v):
    if isinstance(v, str) and v in ("nan", "inf", "-inf"):
        return float(v)
    return v


def save_figure(fig, out) -> Path:
    """Write a matplotlib figure to `out` atomically (a temporary file renamed into place)."""
    import matplotlib.pyplot as plt

    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, out)
    return out


def plot_run(metrics_path, out) -> Path | None:
    """Draw the learning curves of one run. -> the PNG, or None if nothing numeric was logged."""
    rows = read_metrics(metrics_path)
    panels = [(keys, title) for keys, title in PANELS if any(isinstance(r.get(k), (int, float)) for r in rows for k in keys)]
    if not rows or not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.3 * cols, 3.2 * nrows), squeeze=False)
    steps = [r["step"] for r in rows]
    for ax, (keys, title) in zip(axes.flat, panels):
        for k in keys:
            if any(k in r for r in rows):
                ax.plot(steps, [r.get(k, float("nan")) for r in rows], label=LABELS.get(k, k))
        if len(keys) > 1:
            ax.legend(fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(str(Path(metrics_path).parent), fontsize=9)
    return save_figure(fig, out)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m quietstar.plots <run dir>")
    run = Path(sys.argv[1])
    png = plot_run(run / "metrics.jsonl", run / "curves.png")
    print(png or f"{run / 'metrics.jsonl'}: no metrics to plot")
