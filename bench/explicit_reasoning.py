"""Summarise explicit-thinking runs (python train.py explicit=<method>) into one JSON, per method over seeds.

python bench/explicit_reasoning.py --out bench/results/explicit_reasoning_cpu.json \
    --command "..." GROUP=RUN_ROOT [GROUP=RUN_ROOT ...]

Each RUN_ROOT holds s<seed>/<method>/results.json (or <method>/results.json). Per group and method: the
held-out accuracy (overall and by hops) and tokens per answer of the base model and of the round chosen by
validation, with a rationale (cot) and without (direct); the median over seeds and every seed's numbers.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quietstar.eval.common import machine_info, write_json  # noqa: E402


def one(res: dict) -> dict:
    base, best = res["rounds"][0]["eval"], res["rounds"][res["best_round"]]["eval"]
    last = res["rounds"][-1]
    pick = lambda e: {m: {"acc": e[m]["acc"], "acc_by_hops": e[m]["acc_by_difficulty"],  # noqa: E731
                          "tokens_per_answer": e[m]["tokens_per_answer"]} for m in ("cot", "direct")}
    return {"base": pick(base), "chosen": pick(best), "last_round": pick(last["eval"]), "best_round": res["best_round"],
            "rounds_run": len(res["rounds"]) - 1, "examples_per_round": [r["examples"] for r in res["rounds"][1:]],
            "stats_per_round": [r["stats"] for r in res["rounds"][1:]],
            "skips_per_round": [r["skips"] for r in res["rounds"][1:]], "wall_s": res["wall_s"]}


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else 0.5 * (xs[len(xs) // 2 - 1] + xs[len(xs) // 2])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("groups", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--command", default="")
    args = ap.parse_args()
    out = {"date": time.strftime("%Y-%m-%d"), "machine": machine_info(), "command": args.command, "groups": {}}
    for g in args.groups:
        name, root = g.split("=", 1)
        files = sorted(Path(root).glob("*/results.json")) + sorted(Path(root).glob("s*/*/results.json"))
        by_method: dict = {}
        for f in files:
            res = json.loads(f.read_text())
            seed = f.parent.parent.name if f.parent.parent.name.startswith("s") else "s0"
            by_method.setdefault(res["method"], {})[seed] = one(res)
        summary = {}
        for method, seeds in sorted(by_method.items()):
            med = {which: {m: {"acc": median([s[which][m]["acc"] for s in seeds.values()]),
                               "tokens_per_answer": median([s[which][m]["tokens_per_answer"] for s in seeds.values()])}
                           for m in ("cot", "direct")} for which in ("base", "chosen", "last_round")}
            summary[method] = {"seeds": sorted(seeds), "median": med, "per_seed": seeds}
        out["groups"][name] = summary
    write_json(args.out, out)
    for name, summary in out["groups"].items():
        for method, s in summary.items():
            for which in ("base", "chosen", "last_round"):
                m = s["median"][which]
                print(f"{name:>10} {method:>8} {which:>10}: cot {m['cot']['acc']:.3f} ({m['cot']['tokens_per_answer']:.2f} tok)"
                      f"  direct {m['direct']['acc']:.3f} ({m['direct']['tokens_per_answer']:.2f} tok)  seeds {s['seeds']}")


if __name__ == "__main__":
    main()
