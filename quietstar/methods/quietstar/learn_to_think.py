"""Does Quiet-STaR learn to think? One command: `python train.py experiment=learn_to_think`.

Stages, each an ordinary training run in a subfolder of the run dir (its own config.yaml, metrics.jsonl,
checkpoints, curves.png):

  pretrain/   a random-init model trained as a plain LM on the reasoning corpus (quietstar/reasoning.py),
              until it has learned one lookup per token (the worked chains) but not the direct answers
  quietstar/  Quiet-STaR from that checkpoint, with the run's `thought` and `optim` settings
  baseline/   the matched no-thought baseline: the same checkpoint, the same data source and optimizer,
              trained on as a plain LM for the same model FLOPs as the Quiet-STaR stage
              (quietstar/flops.py: the matmuls each step must compute; so the baseline takes more steps)
  policy_off/ with learn_to_think.policy_off: the Quiet-STaR stage again with thought.policy_weight=0, the
              ablation that shows what the policy term itself did

Then the held-out split (maps never seen in training) is scored on its direct answers only:
`results.json` holds answer NLL and top-1 accuracy for `thought` (the talk-head-mixed prediction after one
sampled thought), `no_thought` (the same model's base prediction) and `baseline`, overall and by hops, with
decoded thoughts before and after Quiet-STaR, and `chain_share` (on the lookup corpus): the share of the thoughts
before the hardest answers that write the query's chain, before and after; `learning_curves.png` shows the
training curves of both runs against the shared compute axis. With `checkpoint.every`, `over_training` (and
`over_training.png`) holds the hardest answers' chain share and NLL with and without a thought at every saved
step of the thought stages. A stage whose final checkpoint exists is not run again, so the same
command continues an interrupted recipe. With `learn_to_think.workers=2` the stages after pretraining train in
two processes side by side (each stage's result is the same as one after another).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from quietstar.checkpoint import read_train_config
from quietstar.errors import UserError
from quietstar.flops import step_flops
from quietstar.provenance import write_record


@dataclass
class LearnToThinkConfig:
    """The recipe's own settings (the Quiet-STaR stage uses the run's `thought`, `optim` and `train`)."""

    pretrain_steps: int = 2000  # plain-LM steps from random init
    pretrain_lr: float = 2e-3  # peak LR of pretraining (cosine to 0.1x, after pretrain_warmup steps)
    pretrain_warmup: int = 100
    baseline_compute: str = "flops"
    """flops: the baseline trains for the Quiet-STaR stage's model FLOPs (more, cheaper steps);
    steps: the same number of steps (the same tokens of text, far less compute)."""
    eval_batch_size: int = 32
    n_examples: int = 6  # decoded thoughts before a hardest-level answer, before and after training
    policy_off: bool = False
    """Also run the Quiet-STaR stage with thought.policy_weight=0 from the same checkpoint (`policy_off/`) and
    score it: results.json's `policy_off` holds its answer_nll / answer_acc / chain_share."""
    workers: int = 1
    """Processes that train the stages after pretraining (quietstar, policy_off, baseline: independent, each
    from the pretrained checkpoint) side by side; 1: one after another in this process. Each stage gives the
    same result either way (its own seed and threads); a worker without train.threads gets cpu_count / workers."""

    def __post_init__(self):
        if self.pretrain_steps < 1 or self.pretrain_warmup < 0 or not self.pretrain_lr > 0:
            raise ValueError("learn_to_think: pretrain_steps must be >= 1, pretrain_warmup >= 0, pretrain_lr > 0")
        if self.workers < 1:
            raise ValueError(f"learn_to_think.workers must be >= 1, got {self.workers}")
        if self.baseline_compute not in ("flops", "steps"):
            raise ValueError(f"learn_to_think.baseline_compute must be flops or steps, got {self.baseline_compute!r}")


# --------------------------------------------------------------------------------------------------
# stage configs


