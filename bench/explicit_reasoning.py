"""Summarise explicit-thinking runs (python train.py explicit=<method>) into one JSON, per method over seeds.

python bench/explicit_reasoning.py --out bench/results/explicit_reasoning_cpu.json \
    --command "..." GROUP=RUN_ROOT [GROUP=RUN_ROOT ...]

Each RUN_ROOT holds s<seed>/<method>/results.json (or <method>/results.json). Per group and method: the
held-out accuracy (overall and by hops) and tokens per answer of the base model and of the round chosen by
validation, with a rationale (cot) and without (direct); the median over seeds and every seed's numbers.

--add-to RECORD keeps the groups of an earlier record of this script and adds (or replaces) the ones given
here: the record's provenance is then this command's, and each earlier group keeps the provenance it was
written with (`group_provenance`), so new rows sit beside the old ones for comparison.

--quietstar GROUP=LTT_RUN [...] scores learn_to_think runs (python train.py experiment=learn_to_think) on the
same held-out questions, in the same way (greedy, from the map line): the Quiet-STaR stage answering directly
with a thought before every token it writes (`implicit`; its hidden thought tokens count in tokens per
answer) and without, and the matched plain-LM baseline stage. The group's explicit runs give the questions'
settings (seed, corpus), so a Quiet-STaR row is only compared with runs of its own corpus and seed.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quietstar.provenance import write_record  # noqa: E402


def read_seed(run: Path) -> int:
    from quietstar.checkpoint import find_checkpoint, read_train_config
    from quietstar.methods.registry import TrainConfig

    return read_train_config(find_checkpoint(run / "quietstar"), TrainConfig).train.seed


def one(res: dict) -> dict:
    base, best = res["rounds"][0]["eval"], res["rounds"][res["best_round"]]["eval"]
    last = res["rounds"][-1]
    pick = lambda e: {m: {"acc": e[m]["acc"], "acc_by_hops": e[m]["acc_by_difficulty"],  # noqa: E731
                          "tokens_per_answer": e[m]["tokens_per_answer"]} for m in ("cot", "direct")}
    out = {"base": pick(base), "chosen": pick(best), "last_round": pick(last["eval"]), "best_round": res["best_round"],
            "rounds_run": len(res["rounds"]) - 1, "val_acc_per_round": [r["eval"].get("val") for r in res["rounds"]],
            "examples_per_round": [r["examples"] for r in res["rounds"][1:]],
            "stats_per_round": [r["stats"] for r in res["rounds"][1:]],
            "skips_per_round": [r["skips"] for r in res["rounds"][1:]], "wall_s": res["wall_s"]}
    if "verifier" in res:  # V-STaR: held-out accuracy vs k at k = 1, 2, 4, 8, 16
        v = res["verifier"]
        out["verifier"] = {"pairs": v["pairs"], "n": v["n"], "tokens_per_solution": v["tokens_per_solution"],
                           **{c: {k: v[c][k - 1] for k in (1, 2, 4, 8, 16) if k <= len(v[c])}
                              for c in ("best_of_k_ratio", "best_of_k_likelihood", "majority_vote", "pass_at_k")}}
    return out


def quietstar_rows(ltt_run: Path, explicit_results: Path) -> dict:
    """A learn_to_think run's Quiet-STaR and baseline stages on the held-out questions of an explicit run."""
    import dataclasses

    import torch

    from quietstar.checkpoint import find_checkpoint, read_train_config
    from quietstar.methods.registry import TrainConfig
    from quietstar.methods.quietstar.load import load_thinker_checkpoint
    from quietstar.methods.explicit.config import ExplicitConfig
    from quietstar.methods.explicit.loop import Context, _questions, evaluate

    ex = json.loads(explicit_results.read_text())
    cfg = read_train_config(find_checkpoint(ex["base"]), TrainConfig)  # the explicit run's base: its corpus and seed
    cfg = dataclasses.replace(cfg, explicit=ExplicitConfig(**{**ex["settings"], "method": ex["method"]}))
    evq = _questions(cfg)[2]
    out = {"questions": len(evq), "explicit_run": str(explicit_results)}
    for stage, modes in (("quietstar", ("implicit", "direct")), ("baseline", ("direct",))):
        try:
            path = find_checkpoint(ltt_run / stage)
        except Exception as e:  # a stage not (yet) finished: its rows are left out, and say so
            out[f"{stage}_missing"] = str(e)
            print(f"{ltt_run} {stage}: no finished checkpoint ({e}); its rows are left out", flush=True)
            continue
        if read_train_config(path, TrainConfig).data.reasoning != cfg.data.reasoning:
            raise SystemExit(f"{path}: its corpus differs from {explicit_results}'s; pair runs of one corpus and seed")
        qs = load_thinker_checkpoint(path).eval()
        ctx = Context(cfg, qs.tokenizer)
        torch.manual_seed(0)
        for m in modes:
            e = evaluate(ctx, qs, evq, "direct", implicit=m == "implicit")
            out[f"{stage}_{m}"] = {"acc": e["acc"], "acc_by_hops": e["acc_by_difficulty"],
                                   "tokens_per_answer": e["tokens_per_answer"], "checkpoint": str(path)}
            print(f"{ltt_run} {stage} {m}: acc {e['acc']:.3f} tokens/answer {e['tokens_per_answer']:.2f}", flush=True)
    return out


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else 0.5 * (xs[len(xs) // 2 - 1] + xs[len(xs) // 2])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("groups", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--command", default="", help="how the runs were made (the record's `command`; its provenance "
                    "block holds this summary's own command line)")
    ap.add_argument("--quietstar", nargs="*", default=[], help="GROUP=LEARN_TO_THINK_RUN (seed s: s<seed> of GROUP's "
                    "explicit runs gives its questions); the seed's Quiet-STaR rows go to GROUP")
    ap.add_argument("--add-to", default=None, help="an earlier record of this script whose groups are kept")
    args = ap.parse_args()
    out = {"command": args.command, "groups": {}}
    earlier = json.loads(Path(args.add_to).read_text()) if args.add_to else None
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
            if all("verifier" in s for s in seeds.values()):
                curves = [s["verifier"] for s in seeds.values()]
                med["verifier"] = {c: {k: median([cv[c][k] for cv in curves]) for k in curves[0][c]}
                                   for c in curves[0] if isinstance(curves[0][c], dict)}
        out["groups"][name] = summary
    for g in args.quietstar:
        name, run = g.split("=", 1)
        root = dict(x.split("=", 1) for x in args.groups)[name]
        seed = read_seed(Path(run))
        ref = next(iter(sorted(Path(root).glob(f"s{seed}/*/results.json")) or sorted(Path(root).glob("*/results.json"))))
        out["groups"][name].setdefault("quietstar", {}).setdefault("per_seed", {})[f"s{seed}"] = \
            quietstar_rows(Path(run), ref)
    for name, summary in out["groups"].items():
        if "quietstar" in summary:
            seeds = summary["quietstar"]["per_seed"]
            keys = sorted({k for s in seeds.values() for k, v in s.items() if isinstance(v, dict)})
            summary["quietstar"]["seeds"] = sorted(seeds)
            summary["quietstar"]["median"] = {k: {f: median([s[k][f] for s in seeds.values() if k in s])
                                                  for f in ("acc", "tokens_per_answer")} for k in keys}
    if earlier is not None:
        new = set(out["groups"])
        kept = {k: v for k, v in earlier["groups"].items() if k not in new}
        prov = dict(earlier.get("group_provenance", {}))
        for k in kept:
            prov.setdefault(k, {**earlier["provenance"], "command": earlier.get("command", "")})
        for k in new:
            prov.pop(k, None)
        out = {**out, "groups": {**kept, **out["groups"]}, "group_provenance": prov}
    seeds = {int(s[1:]) for summary in out["groups"].values() for m in summary.values() for s in m["seeds"]}  # "s0"
    write_record(args.out, out, seeds=seeds)
    for name, summary in out["groups"].items():
        for method, s in summary.items():
            if method == "quietstar":
                for k, m in s["median"].items():
                    print(f"{name:>10} quietstar {k:>18}: {m['acc']:.3f} ({m['tokens_per_answer']:.2f} tok)  seeds {s['seeds']}")
                continue
            if "verifier" in s["median"]:
                for c, ks in s["median"]["verifier"].items():
                    print(f"{name:>10} {method:>8} {c:>20}: " + " ".join(f"k={k}:{v:.3f}" for k, v in ks.items()))
            for which in ("base", "chosen", "last_round"):
                m = s["median"][which]
                print(f"{name:>10} {method:>8} {which:>10}: cot {m['cot']['acc']:.3f} ({m['cot']['tokens_per_answer']:.2f} tok)"
                      f"  direct {m['direct']['acc']:.3f} ({m['direct']['tokens_per_answer']:.2f} tok)  seeds {s['seeds']}")


if __name__ == "__main__":
    main()
