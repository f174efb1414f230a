"""Distil a learn_to_think teacher into the plain model, and score what carried over:
`python train.py experiment=distill_reasoning distill.teacher=<learn_to_think run>/quietstar`.

Stages, in the run dir:

  student/   an ordinary training run with distill.teacher set (quietstar/methods/distill/distill.py): the teacher's base
             model, without thoughts, trained towards the teacher's mixed prediction. Its model, data and
             seed are the teacher's (the same architecture to start from its weights; the same corpus and
             held-out split, so no evaluation map was ever in the student's training data either); the
             optimizer, steps and distill.* settings are this run's.

Then the held-out split's direct answers are scored as in learn_to_think (report.py, reasoning.score_answers):
`results.json` holds answer NLL / accuracy by hops for `base` (distill.base, by default the checkpoint the
teacher's run started from: its pretrain stage), `teacher` (after one sampled thought, with the same
evaluation seed as learn_to_think), `teacher_no_thought` (the teacher's own base prediction, where the
student starts) and `student`, and `gain_kept` = (base - student) / (base - teacher) for each. The student
runs at the base model's inference cost: one forward per token, no thought.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from quietstar.errors import UserError
from quietstar.provenance import write_record


def student_stage_config(cfg, teacher_ckpt: Path, output_dir: Path):
    """The student's TrainConfig: model, data and seed from the teacher's run; optimizer, steps and the
    distillation settings from this run."""
    from quietstar.checkpoint import read_train_config

    t = read_train_config(teacher_ckpt, type(cfg))
    return dataclasses.replace(cfg, recipe=None, resume=None, output_dir=str(output_dir), model=t.model, data=t.data,
                               train=dataclasses.replace(cfg.train, seed=t.train.seed),
                               thought=dataclasses.replace(t.thought, enabled=False))


def _student(cfg, train_fn, teacher_ckpt: Path, root: Path, log: list) -> Path:
    """Train the student stage, or reuse a finished one with the same settings."""
    from quietstar.methods.quietstar.learn_to_think import run_stage

    stage = student_stage_config(cfg, teacher_ckpt, root / "student")
    if stage.data.source != "reasoning":
        raise UserError(f"distill.teacher={cfg.distill.teacher!r}: its run trained on data.source="
                        f"{stage.data.source!r}; experiment=distill_reasoning scores the reasoning corpus's "
                        "held-out split (use train.py distill.teacher=... for other data)")
    return run_stage(stage, train_fn, log, "distill_reasoning", ("train/", "distill/"))


def gain_kept(base: dict, teacher: dict, student: dict) -> dict:
    """(base - student) / (base - teacher) per difficulty: the share of the teacher's gain over the base that
    the student keeps (1 = all of it, 0 = none, < 0 = worse than the base). NLL and accuracy alike (a gain in
    accuracy is negative in base - x, and the ratio is the same)."""
    return {k: (base[k] - student[k]) / (base[k] - teacher[k]) if base[k] != teacher[k] else None for k in base}


def evaluate(cfg, teacher_ckpt: Path, base_ckpt: Path, student_ckpt: Path) -> dict:
    from quietstar.checkpoint import read_train_config
    from quietstar.methods.quietstar.load import load_thinker_checkpoint
    from quietstar.reasoning import chain_open_ids, score_answers, train_and_eval_documents
    from quietstar.methods.quietstar.report import EVAL_SEED_OFFSET, recipe_device

    t = read_train_config(teacher_ckpt, type(cfg))
    _, docs = train_and_eval_documents(t.data.reasoning, t.data.max_docs or t.data.synthetic_docs, t.train.seed)
    dev, seed, bs = recipe_device(cfg), t.train.seed + EVAL_SEED_OFFSET, t.learn_to_think.eval_batch_size

    def score(path, thoughts: bool):
        qs = load_thinker_checkpoint(path, device=dev)
        return score_answers(qs, docs, qs.tokenizer, bs, seed, thoughts, 0, dev,
                             without=chain_open_ids(t.data.reasoning, qs.tokenizer))

    teacher, base, student = score(teacher_ckpt, True), score(base_ckpt, False), score(student_ckpt, False)
    preds = {"base": base["no_thought"], "teacher": teacher["thought"], "teacher_no_thought": teacher["no_thought"],
             "student": student["no_thought"]}
    out = {metric: {name: p[metric] for name, p in preds.items()} for metric in ("nll", "acc", "nll_raw")}
    results = {"answer_nll": out["nll"], "answer_acc": out["acc"], "answer_nll_raw": out["nll_raw"],
               "gain_kept": {m: gain_kept(out[m]["base"], out[m]["teacher"], out[m]["student"])
                             for m in ("nll", "acc")},
               "answer_count": teacher["thought"]["count"]}
    results["eval"] = {"docs": len(docs), "split": "held-out (maps never seen in training)", "seed": seed,
                       "teacher": str(teacher_ckpt), "base": str(base_ckpt), "student": str(student_ckpt),
                       "scored": "direct answers; the answer given that no chain follows (as learn_to_think)"}
    return results


def run(cfg, train_fn):
    """Student stage, then the held-out evaluation. -> a TrainResult-like summary; results.json in the run dir."""
    from quietstar.checkpoint import find_checkpoint, read_train_config
    from quietstar.methods.distill.distill import teacher_checkpoint

    if not cfg.distill.teacher:
        raise UserError("experiment=distill_reasoning needs distill.teacher=<a thinking checkpoint or run dir>")
    teacher_ckpt = teacher_checkpoint(cfg.distill.teacher)  # a missing or non-thinking one fails here, before any work
    base = cfg.distill.base or read_train_config(teacher_ckpt, type(cfg)).init_from
    if not base:
        raise UserError(f"distill.base: the teacher's run ({teacher_ckpt}) started from no checkpoint; name the "
                        "no-thought reference model with distill.base=<checkpoint>")
    try:
        base_ckpt = find_checkpoint(base)
    except UserError as e:
        raise UserError(f"distill.base={base!r}: {e}") from e
    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    stages: list = []
    student_ckpt = _student(cfg, train_fn, teacher_ckpt, root, stages)
    results = evaluate(cfg, teacher_ckpt, base_ckpt, student_ckpt)
    results["stages"] = stages
    results["distill"] = {"objective": cfg.distill.objective, "nll_weight": cfg.distill.nll_weight,
                          "teacher_thoughts": cfg.distill.teacher_thoughts, "steps": cfg.train.max_steps,
                          "lr": cfg.optim.lr}
    write_record(root / "results.json", results, seeds=[read_train_config(teacher_ckpt, type(cfg)).train.seed])
    print_results(results, root)
    return _Summary(root, student_ckpt)


class _Summary:
    def __init__(self, output_dir: Path, checkpoint: Path):
        self.output_dir, self.checkpoint, self.status = output_dir, checkpoint, "done"


def print_results(results: dict, root: Path) -> None:
    nll, acc, kept = results["answer_nll"], results["answer_acc"], results["gain_kept"]
    keys = [k for k in nll["base"] if k != "all"] + ["all"]
    pct = lambda x: "   -" if x is None else f"{100 * x:4.0f}%"  # noqa: E731
    print(f"\n[distill] held-out direct answers ({results['eval']['docs']} documents):")
    print(f"  {'hops':>5}  {'NLL base':>8} {'teacher':>8} {'student':>8} {'kept':>5}   {'acc base':>8} {'teacher':>8} "
          f"{'student':>8} {'kept':>5}")
    for k in keys:
        print(f"  {k:>5}  {nll['base'][k]:8.4f} {nll['teacher'][k]:8.4f} {nll['student'][k]:8.4f} "
              f"{pct(kept['nll'][k])}   {acc['base'][k]:8.3f} {acc['teacher'][k]:8.3f} {acc['student'][k]:8.3f} "
              f"{pct(kept['acc'][k])}")
    print(f"  results: {root / 'results.json'}")


def summarise(result_files: list) -> dict:
    """Median over seeds of every answer NLL / accuracy; the share of the gain kept from those medians, and
    per run."""
    from quietstar.methods.quietstar.learn_to_think import median_over_seeds

    out = median_over_seeds(result_files)
    runs = [json.loads(Path(f).read_text()) for f in result_files]
    out["gain_kept"] = {m: gain_kept(out[f"answer_{m}"]["base"], out[f"answer_{m}"]["teacher"],
                                     out[f"answer_{m}"]["student"]) for m in ("nll", "acc")}
    out["gain_kept_per_run"] = [r["gain_kept"] for r in runs]
    out["stages_per_run"] = [r.get("stages") for r in runs]
    return out


if __name__ == "__main__":  # python -m quietstar.methods.distill.recipe RUN_DIR [RUN_DIR ...] [--out FILE]
    from quietstar.methods.quietstar.report import summarise_seeds_main

    summarise_seeds_main("distill_reasoning", summarise)
