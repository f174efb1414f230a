"""Time one training step of two source trees back to back, alternating, under the same conditions.

    python bench/scripts/ab_branches.py OLD_TREE NEW_TREE [--reps 3] [--out bench/results/X.json]

Each measurement is one fresh process running `bench/bench_train_step.py --case ...` from that tree (its
own code on the path); the trees alternate (old, new, old, new, ...) so that a shared, busy machine
drifts alike for both. Reported per case: new / old of the medians over the repetitions and of the best runs (contention
only adds time, so the best runs compare most cleanly).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from quietstar.provenance import git_commit, write_record  # noqa: E402

CASES = [dict(model="bench_small", L=128), dict(model="bench_small", L=256)]


def run(tree: Path, case: dict, steps: int) -> dict:
    args = [f"{k}={v}" for k, v in {**case, "mode": "grid", "steps": steps}.items()]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, str(tree / "bench" / "bench_train_step.py"), "--case", *args], cwd=tree,
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    rows = []
    for case in CASES:
        times = {"old": [], "new": []}
        for _ in range(a.reps):
            for name in ("old", "new"):
                r = run(getattr(a, name).resolve(), case, a.steps)
                times[name].append(r["step_s"])
                print(f"{case} {name}: {r['step_s']:.3f} s", flush=True)
        old, new = statistics.median(times["old"]), statistics.median(times["new"])
        best = min(times["new"]) / min(times["old"])  # contention only adds time: the best runs compare cleanest
        rows.append({**case, "mode": "grid", "old_step_s": times["old"], "new_step_s": times["new"],
                     "old_median_s": old, "new_median_s": new, "new / old (median)": round(new / old, 3),
                     "new / old (best)": round(best, 3)})
        print(f"{case}: new / old = {new / old:.3f} (median), {best:.3f} (best)", flush=True)
    result = {"old": str(a.old), "old_tree": git_commit(a.old.resolve()), "new": str(a.new),
              "new_tree": git_commit(a.new.resolve()), "reps": a.reps, "steps": a.steps, "results": rows}
    if a.out:
        write_record(a.out, result, seeds=[])


if __name__ == "__main__":
    main()
