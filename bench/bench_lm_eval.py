"""The lm_eval backend against lm_eval's `hf` backend on the same CPU, and local tasks through lm_eval (not a
pytest test; run by hand).

    python bench/bench_lm_eval.py [part=speed|csqa|all] [items=40] [reps=3] [batch_size=8] [csqa_items=500]
                                  [out=bench/results/lm_eval_cpu.json]
                                  [csqa_out=bench/results/lm_eval_csqa_smollm2_base_cpu.json]
    python bench/bench_lm_eval.py part=task task=gsm8k_local|commonsense_qa_local limit=N [ckpt=RUN] think=true|false
                                  [batch_size=8] [model_name=TEXT] task_out=bench/results/...json

speed: the loglikelihood requests of the first `items` questions of the local CommonsenseQA task
(commonsense_qa_local, five per question), scored by `quietstar` with think=false and by `hf` on the same
SmolLM2-135M-Instruct exported with quietstar.export (fp32, batch_size each), interleaved `reps` times, the
median requests/s kept; and the largest per-request difference between the two.
csqa: lm_eval.simple_evaluate of commonsense_qa_local on the first `csqa_items` questions with the base model
(think=false: its talk head is zero, so thinking would give the same numbers); lm_eval's own output (without
the samples) is kept in the record.
task: lm_eval.simple_evaluate of one local task on its first `limit` items with a checkpoint (or the base model
without ckpt=), think=true or false; lm_eval's own output is kept, and for generation tasks each item's
response, extracted answer, target answer and score (the prompts, being the 5-shot context, are left out); for
multiple choice, how often each choice was taken and how often it is the answer.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quietstar.cli import AT_LEAST_1, one_of, parse_kv  # noqa: E402
from quietstar.provenance import write_record  # noqa: E402


def export_base(root: Path) -> Path:
    """SmolLM2-135M as a fresh QuietStar, saved as a training checkpoint and exported as an HF dir."""
    from quietstar.config import OptimConfig
    from quietstar.checkpoint import save_checkpoint
    from quietstar.export import export
    from quietstar.loading import load_pretrained
    from quietstar.optim import build_optimizer
    from quietstar.methods.quietstar.thinker import QuietStar
    from quietstar.methods.quietstar.config import ThoughtConfig

    base, tok = load_pretrained("smollm2-135m", dtype=torch.float32)
    qs = QuietStar(base, tok, ThoughtConfig())
    opt, sched = build_optimizer(qs, OptimConfig(), max_steps=1)
    yaml = "thought:\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in vars(qs.cfg).items())
    step = save_checkpoint(root / "checkpoints", 1, qs, opt, sched, data_state={}, generator=None, config_yaml=yaml,
                           tokenizer=tok, save_optimizer=False)
    return export(step, root / "hf")


def csqa_requests(items: int):
    from lm_eval.tasks import TaskManager, get_task_dict

    from quietstar.lm_eval import TASKS_DIR

    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    task = get_task_dict(["commonsense_qa_local"], tm)["commonsense_qa_local"]
    task.build_all_requests(limit=items, rank=0, world_size=1)
    return task.instances


def speed(args: dict, root: Path) -> dict:
    from lm_eval.models.huggingface import HFLM

    from quietstar.lm_eval import QuietStarLM

    hf_dir = export_base(root)
    reqs = csqa_requests(args["items"])
    ours = QuietStarLM(model="smollm2-135m", think=False, batch_size=args["batch_size"])
    hf = HFLM(pretrained=str(hf_dir), device="cpu", batch_size=args["batch_size"], dtype="float32")
    backends = {"quietstar": ours, "hf": hf}
    rates, scores = {k: [] for k in backends}, {}
    for _ in range(args["reps"]):  # interleaved: other load on the machine hits both alike
        for name, lm in backends.items():
            t0 = time.perf_counter()
            scores[name] = lm.loglikelihood(reqs, disable_tqdm=True)
            rates[name].append(len(reqs) / (time.perf_counter() - t0))
    diff = max(abs(a - b) for (a, _), (b, _) in zip(scores["quietstar"], scores["hf"]))
    greedy_same = sum(a[1] == b[1] for a, b in zip(scores["quietstar"], scores["hf"]))
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"requests": len(reqs), "questions": args["items"], "batch_size": args["batch_size"],
            "requests_per_s": med, "requests_per_s_runs": rates, "speedup_vs_hf": med["quietstar"] / med["hf"],
            "max_abs_logprob_diff_nats": diff, "is_greedy_agree": f"{greedy_same}/{len(reqs)}"}


def csqa(args: dict) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from quietstar.lm_eval import TASKS_DIR, QuietStarLM

    lm = QuietStarLM(model="smollm2-135m", think=False, batch_size=args["batch_size"])
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=["commonsense_qa_local"], limit=args["csqa_items"],
                                  task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False))
    seconds = time.perf_counter() - t0
    out.pop("samples", None)
    res = out["results"]["commonsense_qa_local"]
    return {"task": "commonsense_qa_local", "questions": args["csqa_items"], "model": "smollm2-135m base (think=false)",
            "acc": res["acc,none"], "acc_stderr": res["acc_stderr,none"], "seconds": seconds,
            "lm_eval_output": json.loads(json.dumps(out, default=str))}


def task(args: dict) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from quietstar.lm_eval import TASKS_DIR, QuietStarLM

    kw = {"ckpt": args["ckpt"]} if args["ckpt"] else {"model": "smollm2-135m"}
    lm = QuietStarLM(**kw, think=args["think"], batch_size=args["batch_size"], seed=args["seed"])
    name = args["task"]
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=[name], limit=args["limit"], log_samples=True,
                                  task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False))
    seconds = time.perf_counter() - t0
    samples = out.pop("samples")[name]
    res = {k: v for k, v in out["results"][name].items() if k != "alias"}
    rec = {"task": name, "items": args["limit"], "model": args["model_name"] or args["ckpt"] or "smollm2-135m base",
           "checkpoint": args["ckpt"], "think": args["think"], "batch_size": args["batch_size"], "scores": res,
           "seconds": seconds}
    if samples and isinstance(samples[0]["resps"][0][0], str):  # generate_until: one sample per item and filter
        items: dict = {}
        for smp in samples:
            it = items.setdefault(smp["doc_id"], {"doc_id": smp["doc_id"], "response": smp["resps"][0][0],
                                                  "target": str(smp["target"]).split("#### ")[-1]})
            got = smp["filtered_resps"][0]
            it[smp.get("filter", "none")] = {"extracted": got[0] if isinstance(got, list) else got,
                                            "exact_match": smp.get("exact_match")}
        rec["items_scored"] = [items[k] for k in sorted(items)]
    elif samples and "choices" in samples[0]["doc"]:  # multiple choice: which choice each item took
        picks = [max(range(len(smp["resps"])), key=lambda i: float(smp["resps"][i][0][0])) for smp in samples]
        labels = samples[0]["doc"]["choices"].get("label") or [str(i) for i in range(len(samples[0]["resps"]))]
        rec["chosen"] = {lab: sum(p == i for p in picks) for i, lab in enumerate(labels)}
        rec["targets"] = {lab: sum(str(smp["target"]) in (lab, str(i)) for smp in samples)
                          for i, lab in enumerate(labels)}
    rec["lm_eval_output"] = json.loads(json.dumps(out, default=str))
    return rec


def main(argv=None):
    args = parse_kv(sys.argv[1:] if argv is None else argv, dict(
        part="all", items=40, reps=3, batch_size=8, csqa_items=500, out="bench/results/lm_eval_cpu.json",
        csqa_out="bench/results/lm_eval_csqa_smollm2_base_cpu.json", task="gsm8k_local", limit=200, ckpt="",
        think=True, seed=1234, model_name="", task_out=""),
        {"part": one_of("speed", "csqa", "all", "task"), "items": AT_LEAST_1, "reps": AT_LEAST_1,
         "batch_size": AT_LEAST_1, "csqa_items": AT_LEAST_1, "limit": AT_LEAST_1})
    if args["part"] == "task":
        if not args["task_out"]:
            raise SystemExit("bench_lm_eval.py: part=task needs task_out=PATH")
        rec = task(args)
        think = "think=true" if args["think"] else "think=false"
        rec = {"what": f"lm_eval {args['task']} on the first {args['limit']} items of its local file, {rec['model']} "
                       f"through the quietstar backend, {think}, fp32 CPU, {torch.get_num_threads()} threads", **rec}
        write_record(args["task_out"], rec, seeds=[args["seed"]])
        print(json.dumps(rec["scores"], indent=1))
        return
    if args["part"] in ("speed", "all"):
        with tempfile.TemporaryDirectory() as tmp:
            rec = speed(args, Path(tmp))
        rec = {"what": "lm_eval loglikelihood requests of local CommonsenseQA: the quietstar backend (think=false) "
                       "against lm_eval's hf backend on the same SmolLM2-135M-Instruct exported by quietstar.export, "
                       f"fp32 CPU, {torch.get_num_threads()} threads, median of interleaved runs", **rec}
        write_record(args["out"], rec, seeds=[1234])
        print(json.dumps({k: v for k, v in rec.items() if k != "requests_per_s_runs"}, indent=1))
    if args["part"] in ("csqa", "all"):
        rec = csqa(args)
        rec = {"what": f"lm_eval commonsense_qa_local (lm_eval's commonsense_qa prompt and metric) on the first "
                       f"{args['csqa_items']} questions of ../shared/data/commonsenseqa/dev_rand_split.jsonl, "
                       "SmolLM2-135M-Instruct base model through the quietstar backend, think=false, fp32 CPU", **rec}
        write_record(args["csqa_out"], rec, seeds=[1234])
        print(json.dumps({k: v for k, v in rec.items() if k != "lm_eval_output"}, indent=1))


if __name__ == "__main__":
    main()
