"""The cost of thinking at a fraction of the positions (thought.where): one training step's wall time and peak
memory, and generation tokens/s, vs thought.think_fraction.

A step at fraction q runs the text row (L tokens) plus n (S - 1) q L branch tokens, so the goal is a step
costing at most 1.2 x (1 + q n (S - 1)) / (1 + n (S - 1)) of the all-positions step (where = all). Each case
runs in a fresh process (peak RSS on CPU, the runtime included; max allocated on CUDA). The selector is
`entropy` (the gate costs the same: a small head on the text row); the fraction is what matters here.

    python bench/bench_where.py                  # bench_small, L=256, B=2, T=12, K=4, n=2 -> bench/results/where_cost_cpu.json
                                                 # (each case 3 times, round-robin, its fastest run kept)
    python bench/bench_where.py --case where=entropy q=0.25   # one case, JSON on stdout
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from bench_train_step import peak_rss_mb  # noqa: E402
from quietstar.provenance import write_record  # noqa: E402

FRACTIONS = (1.0, 0.5, 0.25, 0.1)


def run_case(where: str, q: float, model: str = "bench_small", L: int = 256, B: int = 2, T: int = 12, K: int = 4,
             n: int = 2, steps: int = 2, gen_tokens: int = 48, device: str = "cpu") -> dict:
    import torch

    from quietstar.generate import generate_stream
    from quietstar.masks import ThoughtGrid
    from quietstar.model import ModelConfig, Transformer
    from quietstar.methods.quietstar.thinker import QuietStar
    from quietstar.methods.quietstar.config import ThoughtConfig

    torch.manual_seed(0)
    base = Transformer(ModelConfig.from_preset(model)).to(device)  # random weights: timing only
    cfg = ThoughtConfig(n_ahead=T, n_ahead_talk=K, n_thoughts=n, where=where, think_fraction=q)
    qs = QuietStar(base, None, cfg).to(device)
    x = torch.randint(0, base.cfg.vocab_size, (B, L), device=device)
    opt = torch.optim.AdamW(qs.parameters(), lr=1e-5, fused=True)  # as train.py (optim.build_optimizer)
    g = torch.Generator(device=device).manual_seed(0)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        out = qs(x, generator=g)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)  # as train.py: no gradients live through the next forward
        return out

    out = step()  # warm-up: allocator, optimiser state
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = step()
        sync()
        times.append(time.perf_counter() - t0)
    frac = out.metrics.get("thought/think_fraction")
    P = L if where == "all" else out.selection.positions.shape[1]  # thinking positions
    res = dict(model=model, where=where, q=q, L=L, B=B, T=T, K=K, n=n, device=device, step_s=min(times),
               step_s_all=times, think_fraction=1.0 if frac is None else float(frac),
               grid_tokens=int(B * (L + (ThoughtGrid(T, K, n).R - 1) * P)))
    res["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_mb()
    # generation: one prompt of 64 tokens, gen_tokens new ones; a thought only where the selector fires
    qs.eval()
    prompt = x[:1, :64]
    gen = torch.Generator(device=device).manual_seed(1)
    with torch.no_grad():
        t0 = time.perf_counter()
        steps_ = list(generate_stream(qs, prompt, max_new_tokens=gen_tokens, generator=gen))
        dt = time.perf_counter() - t0
    res["gen_tokens_per_s"] = len(steps_) / dt
    res["gen_think_share"] = 1.0 if where == "all" else sum(int(s.thinking[0]) for s in steps_) / len(steps_)
    return res


def spawn(case: dict, timeout: int = 1800) -> dict:
    args = [sys.executable, __file__, "--case"] + [f"{k}={v}" for k, v in case.items()]
    p = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if p.returncode != 0:
        tail = (p.stderr or "").strip().splitlines()[-1:] or ["?"]
        return {**case, "error": f"exit {p.returncode}: {tail[0][:300]}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", nargs="*", help="run one case (key=value ...) and print its JSON")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    ap.add_argument("--rounds", type=int, default=3,
                    help="run every case this many times, round-robin, and keep each case's fastest run: the "
                         "machine's speed drifts between minutes, and interleaving spreads the drift over all cases")
    args = ap.parse_args()
    if args.case is not None:
        kw = dict(kv.split("=", 1) for kv in args.case)
        conv = {"q": float, "L": int, "B": int, "T": int, "K": int, "n": int, "steps": int, "gen_tokens": int}
        print(json.dumps(run_case(**{k: conv.get(k, str)(v) for k, v in kw.items()})))
        return
    cases = [dict(where="all", q=1.0, device=args.device)] + [dict(where="entropy", q=q, device=args.device)
                                                              for q in FRACTIONS]
    runs = [[] for _ in cases]
    for r in range(args.rounds):
        for i, case in enumerate(cases):
            runs[i].append(spawn(case))
            print(f"round {r + 1}/{args.rounds}: {json.dumps(runs[i][-1])}", flush=True)
    rows = []
    for case_runs in runs:
        ok = [x for x in case_runs if "error" not in x]
        best = dict(min(ok, key=lambda x: x["step_s"])) if ok else dict(case_runs[-1])
        best["step_s_rounds"] = [x.get("step_s") for x in case_runs]
        rows.append(best)
    full = rows[0]
    S, n = full["T"] + full["K"] - 1, full["n"]
    summary = {}
    for r in rows[1:]:
        if "error" in r or "error" in full:
            continue
        ideal = (1 + r["q"] * n * (S - 1)) / (1 + n * (S - 1))
        key = f"q={r['q']}"
        summary[key] = dict(time_ratio=r["step_s"] / full["step_s"], memory_ratio=r["peak_mem_mb"] / full["peak_mem_mb"],
                                      ideal_ratio=ideal, goal_ratio=1.2 * ideal,
                                      time_goal_met=r["step_s"] / full["step_s"] <= 1.2 * ideal,
                                      gen_speedup=r["gen_tokens_per_s"] / full["gen_tokens_per_s"])
        print(f"q={r['q']:<5} step {r['step_s']:.2f}s ({summary[key]['time_ratio']:.3f} of all; goal <= "
              f"{1.2 * ideal:.3f})  peak {r['peak_mem_mb']:.0f} MB  gen {r['gen_tokens_per_s']:.1f} tok/s "
              f"(thinks at {r['gen_think_share']:.2f})")
    dev = "cuda" if args.device == "cuda" else "cpu"
    path = Path(args.out) if args.out else ROOT / "bench" / "results" / f"where_cost_{dev}.json"
    write_record(path, dict(summary=summary, results=rows), seeds=[])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
