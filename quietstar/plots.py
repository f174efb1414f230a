"""Every figure the package draws, with matplotlib on its Agg backend (no display needed). Each function takes
plain data (metrics rows, dicts and lists of numbers) and writes one PNG atomically:

    plot_run                 a run's learning curves, <run>/curves.png (every training run ends with it)
    plot_learning_curves     a thought stage's curves beside a plain baseline's, by fraction of the compute
    plot_over_training       the hardest answers' chain share and NLL at every saved step
    plot_stage_comparison    several thought stages' curves, held-out gain over training and by quintile
    plot_gain_by_difficulty  the per-token report's plot: mean gain per base-CE bucket, and per token

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
TITLES = {keys[0]: title for keys, title in PANELS}
GAIN_COLOURS = ("#16a046", "#d62828")  # a gain above zero, at or below it


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


def pyplot():
    """matplotlib.pyplot on the Agg backend; imported on first use (it takes a moment)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out, dpi: int = 110) -> Path:
    """Write a matplotlib figure to `out` atomically (a temporary file renamed into place) and close it."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    fig.tight_layout()
    fig.savefig(tmp, dpi=dpi, format="png")
    pyplot().close(fig)
    os.replace(tmp, out)
    return out


def _series(ax, x, rows: list[dict], key: str, **style):
    """One metric of metrics rows against x; a row without it is a gap."""
    return ax.plot(x, [r.get(key, float("nan")) for r in rows], **style)


def plot_run(metrics_path, out) -> Path | None:
    """Draw the learning curves of one run. -> the PNG, or None if nothing numeric was logged."""
    rows = read_metrics(metrics_path)
    panels = [(keys, title) for keys, title in PANELS if any(isinstance(r.get(k), (int, float)) for r in rows for k in keys)]
    if not rows or not panels:
        return None
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = pyplot().subplots(nrows, cols, figsize=(4.3 * cols, 3.2 * nrows), squeeze=False)
    steps = [r["step"] for r in rows]
    for ax, (keys, title) in zip(axes.flat, panels):
        for k in keys:
            if any(k in r for r in rows):
                _series(ax, steps, rows, k, label=LABELS.get(k, k))
        if len(keys) > 1:
            ax.legend(fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(str(Path(metrics_path).parent), fontsize=9)
    return save_figure(fig, out)


def plot_learning_curves(thought_rows: list[dict], baseline_rows: list[dict], answer_nll: dict, out,
                         title: str = "") -> Path:
    """A thought stage's metrics rows and a plain baseline's on a shared axis, the fraction of each run's
    compute (its step over its last step): four thought diagnostics, the training NLL of both, and the held-out
    answer NLL by difficulty as bars. answer_nll: {"thought" | "no_thought" | "baseline": {difficulty: NLL}}
    (an "all" key is left out)."""
    fig, axes = pyplot().subplots(2, 3, figsize=(13, 6.5))
    frac = lambda rows: [r["step"] / max(1, rows[-1]["step"]) for r in rows] if rows else []
    x = frac(thought_rows)
    panels = ["thought/reward_mean", "thought/advantage_pos_frac", "thought/mix_weight_mean",
              "thought/entropy_first_token"]
    for ax, key in zip(axes.flat, panels):
        _series(ax, x, thought_rows, key)
        ax.set_title(TITLES[key], fontsize=10)
    ax = axes.flat[4]
    _series(ax, x, thought_rows, "train/nll_talk", label="Quiet-STaR: after a thought")
    _series(ax, x, thought_rows, "train/nll_base", label="Quiet-STaR: no thought")
    _series(ax, frac(baseline_rows), baseline_rows, "train/nll", label="baseline (plain LM)", alpha=0.7)
    ax.set_title("training NLL (all tokens)", fontsize=10)
    ax.legend(fontsize=8)
    ax = axes.flat[5]
    keys = [k for k in answer_nll["thought"] if k != "all"]
    width = 0.27
    for j, (model, label) in enumerate([("thought", "thought"), ("no_thought", "no thought"),
                                        ("baseline", "baseline")]):
        ax.bar([i + (j - 1) * width for i in range(len(keys))], [answer_nll[model][k] for k in keys], width,
               label=label)
    ax.set_xticks(range(len(keys)), keys)
    ax.set_xlabel("difficulty (hops)")
    ax.set_title("held-out answer NLL", fontsize=10)
    ax.legend(fontsize=8)
    for ax in axes.flat[:5]:
        ax.set_xlabel("fraction of the run's compute")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return save_figure(fig, out)


def plot_over_training(curves: dict, before: dict, out, title: str = "") -> Path:
    """Chain share and the hardest level's answer NLL with / without a thought against the step, per stage.
    curves: {stage: [{"step", "nll_thought", "nll_no_thought", optionally "chain_share"}, ...]}; before: the
    same keys at step 0 (the starting model) and "hops", the level scored."""
    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4))
    for name, pts in curves.items():
        steps = [0] + [p["step"] for p in pts]
        if all("chain_share" in p for p in pts) and "chain_share" in before:
            axes[0].plot(steps, [before["chain_share"]] + [p["chain_share"] for p in pts], marker="o", label=name)
        line, = axes[1].plot(steps, [before["nll_thought"]] + [p["nll_thought"] for p in pts], marker="o",
                             label=f"{name}: thought")
        axes[1].plot(steps, [before["nll_no_thought"]] + [p["nll_no_thought"] for p in pts], ls="--",
                     color=line.get_color(), label=f"{name}: no thought")
    axes[0].set_title("share of thoughts that write the query's chain", fontsize=10)
    axes[1].set_title(f"held-out {before['hops']}-hop answer NLL", fontsize=10)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, out)


def plot_stage_comparison(runs: dict, gain_curves: dict, quintiles: dict, out, title: str = "") -> Path:
    """Several thought stages side by side. runs: {stage: metrics rows} (reward, its spread, w and the thought
    entropy against the step); gain_curves: {stage: [{"step", "gain"}, ...]} (the held-out gain over
    training); quintiles: {stage: [{"bucket", "gain"}, ...]} (the last step's gain by base-entropy quintile)."""
    fig, axes = pyplot().subplots(2, 3, figsize=(14, 7))
    panels = [("thought/reward_mean", "reward (mean)"), ("thought/reward_std", "reward spread (std over thoughts)"),
              ("thought/mix_weight_mean", "mixing weight w"), ("thought/entropy_first_token", "thought entropy")]
    for ax, (key, panel_title) in zip(axes.flat, panels):
        for s, rows in runs.items():
            _series(ax, [r["step"] for r in rows], rows, key, label=s, alpha=0.8)
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    ax = axes.flat[4]
    for s, pts in gain_curves.items():
        ax.plot([p["step"] for p in pts], [p["gain"] for p in pts], marker="o", label=s)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_title("held-out gain after a thought (nats/token)", fontsize=10)
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    ax = axes.flat[5]
    width = 0.2
    for j, (s, q) in enumerate(quintiles.items()):
        ax.bar([b["bucket"] + (j - (len(quintiles) - 1) / 2) * width for b in q], [b["gain"] for b in q], width,
               label=s)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("base-entropy quintile (0: most certain)")
    ax.set_title("held-out gain by quintile, last step", fontsize=10)
    ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, out)


