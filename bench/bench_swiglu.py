"""SwiGLU's forward and backward (fused.SwiGLUDownFunction) in one block of rows and in blocks of rows
(SWIGLU_BLOCK_BYTES, the CPU default 8 MB and others), at the learning pass's shapes: the bench model's
(bench_small, I = 688) and SmolLM2's (I = 1536) feed-forward over a grid of B = 2, L = 256 (14,336 tokens
at T = 12, n = 2), fp32. Also the minor page faults per call: a (tokens, I) tensor of that size is
mapped anew by malloc each time it is made.

    python bench/bench_swiglu.py        # -> bench/results/swiglu_blocks_cpu.json

Every variant runs `--rounds` times, round-robin (the machine's speed drifts between seconds); the record
keeps each variant's fastest and median round.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from quietstar import fused  # noqa: E402
from quietstar.provenance import write_record  # noqa: E402

SHAPES = {"bench_small": (256, 688), "smollm2_135m": (576, 1536)}  # (d, I)
TOKENS = 14336
BLOCK_BYTES = (None, 1 << 22, 1 << 23, 1 << 24)  # None: one block


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def set_block(block_bytes):
    fused.SWIGLU_BLOCK_BYTES = {} if block_bytes is None else {"cpu": block_bytes}


def run(gate, up, w, grad, block_bytes):
    """-> (forward s, backward s, forward faults, backward faults, (output, its three gradients)) of one call
    with this block size."""
    set_block(block_bytes)
    g, u, wd = (t.detach().requires_grad_() for t in (gate, up, w))
    f0, t0 = faults(), time.perf_counter()
    out = fused.swiglu_down(g, u, wd)
    f1, t1 = faults(), time.perf_counter()
    out.backward(grad)
    f2, t2 = faults(), time.perf_counter()
    return t1 - t0, t2 - t1, f1 - f0, f2 - f1, (out.detach(), g.grad, u.grad, wd.grad)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "swiglu_blocks_cpu.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    default = dict(fused.SWIGLU_BLOCK_BYTES)
    rows_out = []
    for model, (d, I) in SHAPES.items():
        gate, up = torch.randn(2, TOKENS // 2, I), torch.randn(2, TOKENS // 2, I)
        w, grad = 0.03 * torch.randn(d, I), torch.randn(2, TOKENS // 2, d)
        ref = run(gate, up, w, grad, None)[4]
        times = {b: [] for b in BLOCK_BYTES}
        for _ in range(args.rounds):
            for b in BLOCK_BYTES:
                *t, got = run(gate, up, w, grad, b)
                times[b].append(t)
                for a, r in zip(got, ref):  # the same values, to rounding (the weight gradient's sum order)
                    torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)
        row = dict(model=model, d=d, I=I, tokens=TOKENS)
        for b in BLOCK_BYTES:
            key = "one_block" if b is None else f"block_{b >> 20}MB"
            fw, bw, ff, bf = zip(*times[b])
            set_block(b)
            row[key] = dict(rows=fused._block_rows(TOKENS, I, torch.device("cpu")),
                            forward_ms_min=1e3 * min(fw), forward_ms_median=1e3 * statistics.median(fw),
                            backward_ms_min=1e3 * min(bw), backward_ms_median=1e3 * statistics.median(bw),
                            forward_faults_median=statistics.median(ff), backward_faults_median=statistics.median(bf))
        one = row["one_block"]
        row["speedup_median"] = {k: dict(forward=one["forward_ms_median"] / v["forward_ms_median"],
                                         backward=one["backward_ms_median"] / v["backward_ms_median"])
                                 for k, v in row.items() if k.startswith("block_")}
        rows_out.append(row)
        print(json.dumps(row), flush=True)
    fused.SWIGLU_BLOCK_BYTES = default
    write_record(args.out, dict(default=default, results=rows_out), seeds=[])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
