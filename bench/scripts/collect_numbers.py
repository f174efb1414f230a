"""Gather the json files of bench/scripts/run_numbers.sh into one record (with the training run's settings).

    python bench/scripts/collect_numbers.py OUT_DIR RUN_DIR bench/results/eval_2026-11-22.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from quietstar.provenance import write_record  # noqa: E402


def load(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def thought_or_base(rec, key_thought, key_base):
    """With the talk head at exactly zero the with-thought prediction is the base one (not re-run)."""
    if rec is None:
        return None
    v = rec.get(key_thought)
    return rec.get(key_base) if v is None and not rec["thought"]["thoughts_run"] else v


def seeds(run_dir: Path, out_dir: Path) -> set:
    """The training run's train.seed and the evaluations' seeds."""
    import yaml

    cfg = run_dir / "config.yaml"
    found = {yaml.safe_load(cfg.read_text())["train"]["seed"]} if cfg.is_file() else set()
    return found | {load(f)["settings"]["seed"] for f in out_dir.glob("*.json")}


def main(out_dir, run_dir, dest):
    out_dir, run_dir = Path(out_dir), Path(run_dir)
    models = {}
    for who in ("base", "trained"):
        g, c = load(out_dir / f"{who}_gsm8k_soft.json"), load(out_dir / f"{who}_csqa_soft.json")
        em, nll = load(out_dir / f"{who}_gsm8k_em.json"), load(out_dir / f"{who}_nll.json")
        if em is not None and "cot" not in em:  # a file written when the detail shared the "em" key
            em["cot"] = em["em"]
            em["em"] = em["cot"]["em"]
        models[who] = {
            "model": (g or c or em or nll or {}).get("model"),
            "gsm8k_soft_acc_base": g and g["soft_acc_base"],
            "gsm8k_soft_acc_thought": thought_or_base(g, "soft_acc_thought", "soft_acc_base"),
            "csqa_soft_acc_base": c and c["soft_acc_base"],
            "csqa_soft_acc_thought": thought_or_base(c, "soft_acc_thought", "soft_acc_base"),
            "gsm8k_em": em and em["em"],
            "nll_base": nll and nll["nll_base"],
            "nll_thought": nll and nll["nll_thought"],
            "nll_gain": nll and nll["gain"],
            "thoughts_run": {k: r["thought"]["thoughts_run"] for k, r in
                             (("gsm8k_soft", g), ("csqa_soft", c), ("gsm8k_em", em), ("nll", nll)) if r},
            "seconds": {k: r["seconds"] for k, r in (("gsm8k_soft", g), ("csqa_soft", c), ("gsm8k_em", em),
                                                    ("nll", nll)) if r},
            "detail": {
                "gsm8k_soft": g and {k: g["soft"][k] for k in ("n", "n_uncovered", "n_numeric", "n_negative",
                                                               "method", "token_sets", "negative_answers")},
                "csqa_soft": c and {k: c["soft"][k] for k in ("n", "n_uncovered", "method", "token_sets")},
                "gsm8k_em": em and {k: em["cot"][k] for k in ("n", "k", "temperature", "max_cot_tokens",
                                                              "answer_tokens", "think")}
                | {"voted": [i["voted"] for i in em["cot"]["items"]], "gold": [i["gold"] for i in em["cot"]["items"]],
                   "first_sample": em["cot"]["items"][0]["sample"]},
                "nll": nll and {"buckets": nll["buckets"], "tokens": nll["tokens"], "records": nll["n"],
                                "data_start": nll["data_start"], "seq_len": nll["seq_len"],
                                "frac_improved": nll["frac_improved"], "mix_weight_mean": nll["mix_weight_mean"]},
            },
        }
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = {"run_dir": str(run_dir), "steps": len(metrics),
             "config": (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else None,
             "first": {k: metrics[0].get(k) for k in ("train/nll_base", "train/nll_talk", "thought/mix_weight_mean")},
             "last": {k: metrics[-1].get(k) for k in ("train/nll_base", "train/nll_talk", "thought/mix_weight_mean",
                                                      "thought/mix_weight_abs_mean", "thought/reward_mean")}}
    rec = {"what": "SmolLM2-135M base vs a short Quiet-STaR run of it, on this CPU",
           "table": {who: {k: m[k] for k in ("gsm8k_soft_acc_base", "gsm8k_soft_acc_thought", "csqa_soft_acc_base",
                                             "csqa_soft_acc_thought", "gsm8k_em", "nll_base", "nll_thought",
                                             "nll_gain")} for who, m in models.items()},
           "models": models, "training": train}
    write_record(dest, rec, seeds=seeds(run_dir, out_dir))
    print(json.dumps(rec["table"], indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:4])