def plot_gain_by_difficulty(buckets: list[dict], ce_base, gain, out, title: str = "") -> Path:
    """The gain from thinking, CE_base - CE_thought: its mean per difficulty bucket as bars (buckets:
    [{"gain" (None: empty), "base_ce_range": [lo, hi]}, ...], easiest first) and every token's against its
    base CE (ce_base, gain: one number per token)."""
    fig, (a1, a2) = pyplot().subplots(1, 2, figsize=(10, 4))
    gains = [b["gain"] or 0.0 for b in buckets]
    a1.bar(range(len(buckets)), gains, color=[GAIN_COLOURS[0] if g > 0 else GAIN_COLOURS[1] for g in gains])
    a1.axhline(0, color="#333", lw=0.8)
    a1.set_xticks(range(len(buckets)), [f"{b['base_ce_range'][0]:.1f}-{b['base_ce_range'][1]:.1f}" for b in buckets])
    a1.set_xlabel("base CE bucket (nats)")
    a1.set_ylabel("mean gain (nats/token)")
    a1.set_title("gain from thinking by difficulty")
    a2.scatter(ce_base, gain, s=4, alpha=0.4, color="#1a4fd0")
    a2.axhline(0, color="#333", lw=0.8)
    a2.set_xlabel("base CE (nats)")
    a2.set_ylabel("gain CE_base - CE_thought")
    a2.set_title("per token")
    if title:
        fig.suptitle(title)
    return save_figure(fig, out, dpi=100)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m quietstar.plots <run dir>")
    run = Path(sys.argv[1])
    png = plot_run(run / "metrics.jsonl", run / "curves.png")
    print(png or f"{run / 'metrics.jsonl'}: no metrics to plot")
