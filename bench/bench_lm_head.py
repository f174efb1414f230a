"""The LM head's logits matmul, (rows, d) x (d, V) into a (rows, V) buffer, as one matmul and in blocks of
vocabulary columns (linear_ce.logits_into, VOCAB_BLOCK): the time per row at the row counts the step uses
(the rollout's decode steps at a fraction of the positions, the scoring chunks), for the bench model's
and SmolLM2's head shapes.

    python bench/bench_lm_head.py        # -> bench/results/lm_head_blocks_cpu.json

Every variant of a shape runs `--rounds` times, round-robin (the machine's speed drifts between seconds); the
record keeps each variant's fastest and median round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from quietstar.provenance import write_record  # noqa: E402

SHAPES = {"bench_small": (32000, 256), "smollm2_135m": (49152, 576)}
ROWS = (52, 104, 256, 524)
BLOCKS = (None, 1024, 2048, 4096)  # None: one matmul


def blocked(h, w, out, block):
    if block is None:
        return torch.mm(h, w.t(), out=out)
    for v0 in range(0, w.shape[0], block):
        torch.mm(h, w[v0:v0 + block].t(), out=out[:, v0:v0 + block])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5, help="matmuls timed per round")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "lm_head_blocks_cpu.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    rows_out = []
    for model, (V, d) in SHAPES.items():
        w = torch.randn(V, d)
        for M in ROWS:
            h, out = torch.randn(M, d), torch.empty(M, V)
            ref = h @ w.t()
            times = {b: [] for b in BLOCKS}
            for _ in range(args.rounds):
                for b in BLOCKS:
                    blocked(h, w, out, b)
                    t0 = time.perf_counter()
                    for _ in range(args.reps):
                        blocked(h, w, out, b)
                    times[b].append((time.perf_counter() - t0) / args.reps / M * 1e6)
                    torch.testing.assert_close(out, ref)
            row = dict(model=model, V=V, d=d, rows=M)
            for b in BLOCKS:
                key = "one_matmul" if b is None else f"block_{b}"
                row[key] = dict(us_per_row_min=min(times[b]), us_per_row_median=statistics.median(times[b]))
            one = row["one_matmul"]["us_per_row_min"]
            row["speedup_min"] = {f"block_{b}": one / row[f"block_{b}"]["us_per_row_min"] for b in BLOCKS if b}
            rows_out.append(row)
            print(json.dumps(row), flush=True)
    write_record(args.out, dict(results=rows_out), seeds=[])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
