"""One AdamW step on the bench_small thinking model's parameters: fused (one kernel per parameter, the default
on CPU and GPU, `optim.fused=null`) against torch's unfused implementation (`optim.fused=false`).

Both optimisers come from `quietstar.optim.build_optimizer` (the same parameter groups as a training run) and
step on the same random gradients. The two run alternately, `--steps` steps at a time, for `--rounds`
rounds; a round's time is its median step, and the ratio is taken round by round, so a machine whose
speed drifts slows both alike.

    python bench/bench_adamw.py                      # -> bench/results/adamw_step_cpu.json
    python bench/bench_adamw.py --out -              # JSON on stdout
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(fused: bool, model: str = "bench_small"):
    """The QuietStar module of bench_small (T=12, K=4, n=2, as bench_train_step) with random gradients, and its
    AdamW from build_optimizer."""
    import torch

    from quietstar.config import OptimConfig
    from quietstar.model import ModelConfig, Transformer
    from quietstar.optim import build_optimizer
    from quietstar.methods.quietstar.thinker import QuietStar
    from quietstar.methods.quietstar.config import ThoughtConfig

    torch.manual_seed(0)
    qs = QuietStar(Transformer(ModelConfig.from_preset(model)), None,
                   ThoughtConfig(n_ahead=12, n_ahead_talk=4, n_thoughts=2))
    for p in qs.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt, _ = build_optimizer(qs, OptimConfig(lr=1e-5, warmup_steps=0, fused=fused), max_steps=1_000_000)
    return qs, opt


def time_steps(opt, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.step()
        out.append(time.perf_counter() - t0)
    return out


def main(argv=None) -> dict:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps", type=int, default=10, help="optimiser steps per variant per round")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "adamw_step_cpu.json"), help="'-': stdout")
    a = ap.parse_args(argv)

    load_before = os.getloadavg()[0]
    variants = {"fused": build(True), "unfused": build(False)}
    n_params = sum(p.numel() for p in variants["fused"][0].parameters())
    for _, opt in variants.values():  # warm-up: the optimiser state is created on the first step
        time_steps(opt, 2)
    rounds = []
    for r in range(a.rounds):
        order = ("fused", "unfused") if r % 2 == 0 else ("unfused", "fused")
        rounds.append({name: statistics.median(time_steps(variants[name][1], a.steps)) for name in order})
    ratios = [x["unfused"] / x["fused"] for x in rounds]
    from torch.optim.optimizer import _default_to_fused_or_foreach

    params = [p for g in variants["unfused"][1].param_groups for p in g["params"]]
    foreach = variants["unfused"][1].defaults.get("foreach")
    if foreach is None:  # what torch picks for these tensors when neither is asked for
        foreach = _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)[1]
    record = {
        "what": "one AdamW step (build_optimizer's parameter groups) on the bench_small QuietStar module's "
                "parameters (T=12, K=4, n=2), CPU fp32: fused (optim.fused=null or true) against torch's "
                "unfused implementation (optim.fused=false)",
        "parameters": n_params,
        "unfused_implementation": "foreach" if foreach else "for-loop",
        "threads": torch.get_num_threads(),
        "load_average_1min": [load_before, os.getloadavg()[0]],  # before and after, on os.cpu_count() cores
        "cpu_count": os.cpu_count(),
        "rounds": rounds,
        "step_ms_median": {k: 1e3 * statistics.median(x[k] for x in rounds) for k in ("fused", "unfused")},
        "unfused_over_fused_median": statistics.median(ratios),
        "unfused_over_fused_range": [min(ratios), max(ratios)],
        "note": "a round is --steps steps of each variant, alternately; its time is the median step. On a machine "
                "shared with other jobs (load_average_1min against cpu_count) the absolute times carry their load; "
                "the ratio, taken round by round, less so.",
    }
    if a.out == "-":
        print(json.dumps(record, indent=1))
    else:
        from quietstar.provenance import write_record

        print(f"wrote {write_record(a.out, record, seeds=[])}")
        print(json.dumps({k: record[k] for k in ("step_ms_median", "unfused_over_fused_median",
                                                  "unfused_over_fused_range")}))
    return record


if __name__ == "__main__":
    main()
