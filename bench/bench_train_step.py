"""Wall time and peak memory of one optimiser step: plain LM vs Quiet-STaR (two-phase, grid) vs the
official code's cost model (`thought.impl=sequential_dense`).

Each case runs in a fresh process (CPU: its peak RSS, the Python and PyTorch runtime included;
CUDA: torch.cuda.max_memory_allocated). Ratios, not absolute times, are the result: everything is
measured in one run on one machine.

    python bench/bench_train_step.py                       # the README's table (bench_small + smollm2)
    python bench/bench_train_step.py --scaling             # time/memory vs L and vs T, + a PNG
    python bench/bench_train_step.py --thoughts            # RLP: time/memory vs thoughts per position G and T
    python bench/bench_train_step.py --case model=bench_small L=256 mode=grid   # one case, JSON on stdout
    python bench/bench_train_step.py --models bench_small --lengths 256 --steps 2 --tensor-peak --saved --pairs 4 \
        --out train_step_lean_cpu.json                     # the lean-by-default record

On CUDA (bf16 autocast) each case also reports its model FLOP utilisation: `quietstar.flops.step_flops` (the matmuls
the step must do, backward = 2x forward) / time / the GPU's dense bf16 peak.

Modes: `plain` = a plain LM forward+backward over the B sequences; `plain_grid` = plain LM
forward+backward over B*R sequences of length L, i.e. as many tokens as the thought grid holds
(R = 1 + n (S - 1) rows); `grid` = our step (rollout + learning pass, backend `split` on CPU);
`sequential_dense` = the reference's way. `grid` runs with the default `model.grad_checkpointing=auto`
(`checkpointing=auto`: as many blocks checkpointed as the default memory budget needs; its choice is
recorded as `checkpoint_plan`), once with every block checkpointed (`checkpointing=1`, shown as grid+ckpt),
and, with `--budget-gb X`, once more under that budget (grid+budget). The plain modes and sequential_dense
never checkpoint.

`--saved` also records what one block of the learning pass keeps for backward per grid token
(`saved_per_grid_token`, measured with saved-tensor hooks). `--tensor-peak` (CPU) also records each case's
peak of live tensor memory over one more, profiled, step (`peak_tensor_mb`): the measure a GPU reports,
free of what RSS adds on CPU (the runtime, about 0.4 GB, and the memory malloc keeps after tensors are freed).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))  # --saved runs in this process: this tree's quietstar, as the cases' PYTHONPATH

from quietstar.provenance import write_record  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(model: str, L: int, mode: str, T: int = 12, K: int = 4, n: int = 2, B: int = 2, steps: int = 2,
             device: str = "cpu", backend: str = "auto", checkpointing: str = "auto", budget_gb: float | None = None,
             warmup: int = 1, tensor_peak: int = 0, autocast: str = "auto", objective: str = "official") -> dict:
    import torch

    from quietstar import attention
    from quietstar.flops import step_flops
    from quietstar.masks import ThoughtGrid
    from quietstar.model import ModelConfig, Transformer
    from quietstar.methods.quietstar.thinker import QuietStar
    from quietstar.methods.quietstar.config import ThoughtConfig

    torch.manual_seed(0)
    # bf16 autocast on CUDA (the GPU recipe), fp32 on CPU unless autocast=bf16 (CPUs with bf16 matmul units)
    amp = device == "cuda" if autocast == "auto" else autocast == "bf16"
    dtype = torch.bfloat16 if amp else torch.float32
    if model == "smollm2_135m":
        from quietstar.loading import load_pretrained

        base, tok = load_pretrained("smollm2-135m", dtype=torch.float32, device=device)
    else:
        base, tok = Transformer(ModelConfig.from_preset(model)).to(device), None  # random weights: timing only
    base.grad_checkpointing = {"auto": "auto", "1": True, "0": False}[str(checkpointing)]
    base.memory_budget_gb = budget_gb
    attention.set_backend(backend)
    cfg = ThoughtConfig(n_ahead=T, n_ahead_talk=K, n_thoughts=n, objective=objective,
                        impl="sequential_dense" if mode == "sequential_dense" else "grid")
    qs = QuietStar(base, tok, cfg).to(device)
    V = base.cfg.vocab_size
    layout = ThoughtGrid(T, K, n)
    S, R = layout.S, layout.R
    rows = {"plain": B, "plain_grid": B * R}.get(mode, B)
    x = torch.randint(0, V, (rows, L), device=device)
    opt = torch.optim.AdamW(qs.parameters(), lr=1e-5, fused=True)  # as train.py (optim.build_optimizer)
    g = torch.Generator(device=device).manual_seed(0)

    def step():
        if mode.startswith("plain"):
            with torch.autocast(device, dtype=dtype, enabled=amp):
                logits = base(x[:, :-1])
                loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        else:
            with torch.autocast(device, dtype=dtype, enabled=amp):
                loss = qs(x, generator=g).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)  # as train.py: no gradients live through the next forward
        return float(loss.detach())

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):  # allocator, optimiser state
        step()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss0 = rss_mb()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    out = dict(model=model, L=L, mode=mode, T=T, K=K, n=n, B=B, S=S, R=R, device=device, objective=objective,
               autocast="bf16" if amp else "off",
               backend=attention.resolve_backend(torch.device(device)) if mode in ("grid",) else None,
               step_s=min(times), step_s_all=times, tokens=rows * L, grid_tokens=B * R * L,
               checkpointing=str(checkpointing), budget_gb=budget_gb,
               checkpoint_plan=[p.message for p in base._plans.values()])
    out["model_tflop"] = step_flops(base.cfg, mode, B, L, T, K, n) / 1e12
    if device == "cuda":
        out["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        peak_flops = next((v for k, v in PEAK_BF16.items() if k in torch.cuda.get_device_name()), None)
        if peak_flops:
            out["mfu"] = out["model_tflop"] * 1e12 / out["step_s"] / peak_flops
    else:
        out["peak_rss_mb"] = peak_rss_mb()
        out["rss_after_setup_mb"] = rss0
        if tensor_peak:  # after the RSS is read: the profiler's own memory does not count
            out["peak_tensor_mb"] = peak_tensor_bytes(step) / 2**20
    return out


def peak_tensor_bytes(step) -> float:
    """The peak of live tensor memory over one call of `step` on CPU, the parameters and optimizer state
    included: what the GPU's max_memory_allocated measures, without malloc's freed-but-kept memory (RSS's
    heap slack) and the runtime. From the profiler's memory timeline (a private torch API)."""
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as p:
        step()
    _, sizes = MemoryProfileTimeline(p._memory_profile())._coalesce_timeline(torch.device("cpu"))
    return float(np.asarray(sizes).sum(1).max())


PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense tensor-core FLOP/s


def spawn(case: dict, timeout: int = 1800, mem_limit_gb: float | None = None) -> dict:
    args = [sys.executable, __file__, "--case"] + [f"{k}={v}" for k, v in case.items()]
    pre = None
    if mem_limit_gb:
        lim = int(mem_limit_gb * 2**30)
        pre = lambda: resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    try:
        p = subprocess.run(args, capture_output=True, text=True, timeout=timeout, preexec_fn=pre,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired:
        return {**case, "error": f"timeout after {timeout}s"}
    if p.returncode != 0:
        tail = (p.stderr or "").strip().splitlines()[-1:] or ["?"]
        return {**case, "error": f"exit {p.returncode}: {tail[0][:300]}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def saved_per_grid_token(model: str = "bench_small", L: int = 64, T: int = 12, K: int = 4, n: int = 2,
                         B: int = 2) -> dict:
    """What block 0 of the learning pass keeps for backward per grid token (fp32, CPU): bytes, and that in
    d-sized fp32 tensors. Measured with saved-tensor hooks; tensors that other blocks share (RoPE's cos and
    sin) and the parameters are left out."""
    import torch

    from quietstar.memory import measure_saved_bytes
    from quietstar.model import ModelConfig, Transformer
    from quietstar.methods.quietstar.thinker import QuietStar
    from quietstar.methods.quietstar.config import ThoughtConfig

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(model)
    qs = QuietStar(Transformer(cfg), None, ThoughtConfig(n_ahead=T, n_ahead_talk=K, n_thoughts=n))
    qs.model.grad_checkpointing = False
    x = torch.randint(0, cfg.vocab_size, (B, L))
    saved, tokens = measure_saved_bytes(qs, x, qs.rollout(x))
    own = saved / tokens
    return dict(model=model, bytes=own, d_sized_fp32=round(own / (4 * cfg.dim), 2), d=cfg.dim,
                intermediate=cfg.intermediate_size)


def label(r: dict) -> str:
    if r.get("budget_gb"):
        return r["mode"] + "+budget"
    return r["mode"] + ("+ckpt" if str(r.get("checkpointing")) in ("1", "True") else "")


def peak(r: dict) -> float:
    return r.get("peak_rss_mb", r.get("peak_mem_mb", float("nan")))


def table(rows: list[dict]) -> str:
    """One line per case; time and memory relative to our step (grid, by default) on the same model/L/T."""
    lines = [f"{'model':14} {'L':>5} {'T':>3} {'mode':>17} {'step s':>9} {'peak MB':>9} {'time/grid':>10} {'mem/grid':>9}"]
    by = {(r["model"], r["L"], r.get("T")): r for r in rows if label(r) == "grid" and "error" not in r}
    for r in rows:
        g = by.get((r["model"], r["L"], r.get("T")))
        if "error" in r:
            lines.append(f"{r['model']:14} {r['L']:>5} {r.get('T', ''):>3} {label(r):>17}  {r['error']}")
            continue
        rel = f"{r['step_s'] / g['step_s']:.2f}x" if g else ""
        mrel = f"{peak(r) / peak(g):.2f}x" if g else ""
        mfu = f"  MFU {100 * r['mfu']:.1f}%" if "mfu" in r else ""
        lines.append(f"{r['model']:14} {r['L']:>5} {r['T']:>3} {label(r):>17} {r['step_s']:9.3f} {peak(r):9.0f} "
                     f"{rel:>10} {mrel:>9}{mfu}")
    return "\n".join(lines)


def goals(rows: list[dict]) -> dict:
    """The goal ratios, per model and L: our step / plain passes over the grid's tokens (time), and the
    reference-cost mode / our step (time and peak memory), for our step by default, with every block
    checkpointed and under --budget-gb."""
    out = {}
    ok = [r for r in rows if "error" not in r]
    for key in sorted({(r["model"], r["L"]) for r in ok}):
        at = {label(r): r for r in ok if (r["model"], r["L"]) == key and r.get("T", 12) == 12}
        entry = {}
        for ours in ("grid", "grid+ckpt", "grid+budget"):
            if ours not in at:
                continue
            if "plain_grid" in at:
                entry[f"{ours} / plain_grid time"] = round(at[ours]["step_s"] / at["plain_grid"]["step_s"], 3)
            if "sequential_dense" in at:
                entry[f"sequential_dense / {ours} time"] = round(at["sequential_dense"]["step_s"] / at[ours]["step_s"], 3)
                entry[f"sequential_dense / {ours} memory"] = round(peak(at["sequential_dense"]) / peak(at[ours]), 3)
                if "peak_tensor_mb" in at[ours] and "peak_tensor_mb" in at["sequential_dense"]:
                    entry[f"sequential_dense / {ours} tensor memory"] = round(
                        at["sequential_dense"]["peak_tensor_mb"] / at[ours]["peak_tensor_mb"], 3)
        if entry:
            out[f"{key[0]} L={key[1]}"] = entry
    return out


def thought_costs(rows: list[dict]) -> dict:
    """Step time and memory per grid row (one thought's S - 1 rows each), against the smallest case: a cost
    per thought that stays flat as G and T grow is the grid's own per-thought cost."""
    ok = [r for r in rows if "step_s" in r]
    if not ok:
        return {}
    ref = ok[0]
    per = lambda r, key: r[key] / (r["R"] - 1)
    return {f"G={r['n']} T={r['T']}": {"step_s": round(r["step_s"], 3), "peak_rss_mb": round(r.get("peak_rss_mb", 0)),
                                      "step_s per thought row / G=2 T=8's": round(per(r, "step_s") / per(ref, "step_s"), 3)}
            for r in ok}


def time_pairs(model: str, L: int, pairs: int, device: str, mem_limit_gb: float, autocast: str = "auto") -> dict:
    """sequential_dense / grid step time from `pairs` alternated measurements (grid, sequential_dense, grid,
    ...), each in a fresh process (1 warm-up step + 1 step): on a shared machine both drift alike. Contention
    only adds time, so the ratio of the fastest runs is the cleanest; every pair's ratio is kept."""
    runs = []
    for i in range(pairs):
        pair = {}
        for mode in ("grid", "sequential_dense"):
            r = spawn(dict(model=model, L=L, mode=mode, device=device, steps=1, autocast=autocast,
                           checkpointing="auto" if mode == "grid" else 0), mem_limit_gb=mem_limit_gb)
            if "error" in r:
                return {"error": f"pair {i}: {mode}: {r['error']}"}
            pair[f"{mode}_s"] = round(r["step_s"], 3)
        pair["ratio"] = round(pair["sequential_dense_s"] / pair["grid_s"], 2)
        print(f"pair {i + 1}/{pairs}: {pair}", flush=True)
        runs.append(pair)
    ratios = sorted(p["ratio"] for p in runs)
    best = min(p["sequential_dense_s"] for p in runs) / min(p["grid_s"] for p in runs)
    return dict(model=model, L=L, autocast=autocast, pairs=runs, ratios_sorted=ratios,
                median=statistics.median(ratios), fastest_sequential_dense_over_fastest_grid=round(best, 2))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", nargs="*", help="run one case (key=value ...) and print its JSON")
    ap.add_argument("--scaling", action="store_true", help="time and memory vs L and vs T")
    ap.add_argument("--thoughts", action="store_true",
                    help="objective=rlp on bench_small at L=256: time and memory vs G (2-16) and T (8-32)")
    ap.add_argument("--device", default="cuda" if os.environ.get("CUDA_VISIBLE_DEVICES") else "cpu")
    ap.add_argument("--models", default=None, help="default: bench_small,smollm2_135m (+ llama_1b on CUDA)")
    ap.add_argument("--lengths", default="128,256,512")
    ap.add_argument("--large-lengths", default=None, help="L for smollm2_135m / llama_1b (default: 128 on CPU, "
                    "128,512 on CUDA)")
    ap.add_argument("--mem-limit-gb", type=float, default=20.0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--steps", type=int, default=1, help="measured steps after one warm-up step")
    ap.add_argument("--budget-gb", type=float, default=None, help="also run grid under this memory budget")
    ap.add_argument("--pairs", type=int, default=0, help="also time grid against sequential_dense in this many "
                    "alternated pairs (the first model and L)")
    ap.add_argument("--autocast", default="auto", choices=["auto", "bf16", "off"],
                    help="auto: bf16 autocast on CUDA, fp32 on CPU; bf16: also on CPU (bf16 matmul units)")
    ap.add_argument("--saved", action="store_true", help="record what a block keeps for backward per grid token")
    ap.add_argument("--tensor-peak", action="store_true",
                    help="CPU: also record each case's peak live tensor memory (one more step, profiled)")
    a = ap.parse_args()
    if a.case is not None:
        kw = dict(kv.split("=", 1) for kv in a.case)
        for k in ("L", "T", "K", "n", "B", "steps", "warmup", "tensor_peak"):
            if k in kw:
                kw[k] = int(kw[k])
        if "budget_gb" in kw:
            kw["budget_gb"] = None if kw["budget_gb"] == "None" else float(kw["budget_gb"])
        print(json.dumps(run_case(**kw)))
        return

    rows = []
    if a.scaling:  # one step each, no warm-up step (the large cases take minutes)
        for L in (128, 256, 512, 1024, 2048):
            for mode, ckpt in (("plain_grid", 0), ("grid", "auto"), ("grid", 1), ("sequential_dense", 0)):
                if (mode == "sequential_dense" and L > 512) or (mode == "plain_grid" and L > 1024):
                    rows.append(dict(model="bench_small", L=L, T=12, mode=mode, checkpointing=str(ckpt),
                                     error="not run: out of memory at a shorter length"))
                    continue
                rows.append(spawn(dict(model="bench_small", L=L, mode=mode, device=a.device, steps=1, warmup=0,
                                       checkpointing=ckpt), mem_limit_gb=a.mem_limit_gb))
                print(table(rows[-1:]), flush=True)
        for T in (4, 8, 12, 16, 24):
            for mode in ("grid", "sequential_dense"):
                rows.append(spawn(dict(model="bench_small", L=128, T=T, mode=mode, device=a.device, steps=1,
                                       warmup=0, checkpointing="auto" if mode == "grid" else 0),
                                  mem_limit_gb=a.mem_limit_gb))
                print(table(rows[-1:]), flush=True)
        name = a.out or f"train_step_scaling_{a.device}.json"
    elif a.thoughts:  # per-thought cost: G thoughts per position at T = 8, then T at G = 4 (one step, one warm-up)
        sweep = [(G, 8) for G in (2, 4, 8, 16)] + [(4, T) for T in (16, 32)]
        for G, T in sweep:
            rows.append(spawn(dict(model="bench_small", L=256, T=T, K=1, n=G, mode="grid", device=a.device, steps=1,
                                   objective="rlp", tensor_peak=int(a.tensor_peak)), mem_limit_gb=a.mem_limit_gb))
            print(table(rows[-1:]), flush=True)
        name = a.out or f"train_step_thoughts_{a.device}.json"
    else:
        models = a.models or ("bench_small,smollm2_135m" + (",llama_1b" if a.device == "cuda" else ""))
        for model in models.split(","):
            large = a.large_lengths or ("128,512" if a.device == "cuda" else "128")
            lengths = a.lengths if model == "bench_small" else large
            for L in map(int, lengths.split(",")):
                cases = [("plain", 0, None), ("plain_grid", 0, None), ("grid", "auto", None), ("grid", 1, None),
                         ("sequential_dense", 0, None)]
                if a.budget_gb:
                    cases.insert(4, ("grid", "auto", a.budget_gb))
                for mode, ckpt, budget in cases:
                    rows.append(spawn(dict(model=model, L=L, mode=mode, device=a.device, steps=a.steps,
                                           autocast=a.autocast, checkpointing=ckpt, budget_gb=budget,
                                           tensor_peak=int(a.tensor_peak)),
                                      mem_limit_gb=a.mem_limit_gb))
                    print(table(rows[-1:]), flush=True)
        name = a.out or f"train_step_{a.device}.json"
    print()
    print(table(rows))
    summary = thought_costs(rows) if a.thoughts else goals(rows)
    print(json.dumps(summary, indent=1))
    path = RESULTS / name
    record = dict(goals=summary, results=rows)
    if a.pairs and not a.scaling:
        first = (a.models or "bench_small").split(",")[0]
        L = int((a.lengths if first == "bench_small" else (a.large_lengths or "128")).split(",")[0])
        record["time_pairs"] = time_pairs(first, L, a.pairs, a.device, a.mem_limit_gb, a.autocast)
        print(json.dumps(record["time_pairs"], indent=1))
    if a.saved:
        record["saved_per_grid_token"] = saved_per_grid_token()
        print(json.dumps(record["saved_per_grid_token"], indent=1))
    write_record(path, record, seeds=[])
    print(f"\nwrote {path}")
    if a.scaling:
        plot(rows, RESULTS / name.replace(".json", ".png"))


def plot(rows, path):
    from quietstar.plots import pyplot, save_figure

    def series(pts, key):  # one point per x, in order
        return sorted({r[key]: r for r in pts}.values(), key=lambda r: r[key])

    fig, axes = pyplot().subplots(1, 3, figsize=(14, 4))
    for mode, style in (("grid", "o-"), ("grid+ckpt", "o--"), ("sequential_dense", "s--"), ("plain_grid", "^:")):
        pts = series([r for r in rows if label(r) == mode and r.get("T", 12) == 12 and "step_s" in r], "L")
        if pts:
            axes[0].plot([r["L"] for r in pts], [r["step_s"] for r in pts], style, label=mode)
            axes[1].plot([r["L"] for r in pts], [peak(r) / 1024 for r in pts], style, label=mode)
        pts = series([r for r in rows if label(r) == mode and r["L"] == 128 and "step_s" in r], "T")
        if pts and mode in ("grid", "sequential_dense"):
            axes[2].plot([r["T"] for r in pts], [r["step_s"] for r in pts], style, label=mode)
    for ax, (xl, yl) in zip(axes, (("L", "step time (s)"), ("L", "peak RSS (GiB)"), ("T (L=128)", "step time (s)"))):
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.legend()
        ax.grid(alpha=0.3)
    axes[0].set_xscale("log", base=2)
    axes[1].set_xscale("log", base=2)
    fig.suptitle("Quiet-STaR training step, bench_small model, B=2, K=4, n=2")
    save_figure(fig, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