def _stage(cfg, name: str, **changes):
    """The TrainConfig of one stage: the run's config with `changes`, writing to <run dir>/<name>."""
    out = dataclasses.replace(cfg, recipe=None, resume=None, output_dir=str(Path(cfg.output_dir) / name), **changes)
    if cfg.logger.backend == "wandb":  # one wandb run per stage, grouped under the recipe's run
        group = cfg.logger.group or Path(cfg.output_dir).name
        out.logger = dataclasses.replace(cfg.logger, group=group, run_name=f"{group}-{name}")
    return out


def _plain(cfg):
    return dataclasses.replace(cfg.thought, enabled=False)


def pretrain_config(cfg):
    r = cfg.learn_to_think
    optim = dataclasses.replace(cfg.optim, lr=r.pretrain_lr, warmup_steps=r.pretrain_warmup, schedule="cosine",
                                base_lr_mult=1.0)
    train = dataclasses.replace(cfg.train, max_steps=r.pretrain_steps)
    return _stage(cfg, "pretrain", thought=_plain(cfg), optim=optim, train=train, init_from=cfg.init_from)


def micro_step_flops(cfg, plain: bool) -> float:
    """Model FLOPs of one micro-batch of this config, as a plain LM or as Quiet-STaR."""
    t = cfg.thought
    q = 1.0 if t.where == "all" else t.think_fraction
    return step_flops(cfg.model.architecture(), "plain" if plain else "grid", cfg.data.batch_size,
                      cfg.data.seq_len, t.n_ahead, t.n_ahead_talk, t.n_thoughts, q)


def baseline_steps(cfg) -> int:
    """Optimizer steps of the baseline: the Quiet-STaR stage's FLOPs (or steps) as a plain LM."""
    if cfg.learn_to_think.baseline_compute == "steps":
        return cfg.train.max_steps
    ratio = micro_step_flops(cfg, plain=False) / micro_step_flops(cfg, plain=True)
    return max(1, round(cfg.train.max_steps * ratio))


# --------------------------------------------------------------------------------------------------
# the recipe


def _final_checkpoint(stage_cfg) -> Optional[Path]:
    """The stage's checkpoint at its last step, if a previous launch already finished the stage."""
    final = Path(stage_cfg.output_dir) / "checkpoints" / f"step_{stage_cfg.train.max_steps:07d}"
    return final if (final / "manifest.json").is_file() else None


