"""Where one default training step's time goes, op by op: wall time, page faults and (for matmuls) FLOP rate.

    python bench/scripts/op_times.py                          # bench_small, L=256, B=2, T=12, K=4, n=2, CPU fp32
    python bench/scripts/op_times.py --rows 40 --out bench/results/step_ops_cpu.json

Runs two warm-up steps (rollout + learning pass + AdamW), then one step under a TorchDispatchMode that times
every ATen op synchronously and reads the process's minor page faults around it. Unlike torch.profiler it adds
little to each op (the profiler with shapes recorded made this step's elementwise ops look 10-20x slower), so
the op times sum to nearly the step's time. Printed: the step, the ops grouped by kind (every matmul as one
kind), the matmuls by shape with their GFLOP/s, and the slowest ops by shape.
"""

from __future__ import annotations

import argparse
import collections
import resource
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from quietstar.model import ModelConfig, Transformer  # noqa: E402
from quietstar.provenance import write_record  # noqa: E402
from quietstar.methods.quietstar.thinker import QuietStar
from quietstar.methods.quietstar.config import ThoughtConfig  # noqa: E402

MATMULS = {"aten.mm", "aten.addmm", "aten.addmm_", "aten.bmm", "aten.baddbmm"}


def minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class OpTimes(TorchDispatchMode):
    """Per (op, input shapes): [calls, seconds, minor page faults]."""

    def __init__(self):
        super().__init__()
        self.stats = collections.defaultdict(lambda: [0, 0.0, 0])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        f0, t0 = minflt(), time.perf_counter()
        out = func(*args, **(kwargs or {}))
        dt, df = time.perf_counter() - t0, minflt() - f0
        shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
        s = self.stats[(str(func.overloadpacket), shapes)]
        s[0] += 1
        s[1] += dt
        s[2] += df
        return out


def matmul_flops(op: str, shapes: tuple) -> int:
    """FLOPs of one call (2 per multiply-add)."""
    if op == "aten.mm":
        (m, k), (_, n) = shapes[:2]
        return 2 * m * k * n
    if op in ("aten.addmm", "aten.addmm_"):
        (m, k), (_, n) = shapes[1:3]
        return 2 * m * k * n
    (b, m, k), (_, _, n) = shapes[-2:]  # bmm / baddbmm
    return 2 * b * m * k * n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bench_small")
    ap.add_argument("--L", type=int, default=256)
    ap.add_argument("--B", type=int, default=2)
    ap.add_argument("--T", type=int, default=12)
    ap.add_argument("--K", type=int, default=4)
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2, help="steps before the measured one (the second is the first "
                    "with nonzero advantages)")
    ap.add_argument("--rows", type=int, default=25, help="rows of each table")
    ap.add_argument("--out", default=None, help="also write the tables as JSON here")
    a = ap.parse_args()

    torch.manual_seed(0)
    base = Transformer(ModelConfig.from_preset(a.model))  # random weights: timing only
    qs = QuietStar(base, None, ThoughtConfig(n_ahead=a.T, n_ahead_talk=a.K, n_thoughts=a.n))
    x = torch.randint(0, base.cfg.vocab_size, (a.B, a.L))
    opt = torch.optim.AdamW(qs.parameters(), lr=1e-5, fused=True)  # as train.py on CPU
    g = torch.Generator().manual_seed(0)

    def step():
        qs(x, generator=g).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(a.warmup):
        t0 = time.perf_counter()
        step()
        print(f"warm-up step {i + 1}/{a.warmup}: {time.perf_counter() - t0:.2f} s", flush=True)
    mode = OpTimes()
    f0, t0 = minflt(), time.perf_counter()
    with mode:
        step()
    step_s, faults = time.perf_counter() - t0, minflt() - f0
    stats = mode.stats

    kinds = collections.defaultdict(lambda: [0, 0.0, 0])  # as stats: calls, seconds, faults
    shapes = collections.defaultdict(lambda: [0, 0.0, 0])  # matmuls: calls, seconds, flops
    for (op, shp), (calls, sec, flt) in stats.items():
        kind = "matmul" if op in MATMULS else ("attention" if "scaled_dot_product" in op else op)
        for i, v in enumerate((calls, sec, flt)):
            kinds[kind][i] += v
        if op in MATMULS:
            s = shapes[(op, shp)]
            s[0] += calls
            s[1] += sec
            s[2] += calls * matmul_flops(op, shp)
    op_s = sum(v[1] for v in stats.values())
    mm_flops, mm_s = sum(v[2] for v in shapes.values()), sum(v[1] for v in shapes.values())
    print(f"\nstep {step_s:.2f} s (under the dispatch mode), ops {op_s:.2f} s, {faults} minor page faults; "
          f"matmuls {mm_flops / 1e12:.3f} TFLOP in {mm_s:.2f} s ({mm_flops / mm_s / 1e9:.0f} GFLOP/s)")
    print("\nby kind:")
    for kind, (calls, sec, flt) in sorted(kinds.items(), key=lambda kv: -kv[1][1])[:a.rows]:
        print(f"  {sec * 1e3:8.1f} ms {calls:6d} calls {flt:7d} faults  {kind}")
    print("\nmatmuls by shape:")
    for (op, shp), (calls, sec, fl) in sorted(shapes.items(), key=lambda kv: -kv[1][2])[:a.rows]:
        print(f"  {fl / 1e9:7.1f} GFLOP {sec * 1e3:8.1f} ms {fl / sec / 1e9:6.1f} GFLOP/s {calls:5d} calls  {op} {shp}")
    print("\nslowest ops by shape:")
    for (op, shp), (calls, sec, flt) in sorted(stats.items(), key=lambda kv: -kv[1][1])[:a.rows]:
        print(f"  {sec * 1e3:8.1f} ms {calls:5d} calls {flt:7d} faults  {op} {shp}")

    if a.out:
        record = dict(
            case=dict(model=a.model, L=a.L, B=a.B, T=a.T, K=a.K, n=a.n, dtype="fp32"),
            step_s=round(step_s, 3), op_s=round(op_s, 3), minor_faults=faults,
            matmul=dict(tflop=round(mm_flops / 1e12, 4), s=round(mm_s, 3), gflop_per_s=round(mm_flops / mm_s / 1e9, 1)),
            by_kind=[dict(kind=k, ms=round(sec * 1e3, 1), calls=calls, faults=flt)
                     for k, (calls, sec, flt) in sorted(kinds.items(), key=lambda kv: -kv[1][1])[:a.rows]],
            matmuls=[dict(op=op, shapes=shp, calls=c, ms=round(s * 1e3, 1), gflop=round(f / 1e9, 2),
                          gflop_per_s=round(f / s / 1e9, 1))
                     for (op, shp), (c, s, f) in sorted(shapes.items(), key=lambda kv: -kv[1][2])[:a.rows]])
        write_record(a.out, record, seeds=[])
        print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
