"""Model selection over explicit runs by validation accuracy; the held-out split is never read to choose.

    python -m quietstar.methods.explicit.select RUN_DIR ... [--out selection.json]

Each RUN_DIR holds one explicit run's results.json: one point of a small grid (explicit.beta, optim.lr,
explicit.steps, explicit.nll_weight, explicit.loss, ...), the same method, corpus and seed. A run's score is
the validation accuracy (training-split questions no method samples) of the round its own rule chose
(`best_round`: the best validation round, base included); the chosen run has the highest score, ties to the
run given first. Every run's held-out accuracy is reported beside its score, and never used to choose.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Sequence

from quietstar.errors import UserError


def validation_score(res: dict) -> float:
    """The validation accuracy of the round the run chose."""
    return res["rounds"][res["best_round"]]["eval"]["val"]


def choose(results: Sequence[dict]) -> int:
    """The index of the run with the highest validation score; ties go to the earlier run."""
    if not results:
        raise UserError("select: no runs to choose from")
    scores = [validation_score(r) for r in results]
    return scores.index(max(scores))


def _settings(res: dict) -> dict:
    flat = {f"explicit.{k}": v for k, v in res.get("settings", {}).items()}
    flat.update({f"optim.{k}": v for k, v in res.get("optim", {}).items()})
    return flat


def summarise(results: Sequence[dict], names: Sequence[str]) -> dict:
    """Each run's differing settings, validation score and held-out accuracy, and the chosen run."""
    settings = [_settings(r) for r in results]
    keys = sorted({k for s in settings for k in s})
    differ = [k for k in keys if len({json.dumps(s.get(k), sort_keys=True) for s in settings}) > 1]
    methods = {r["method"] for r in results}
    if len(methods) > 1:
        raise UserError(f"select: the runs are of different methods {sorted(methods)}; choose within one method")
    runs = []
    for name, res, s in zip(names, results, settings):
        mode, best = res["eval_mode"], res["rounds"][res["best_round"]]["eval"]
        runs.append({"run": name, "settings": {k: s.get(k) for k in differ}, "best_round": res["best_round"],
                     "val": validation_score(res), "held_out_acc": best[mode]["acc"],
                     "base_held_out_acc": res["rounds"][0]["eval"][mode]["acc"]})
    i = choose(results)
    return {"method": methods.pop(), "chosen": runs[i]["run"], "chosen_settings": runs[i]["settings"],
            "chosen_by": "validation accuracy of each run's best round (training-split questions)", "runs": runs}


def load(run_dirs: Sequence[str]) -> List[dict]:
    out = []
    for d in run_dirs:
        path = Path(d) / "results.json"
        if not path.is_file():
            raise UserError(f"select: {path} not found (an explicit run's directory holds results.json)")
        try:
            out.append(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise UserError(f"select: {path} is not valid JSON ({e})") from e
    return out


def main(argv=None) -> dict:
    from quietstar.provenance import write_record

    ap = argparse.ArgumentParser(description="choose among explicit runs by validation accuracy")
    ap.add_argument("runs", nargs="+", help="explicit run directories (each with results.json)")
    ap.add_argument("--out", help="write the selection here (JSON, with provenance)")
    args = ap.parse_args(argv)
    results = load(args.runs)
    summary = summarise(results, args.runs)
    for r in summary["runs"]:
        mark = "*" if r["run"] == summary["chosen"] else " "
        print(f"{mark} val {r['val']:.3f}  held-out {r['held_out_acc']:.3f} (base {r['base_held_out_acc']:.3f}, "
              f"round {r['best_round']})  {r['settings']}  {r['run']}")
    if args.out:
        seeds = sorted({r["seed"] for r in results if "seed" in r})
        write_record(args.out, summary, seeds=seeds, command=[sys.executable, "-m", "quietstar.methods.explicit.select",
                                                               *(argv if argv is not None else sys.argv[1:])])
    return summary


if __name__ == "__main__":
    from quietstar.errors import run_main

    run_main(main)
