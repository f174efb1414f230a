"""Time and peak memory of the thought-grid attention backends: dense, split, flex, triton (docs/backends.md).

For each case (L positions, S grid steps, head dim D; B sequences, H query heads, G kv heads, n copies,
R = 1 + n (S - 1) grid rows) and backend: forward time (no grad), forward+backward time, and the peak
memory each needs above its inputs. Run by hand, outside pytest; results go to
bench/results/thought_attention_<device>.json and a table is printed.

    python bench/bench_thought_attention.py              # GPU: L {256, 1024, 2048} x S {8, 16} x D {64, 128}
    python bench/bench_thought_attention.py --cpu-small  # CPU: small cases, a couple of minutes
    python bench/bench_thought_attention.py --L 1024 --S 16 --D 128 --backends split triton

Timing: triton.testing.do_bench on CUDA (after a warm-up call that also compiles, autotunes or builds
the block mask); on CPU the best of --reps wall-clock runs (CPU cores may be shared). Peak memory:
torch.cuda.max_memory_allocated above the inputs on CUDA; on CPU each case is re-run in a fresh process
with glibc's mmap threshold at 64 KiB (so freed tensors leave the resident set) and the growth of its
peak resident set (VmHWM, reset through /proc/self/clear_refs) is reported, a coarser number.
Backends that cannot run are recorded with the reason: triton and flex need CUDA for meaningful
timings (the Triton interpreter and FlexAttention's CPU path are correctness tools), and dense is
skipped where its (R L)^2 scores would not fit.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from quietstar.attention import dense_attention  # noqa: E402
from quietstar.masks import n_grid_rows  # noqa: E402
from quietstar.provenance import machine, write_record  # noqa: E402
from quietstar.split import split_attention  # noqa: E402

BACKENDS = ("dense", "split", "flex", "triton")


# --------------------------------------------------------------------------------------------------
# memory


def _cpu_peak_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _cpu_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class PeakMemory:
    """Peak bytes allocated above the level at entry (CUDA), or peak RSS growth (CPU)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.mb = float("nan")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.ok = _cpu_peak_reset()
            self.base = _cpu_status_kb("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2 ** 20
        elif self.ok:
            self.mb = (_cpu_status_kb("VmHWM") * 1024 - self.base) / 2 ** 20
        return False


# --------------------------------------------------------------------------------------------------
# timing


def bench_ms(fn, device: torch.device, reps: int) -> float:
    fn()  # warm-up: compilation, autotuning, block masks, allocator
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=max(100, 20 * reps)))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times)


# --------------------------------------------------------------------------------------------------
# backends


def backend_fn(name: str, n: int, lengths):
    if name == "dense":
        return lambda q, k, v: dense_attention(q, k, v, n, lengths)
    if name == "split":
        return lambda q, k, v: split_attention(q, k, v, n, lengths)
    if name == "flex":
        from quietstar.flex import flex_grid_attention

        return lambda q, k, v: flex_grid_attention(q, k, v, n, lengths)
    if name == "triton":
        from quietstar.kernels.thought_attention import thought_attention

        return lambda q, k, v: thought_attention(q, k, v, n, lengths)
    raise ValueError(name)


def why_not(name: str, device: torch.device, B, H, R, L, dtype, dense_limit_gb: float):
    """A reason the backend is not run in this case, or None."""
    if name in ("triton", "flex") and device.type != "cuda":
        return "needs CUDA (CPU runs are correctness tools: Triton interpreter / FlexAttention reference path)"
    if name == "dense":
        # SDPA's math path on a boolean mask keeps the scores, the probabilities and their gradients
        gb = 3 * B * H * (R * L) ** 2 * torch.finfo(dtype).bits / 8 / 2 ** 30
        if gb > dense_limit_gb:
            return f"(R L)^2 scores: ~{gb:.0f} GB > --dense-limit-gb {dense_limit_gb:g}"
    return None


