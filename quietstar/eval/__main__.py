"""python -m quietstar.eval gsm8k|csqa|nll|report [key=value ...]

  gsm8k   GSM8K test: the paper's teacher-forced soft accuracy (metric=soft), zero-shot-CoT exact match
          with a k-sample majority vote (metric=em), or both
  csqa    CommonsenseQA dev: the same two metrics (the letter variant of the CoT)
  nll     held-out NLL of a jsonl corpus (`text`) with and without thoughts, by difficulty bucket;
          per-token scores go to an .npz beside the json (report=FILE.html: also the per-token page)
  report  the per-token HTML page (+ PNG plot, + json summary) for a few records of a jsonl corpus

Common keys: ckpt=DIR (a train.py run or checkpoint dir, or an export dir; none: the base model with
fresh thought parameters), model=smollm2-135m, data.path=FILE (default: ../shared/data/... beside the
project), data.start=0 (negative: from the end), limit=N (0: all), out=FILE, batch_size, seed, device,
thoughts=auto|on|off (auto: skip sampling thoughts when the talk head is exactly zero, which makes the
with-thought numbers equal the base ones), n_ahead=T (override the thought length, T - 1 tokens),
threads=N (torch threads; 0 = torch's default).
The json holds its provenance (command, git commit, date, machine, seed: quietstar/provenance.py), the
headline figures, then the settings and per-item detail.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from quietstar.cli import AT_LEAST_1, NON_NEGATIVE, Rule, check_writable, one_of, parse_kv
from quietstar.errors import UserError, run_main
from quietstar.eval import common
from quietstar.provenance import jsonable, provenance

COMMON = {"ckpt": "", "model": "smollm2-135m", "data.path": "", "data.start": 0, "limit": 0, "out": "",
          "batch_size": 8, "seed": 0, "device": "cpu", "thoughts": "auto", "n_ahead": 0, "threads": 0}
QA = {"metric": "soft", "method": "cached", "max_len": 256, "k": 1, "temperature": 0.9, "max_cot_tokens": 128,
      "answer_tokens": 12}
TASKS = {
    "gsm8k": {**COMMON, **QA},
    "csqa": {**COMMON, **QA},
    "nll": {**COMMON, "batch_size": 4, "seq_len": 128, "n_buckets": 5, "npz": "", "report": "", "report_records": 3},
    "report": {**COMMON, "batch_size": 4, "limit": 3, "seq_len": 128, "n_buckets": 5},
}
RULES = {"limit": NON_NEGATIVE, "batch_size": AT_LEAST_1, "seed": NON_NEGATIVE, "threads": NON_NEGATIVE,
         "thoughts": one_of("auto", "on", "off"), "n_ahead": Rule(lambda x: x == 0 or x >= 3, "0 or >= 3"),
         "metric": one_of("soft", "em", "both"), "max_len": AT_LEAST_1, "k": AT_LEAST_1, "temperature": NON_NEGATIVE,
         "max_cot_tokens": AT_LEAST_1, "answer_tokens": AT_LEAST_1, "seq_len": Rule(lambda x: x >= 2, ">= 2"),
         "n_buckets": AT_LEAST_1, "report_records": AT_LEAST_1}
DATA = {"gsm8k": "gsm8k/test.jsonl", "csqa": "commonsenseqa/dev_rand_split.jsonl",
        "nll": "math_web/train.jsonl", "report": "math_web/train.jsonl"}


def usage() -> str:
    return __doc__ + "\nKeys per task:\n" + "\n".join(f"  {t}: {' '.join(sorted(d))}" for t, d in TASKS.items())


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in TASKS:
        raise SystemExit(usage())
    task = argv[0]
    args = parse_kv(argv[1:], TASKS[task], {k: r for k, r in RULES.items() if k in TASKS[task]})
    if args["threads"]:
        torch.set_num_threads(args["threads"])
    path = common.default_data_path(DATA[task], args["data.path"])
    out = Path(args["out"] or (f"eval_{task}.json" if task != "report" else "report.html"))
    check_outputs(task, out, args)  # before the work: a bad out path must not cost a whole evaluation
    t0 = time.perf_counter()
    data = load_data(task, path, args)  # data first, so that a bad file fails before the model loads
    qs, tok, desc = common.load_model(args["ckpt"] or None, args["model"], args["device"], args["n_ahead"] or None)
    think = common.resolve_think(qs, args["thoughts"])
    g = torch.Generator(device=args["device"]).manual_seed(args["seed"])
    record = {"task": task, "model": desc, "data": str(path), "data_start": args["data.start"], "n": len(data)}
    if task in ("gsm8k", "csqa"):
        detail = score_questions(task, qs, tok, data, think, g, args, record)
    else:
        detail, out = score_text(task, qs, tok, data, think, g, args, record, desc, path, out)
    record.update(seconds=round(time.perf_counter() - t0, 1), thought=common.thought_info(qs, think),
                  settings=args, **detail)
    command = ["python", "-m", "quietstar.eval", *argv]
    record = {"provenance": provenance([args["seed"]], command), **record}
    write_record(task, record, out)
    return record


def load_data(task: str, path, args: dict):
    limit = args["limit"] or None
    if task == "gsm8k":
        from quietstar.eval.gsm8k import load_gsm8k

        return load_gsm8k(path, args["data.start"], limit)
    if task == "csqa":
        from quietstar.eval.csqa import load_csqa

        return load_csqa(path, args["data.start"], limit)
    from quietstar.eval.nll import load_texts

    return load_texts(path, args["data.start"], limit)


def score_questions(task: str, qs, tok, data, think, g, args: dict, record: dict) -> dict:
    """GSM8K / CommonsenseQA: soft accuracy and / or exact match; fills `record`, returns the detail."""
    from quietstar.eval import csqa, gsm8k

    mod = gsm8k if task == "gsm8k" else csqa
    if args["metric"] not in ("soft", "em", "both"):
        raise UserError(f"metric must be soft, em or both, got {args['metric']!r}")
    detail = {}
    if args["metric"] in ("soft", "both"):
        res = mod.evaluate_soft(qs, tok, data, think, method=args["method"], batch_size=args["batch_size"],
                                max_len=args["max_len"], generator=g)
        record.update(soft_acc_base=res["soft_acc_base"], soft_acc_thought=res["soft_acc_thought"])
        detail["soft"] = res
    if args["metric"] in ("em", "both"):
        res = mod.evaluate_em(qs, tok, data, think, k=args["k"], generator=g, temperature=args["temperature"],
                              max_cot_tokens=args["max_cot_tokens"], answer_tokens=args["answer_tokens"],
                              batch_size=args["batch_size"])
        record.update(em=res["em"], em_k=res["k"])
        detail["cot"] = res
    return detail


def score_text(task: str, qs, tok, data, think, g, args: dict, record: dict, desc: str, path, out: Path):
    """Held-out NLL (task nll) or the per-token report; fills `record`. -> (detail, the JSON's path)."""
    from quietstar.eval import nll
    from quietstar.eval.report import write_report

    scores = nll.score_tokens(qs, tok, [t for _, t in data], seq_len=args["seq_len"], batch_size=args["batch_size"],
                              think=think, generator=g, desc=task, names=[f"{path}:{ln}" for ln, _ in data])
    if task != "nll":
        sub = f"{desc}; {path} records from {args['data.start']} ({len(data)}), first {args['seq_len']} tokens"
        summary = write_report(out, tok, scores, args["n_buckets"], subtitle=sub)
        record.update({k: summary[k] for k in ("nll_base", "nll_thought", "gain", "tokens")})
        return ({"html": summary["html"], "png": summary["png"], "buckets": summary["buckets"]},
                out.with_suffix(".json"))
    summary = nll.summarize(scores, args["n_buckets"])
    npz = Path(args["npz"] or out.with_suffix(".npz"))
    nll.save_npz(npz, scores, args["n_buckets"])
    record.update({k: summary[k] for k in ("nll_base", "nll_thought", "gain", "ppl_base", "ppl_thought", "tokens",
                                           "frac_improved", "gain_ci95_record_bootstrap", "records_improved_share")})
    detail = {"buckets": summary["buckets"], "entropy_buckets": summary["entropy_buckets"],
              "record_gain": summary["record_gain"], "record_tokens": summary["record_tokens"],
              "mix_weight_mean": summary["mix_weight_mean"], "npz": str(npz),
              "seq_len": args["seq_len"], "lines": [ln for ln, _ in data]}
    if args["report"]:  # the per-token page from the same scores, first report_records records
        sub = f"{desc}; {path} lines {data[0][0]}..{data[-1][0]}, first {args['seq_len']} tokens"
        info = write_report(args["report"], tok, scores, args["n_buckets"], subtitle=sub,
                            max_records=args["report_records"])
        detail.update(report_html=info["html"], report_png=info["png"])
    return detail, out


def write_record(task: str, record: dict, out: Path) -> None:
    headline = {k: v for k, v in record.items() if k in ("soft_acc_base", "soft_acc_thought", "em", "nll_base",
                                                         "nll_thought", "gain", "n", "tokens", "seconds")}
    try:
        common.write_json(out, record)
    except OSError as e:  # the results are printed whole, so the work is not lost
        print(json.dumps(record, indent=1, default=jsonable))
        raise UserError(f"out={out}: cannot write the results ({e.strerror or e}); they are printed above") from e
    print(f"{task}: {headline} -> {out}")


def check_outputs(task: str, out: Path, args: dict) -> None:
    """Every file this task will write can be written (a UserError naming the argument otherwise)."""
    check_writable(out.with_suffix(".json") if task == "report" else out, "out")
    if task == "report":
        check_writable(out, "out")
    if task == "nll":
        check_writable(Path(args["npz"] or out.with_suffix(".npz")), "npz")
        if args["report"]:
            check_writable(Path(args["report"]), "report")


if __name__ == "__main__":
    run_main(main)