def changed_fields(saved, now) -> list:
    """The settings that decide a stage's result (model, data, thought, optim, distill, steps, seed, start)
    on which two TrainConfigs differ, as dotted names (the thought settings only where one of them thinks)."""
    out = []
    plain = not saved.thought.enabled and not now.thought.enabled  # a plain LM reads no thought setting
    unread = {"grad_checkpointing"}  # recomputing changes no result
    if saved.thought.policy_weight == 0 and now.thought.policy_weight == 0 and _same_nll(saved.thought, now.thought):
        unread |= POLICY_ONLY  # a run without the policy term reads no setting that only shapes it
    for section in ("model", "data", "optim", "distill") if plain else ("model", "data", "thought", "optim", "distill"):
        a, b = dataclasses.asdict(getattr(saved, section)), dataclasses.asdict(getattr(now, section))
        out += [f"{section}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k not in unread]
    for key in ("max_steps", "seed"):
        if getattr(saved.train, key) != getattr(now.train, key):
            out.append(f"train.{key}")
    if _within_recipe(saved) != _within_recipe(now):
        out.append("init_from")
    return out


POLICY_ONLY = {"objective", "reward_from", "reward_floor", "clamp_negative_advantage", "policy_temperature",
               "policy_mean_over_padding", "reward_drop_last_position", "ema_decay"}
"""Thought settings that reach the weights only through the policy term (with policy_weight=0 a run's updates
are the same whatever they are; the objective too where its NLL weights and scope are the same)."""


def _same_nll(a, b) -> bool:
    from quietstar.methods.quietstar.objective import get_objective

    x, y = get_objective(a.objective), get_objective(b.objective)
    return x.nll_coefficients is y.nll_coefficients and x.scope is y.scope


def _within_recipe(cfg) -> Optional[str]:
    """The stage's starting checkpoint, relative to the recipe's run dir when inside it (a run dir that was
    moved or copied is still the same recipe)."""
    if cfg.init_from is None:
        return None
    root = Path(cfg.output_dir).resolve().parent
    try:
        return str(Path(cfg.init_from).resolve().relative_to(root))
    except ValueError:
        return str(Path(cfg.init_from).resolve())


def run_stage(stage_cfg, train_fn, log: list, recipe: str = "learn_to_think",
              metrics: tuple = ("train/", "thought/")) -> Path:
    """Train one stage of a recipe, or reuse its finished checkpoint when it was run with the same settings
    (another is refused, naming the fields); appends the stage's record (with its final `metrics`) to `log`."""
    done = _final_checkpoint(stage_cfg)
    name = Path(stage_cfg.output_dir).name
    if done is not None:
        changed = changed_fields(read_train_config(done, type(stage_cfg)), stage_cfg)
        if changed:
            raise UserError(f"{recipe}: {stage_cfg.output_dir} holds a finished {name} stage run with other "
                            f"settings ({', '.join(changed[:6])}{', ...' if len(changed) > 6 else ''}); give the "
                            f"recipe a new hydra.run.dir, or remove that stage dir to run it again")
        print(f"[{recipe}] {name}: already done ({done})", flush=True)
        log.append({"stage": name, "steps": stage_cfg.train.max_steps, "wall_s": None, "reused": str(done)})
        return done
    print(f"[{recipe}] {name}: {stage_cfg.train.max_steps} steps -> {stage_cfg.output_dir}", flush=True)
    t0 = time.time()
    result = train_fn(stage_cfg)
    if result.status != "done" or result.checkpoint is None:
        raise RuntimeError(f"{recipe}: stage {name} ended {result.status!r} at step {result.step} "
                           f"({stage_cfg.output_dir}); see its metrics.jsonl")
    log.append({"stage": name, "steps": result.step, "wall_s": round(time.time() - t0, 1),
                "final_metrics": {k: v for k, v in result.metrics.items() if k.startswith(metrics)}})
    return result.checkpoint


def _stage_in_worker(stage_cfg, train_fn, threads: Optional[int] = None) -> tuple:
    """run_stage with its own log (in a worker process: with `threads` torch threads where the stage sets none)."""
    if threads and not stage_cfg.train.threads:
        import torch

        torch.set_num_threads(threads)
    log: list = []
    return run_stage(stage_cfg, train_fn, log), log


def run_stages(stage_cfgs: list, train_fn, log: list, workers: int = 1) -> list:
    """run_stage for each config, in order, or with workers > 1 in that many spawned processes (train_fn must
    then be a module-level function); the first stages start first. -> their checkpoints, in order; `log`
    gets their records in the same order."""
    to_train = [c for c in stage_cfgs if _final_checkpoint(c) is None]  # finished stages are reused here
    if workers <= 1 or len(to_train) <= 1:
        return [run_stage(c, train_fn, log) for c in stage_cfgs]
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    n = min(workers, len(to_train))
    threads = max(1, (os.cpu_count() or 1) // n)
    print(f"[learn_to_think] {', '.join(Path(c.output_dir).name for c in to_train)}: {n} processes side by side",
          flush=True)
    with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {id(c): pool.submit(_stage_in_worker, c, train_fn, threads) for c in to_train}
        done = [futures[id(c)].result() if id(c) in futures else _stage_in_worker(c, train_fn) for c in stage_cfgs]
    for _, records in done:
        log.extend(records)
    return [ckpt for ckpt, _ in done]


def run(cfg, train_fn):
    """Pretrain, Quiet-STaR, matched baseline, held-out evaluation. -> the Quiet-STaR stage's TrainResult-like
    summary (status "done"); results.json and learning_curves.png in the run dir."""
    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    if cfg.data.source != "reasoning":
        raise ValueError(f"learn_to_think needs data=reasoning (its held-out split is scored), got "
                         f"data.source={cfg.data.source!r}")
    if cfg.thought.curriculum:
        raise UserError("learn_to_think: thought.curriculum is not supported here (the baseline's FLOPs are "
                        "matched to fixed thought lengths); set thought.n_ahead / n_ahead_talk instead")
    stages: list = []
    pre = run_stage(pretrain_config(cfg), train_fn, stages)
    qs_cfg = _stage(cfg, "quietstar", init_from=str(pre))
    bl_cfg = _stage(cfg, "baseline", init_from=str(pre), thought=_plain(cfg),
                    train=dataclasses.replace(cfg.train, max_steps=baseline_steps(cfg)))
    todo = [qs_cfg, bl_cfg]
    if cfg.learn_to_think.policy_off:
        todo.append(_stage(cfg, "policy_off", init_from=str(pre),
                           thought=dataclasses.replace(cfg.thought, policy_weight=0.0)))
    qs_ckpt, bl_ckpt, *rest = run_stages(todo, train_fn, stages, cfg.learn_to_think.workers)
    off_ckpt = rest[0] if rest else None

    from quietstar.methods.quietstar.report import evaluate, evaluate_ablation, over_training
    from quietstar.plots import plot_learning_curves, plot_over_training, read_metrics

    results = evaluate(cfg, pre, qs_ckpt, bl_ckpt)
    if off_ckpt is not None:
        results["policy_off"] = evaluate_ablation(cfg, off_ckpt, results)
    if cfg.checkpoint.every:  # every saved step of the thought stages, from the pretrained starting point
        results["over_training"] = {name: over_training(cfg, root / name)
                                    for name in ("quietstar", "policy_off") if (root / name).is_dir()}
        results["over_training"]["start"] = start_point(results)
    results["stages"] = stages
    results["compute"] = {
        "counted": "model FLOPs (quietstar/flops.py: matmuls a step must compute, backward = 2x forward)",
        "quietstar_flops": micro_step_flops(cfg, False) * cfg.train.max_steps * cfg.optim.grad_accum,
        "baseline_flops": micro_step_flops(cfg, True) * bl_cfg.train.max_steps * cfg.optim.grad_accum,
        "quietstar_steps": cfg.train.max_steps, "baseline_steps": bl_cfg.train.max_steps,
        "baseline_compute": cfg.learn_to_think.baseline_compute}
    write_record(root / "results.json", results, seeds=[cfg.train.seed])
    plot_learning_curves(read_metrics(root / "quietstar" / "metrics.jsonl"),
                         read_metrics(root / "baseline" / "metrics.jsonl"), results["answer_nll"],
                         root / "learning_curves.png",
                         title="learn_to_think: Quiet-STaR vs a plain-LM baseline with the same FLOPs")
    if "over_training" in results:
        curves = {k: v for k, v in results["over_training"].items() if k != "start"}
        plot_over_training(curves, results["over_training"]["start"], root / "over_training.png",
                           title="learn_to_think: the hardest answers over training")
    print_results(results, root)
    return _Summary(root, qs_ckpt)


def start_point(results: dict) -> dict:
    """The pretrained model's point of the over-training curves (step 0), from the held-out scores."""
    nll, acc = results["answer_nll"], results["answer_acc"]
    top = max((k for k in nll["pretrained"] if k != "all"), key=int)
    point = {"step": 0, "hops": top, "nll_thought": nll["pretrained_thought"][top],
             "nll_no_thought": nll["pretrained"][top], "acc_thought": acc["pretrained_thought"][top],
             "acc_no_thought": acc["pretrained"][top]}
    if "chain_share" in results:
        point["chain_share"] = results["chain_share"]["before"]
        point["chain_like_share"] = results["chain_like_share"]["before"]
    return point


@dataclass
class _Summary:
    output_dir: Path
    checkpoint: Path
    status: str = "done"


def print_results(results: dict, root: Path) -> None:
    nll, acc = results["answer_nll"], results["answer_acc"]
    keys = [k for k in nll["thought"] if k != "all"] + ["all"]
    print(f"\n[learn_to_think] held-out direct answers ({results['eval']['docs']} documents, maps never seen in "
          f"training):")
    print(f"  {'hops':>5}  {'NLL thought':>11} {'no thought':>10} {'baseline':>9}   {'acc thought':>11} "
          f"{'no thought':>10} {'baseline':>9}")
    for k in keys:
        print(f"  {k:>5}  {nll['thought'][k]:11.4f} {nll['no_thought'][k]:10.4f} {nll['baseline'][k]:9.4f}   "
              f"{acc['thought'][k]:11.3f} {acc['no_thought'][k]:10.3f} {acc['baseline'][k]:9.3f}")
    if "chain_share" in results:
        cs = results["chain_share"]
        line = f"  chain share of the thoughts before {keys[-2]}-hop answers: {cs['before']:.3f} -> {cs['after']:.3f}"
        if "policy_off" in results:
            off = results["policy_off"]
            line += (f" (policy_weight=0: {off['chain_share']['after']:.3f}; its {keys[-2]}-hop accuracy with a "
                     f"thought {off['answer_acc']['thought'][keys[-2]]:.3f})")
        print(line)
    for when in ("before", "after"):
        for ex in results["examples"][when][:3]:
            print(f"  thought {when:>6}: ...{ex['context']!r} <{ex['thought']}> -> {ex['answer']!r} "
                  f"(w {ex['mix_weight']:+.3f})")
    print(f"  results: {root / 'results.json'}\n  curves:  {root / 'learning_curves.png'}")


def median_over_seeds(result_files: list) -> dict:
    """Median, over several runs' results.json, of every answer_nll / answer_acc entry."""
    runs = [json.loads(Path(f).read_text()) for f in result_files]
    out: dict = {"runs": [str(f) for f in result_files]}
    out.update(_medians(runs))
    if all("policy_off" in r for r in runs):
        out["policy_off"] = _medians([r["policy_off"] for r in runs])
    keys = ("answer_acc", "answer_nll", "chain_share", "chain_like_share")
    out["per_run"] = [{k: r[k] for k in keys if k in r} |
                      ({"policy_off": {k: r["policy_off"][k] for k in keys if k in r["policy_off"]}}
                       if "policy_off" in r else {})
                      for r in runs]
    return out


def _medians(runs: list) -> dict:
    out: dict = {}
    for metric in ("answer_nll", "answer_acc", "answer_nll_raw"):
        if metric not in runs[0]:
            continue
        out[metric] = {}
        for model, by_diff in runs[0][metric].items():
            out[metric][model] = {k: _median([r[metric][model][k] for r in runs]) for k in by_diff}
    for key in ("chain_share", "chain_like_share"):
        if all(key in r for r in runs):
            out[key] = {k: _median([r[key][k] for r in runs]) for k, v in runs[0][key].items() if isinstance(v, (int, float))}
    return out


def _median(xs: list) -> float:
    xs = sorted(xs)
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else 0.5 * (xs[mid - 1] + xs[mid])




if __name__ == "__main__":  # python -m quietstar.methods.quietstar.learn_to_think RUN_DIR [RUN_DIR ...] [--out FILE]
    from quietstar.methods.quietstar.report import summarise_seeds_main

    summarise_seeds_main("learn_to_think", median_over_seeds)