def make_case(name, device, dtype, B, H, G, n, S, L, D, pad):
    """(forward, forward+backward) closures over fresh inputs for one backend and shape."""
    R = n_grid_rows(n, S)
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda h: torch.randn(B, h, R, L, D, generator=g).to(device=device, dtype=dtype)
    q, k, v = mk(H), mk(G), mk(G)
    lengths = torch.tensor([L - pad] * B, device=device) if pad else None
    fn = backend_fn(name, n, lengths)
    do = torch.randn_like(q)
    qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, k, v))

    def fwd():
        with torch.no_grad():
            fn(q, k, v)

    def fwd_bwd():
        out = fn(qg, kg, vg)
        torch.autograd.grad(out, (qg, kg, vg), do)

    return fwd, fwd_bwd


def peak_memory(device, fwd, fwd_bwd):
    with PeakMemory(device) as m_f:
        fwd()
    with PeakMemory(device) as m_b:
        fwd_bwd()
    return m_f.mb, m_b.mb


def cpu_peak_memory_in_fresh_process(spec: dict):
    """Run the case once more in a new process whose freed tensors leave the resident set."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_probe", json.dumps(spec)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        return float("nan"), float("nan")
    fwd_mb, fwd_bwd_mb = json.loads(res.stdout.strip().splitlines()[-1])
    return fwd_mb, fwd_bwd_mb


def _probe(spec: dict):
    torch.set_num_threads(spec.pop("threads"))
    spec["device"], spec["dtype"] = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    fwd, fwd_bwd = make_case(**spec)
    print(json.dumps(peak_memory(spec["device"], fwd, fwd_bwd)))


def run_case(name, device, dtype, B, H, G, n, S, L, D, reps, dense_limit_gb, pad):
    R = n_grid_rows(n, S)
    case = dict(backend=name, L=L, S=S, n=n, R=R, B=B, H=H, G=G, D=D, dtype=str(dtype).replace("torch.", ""))
    reason = why_not(name, device, B, H, R, L, dtype, dense_limit_gb)
    if reason:
        return {**case, "skipped": reason}
    spec = dict(name=name, device=str(device), dtype=case["dtype"], B=B, H=H, G=G, n=n, S=S, L=L, D=D, pad=pad)
    try:
        fwd, fwd_bwd = make_case(name, device, dtype, B, H, G, n, S, L, D, pad)
        if device.type == "cuda":
            mem_f, mem_b = peak_memory(device, fwd, fwd_bwd)
        else:
            mem_f, mem_b = cpu_peak_memory_in_fresh_process({**spec, "threads": torch.get_num_threads()})
        t_f = bench_ms(fwd, device, reps)
        t_b = bench_ms(fwd_bwd, device, reps)
    except (torch.cuda.OutOfMemoryError, MemoryError) as e:
        return {**case, "skipped": f"out of memory: {str(e).splitlines()[0][:120]}"}
    except NotImplementedError as e:
        return {**case, "skipped": f"not supported: {str(e).splitlines()[0][:160]}"}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {**case, "fwd_ms": round(t_f, 4), "fwd_bwd_ms": round(t_b, 4),
            "fwd_peak_mb": round(mem_f, 2), "fwd_bwd_peak_mb": round(mem_b, 2)}


# --------------------------------------------------------------------------------------------------
# report


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def print_table(cases):
    """One line per case and backend; the last two columns compare fwd+bwd with dense (time, memory)."""
    print(f"{'L':>5} {'S':>3} {'R':>3} {'D':>4} {'backend':>7} | {'fwd ms':>9} {'fwd+bwd ms':>11} | "
          f"{'fwd MB':>8} {'fwd+bwd MB':>10} | {'dense/t':>8} {'mem/dense':>9}")
    dense = {(c["L"], c["S"], c["D"]): c for c in cases if c["backend"] == "dense" and "skipped" not in c}
    reasons = {}
    for c in sorted(cases, key=lambda c: (c["D"], c["L"], c["S"], BACKENDS.index(c["backend"]))):
        head = f"{c['L']:>5} {c['S']:>3} {c['R']:>3} {c['D']:>4} {c['backend']:>7} | "
        if "skipped" in c:
            reasons.setdefault(c["skipped"], []).append(f"{c['backend']} L={c['L']} S={c['S']} D={c['D']}")
            print(head + "skipped")
            continue
        d = dense.get((c["L"], c["S"], c["D"]))
        vs = (f"{d['fwd_bwd_ms'] / c['fwd_bwd_ms']:>7.1f}x {c['fwd_bwd_peak_mb'] / d['fwd_bwd_peak_mb']:>8.2f}x"
              if d and d["fwd_bwd_peak_mb"] > 0 else f"{'-':>8} {'-':>9}")
        print(head + f"{c['fwd_ms']:>9.2f} {c['fwd_bwd_ms']:>11.2f} | {c['fwd_peak_mb']:>8.1f} "
                     f"{c['fwd_bwd_peak_mb']:>10.1f} | {vs}")
    for why, which in reasons.items():
        print(f"  skipped ({len(which)}): {why}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-small", action="store_true", help="small CPU cases (a couple of minutes)")
    ap.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    ap.add_argument("--L", type=int, nargs="+")
    ap.add_argument("--S", type=int, nargs="+")
    ap.add_argument("--D", type=int, nargs="+")
    ap.add_argument("--B", type=int)
    ap.add_argument("--H", type=int)
    ap.add_argument("--G", type=int)
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--pad", type=int, default=0, help="padding tokens at the end of every sequence")
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--reps", type=int, default=3, help="CPU: timed runs per number (best of)")
    ap.add_argument("--threads", type=int, help="CPU threads (default: 1 with --cpu-small, else torch's)")
    ap.add_argument("--_probe", help=argparse.SUPPRESS)
    ap.add_argument("--dense-limit-gb", type=float, help="skip dense above this estimated memory")
    ap.add_argument("--out", type=Path, help="JSON path (default bench/results/thought_attention_<device>.json)")
    args = ap.parse_args(argv)
    if args._probe:
        return _probe(json.loads(args._probe))

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_small else "cpu")
    if args.cpu_small:  # SmolLM2-like heads, fewer of them, fp32
        d = dict(L=[128, 256, 512], S=[4, 8], D=[64], B=1, H=4, G=2, dtype="float32", dense_limit_gb=2.0)
    else:  # a 7B-like layer (Mistral: 32 q heads, 8 kv heads) over one sequence's grid
        d = dict(L=[256, 1024, 2048], S=[8, 16], D=[64, 128], B=1, H=32, G=8, dtype="bfloat16",
                 dense_limit_gb=0.6 * (torch.cuda.get_device_properties(0).total_memory / 2 ** 30
                                       if device.type == "cuda" else 8))
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else d[name]
    Ls, Ss, Ds = pick("L"), pick("S"), pick("D")
    B, H, G, dtype = pick("B"), pick("H"), pick("G"), getattr(torch, pick("dtype"))
    dense_limit = args.dense_limit_gb if args.dense_limit_gb is not None else d["dense_limit_gb"]
    if args.threads or args.cpu_small:
        torch.set_num_threads(args.threads or 1)

    cases = []
    for D in Ds:
        for L in Ls:
            for S in Ss:
                for name in args.backends:
                    c = run_case(name, device, dtype, B, H, G, args.n, S, L, D, args.reps, dense_limit, args.pad)
                    cases.append(c)
                    status = c.get("skipped") or f"fwd {c['fwd_ms']:.2f} ms, fwd+bwd {c['fwd_bwd_ms']:.2f} ms, " \
                                                 f"peak {c['fwd_bwd_peak_mb']:.1f} MB"
                    print(f"[{name:>6}] L={L} S={S} D={D}: {status}", flush=True)

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    result = dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else machine()["cpu"],
        device_kind=device.type, triton=triton_version,
        memory_note=("peak bytes allocated above the inputs (torch.cuda.max_memory_allocated)" if device.type == "cuda"
                     else "peak resident-set growth (VmHWM after a reset) of a fresh process per case with "
                          "MALLOC_MMAP_THRESHOLD_=65536, coarse"),
        timing_note=("triton.testing.do_bench, ms" if device.type == "cuda"
                     else f"best of {args.reps} runs, ms"),
        cases=cases,
    )
    out = args.out or ROOT / "bench" / "results" / f"thought_attention_{device_label(device)}.json"
    command = None if argv is None else ["python", "bench/bench_thought_attention.py", *argv]
    write_record(out, result, seeds=[], command=command)
    print()
    print_table(cases)
    print(f"\nwrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


if __name__ == "__main__":
    main()
