"""Quiet-STaR training: the main job.

    python train.py                                   # SmolLM2-135M on the embedded synthetic math corpus
    python train.py model=tiny train.max_steps=5      # the tiny random model (seconds)
    python train.py data=jsonl data.path=../shared/data/math_web/train.jsonl thought.n_ahead=12
    python train.py -m thought.n_ahead=4,8            # a Hydra multirun sweep
    python train.py resume=outputs/<date>/<time>-<pid>  # continue a run from its newest checkpoint
    python train.py experiment=gpu                    # the preset for a real run on a GPU
    python train.py distill.teacher=<run dir>         # distil a thinking run into a plain model (distill.py)
    torchrun --nproc_per_node=2 train.py dist=ddp     # data parallel (dist=fsdp: sharded)

`python train.py` in a checkout and the `quietstar-train` command of an install both run `main()` below.
Hydra composes configs/train.yaml and the command line into a typed `TrainConfig` (quietstar/config.py);
`train(cfg)` below is plain Python and never imports Hydra, so tests and notebooks call it directly.
Everything a run writes goes to its output dir (Hydra's): config.yaml, metrics.jsonl, checkpoints/,
wandb/. Each step is: rollout of thoughts (no grad) + one learning pass over the thought grid
(quietstar/methods/quietstar/thinker.py), `optim.grad_accum` micro-batches per optimizer step. The step's metrics stay
0-dim tensors on the device and become numbers once per `train.log_every` steps; the only other host sync
per step is the finiteness check that decides whether the optimizer steps.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch

from quietstar import attention
from quietstar.checkpoint import (NonFiniteStateError, find_checkpoint, load_checkpoint, read_config_node,
                                  read_train_config, recover_checkpoints, save_checkpoint)
from quietstar.config import build_config, check_device_dtype, config_to_dict
from quietstar.data import Batch, build_stream
from quietstar.dist import DistInfo, no_sync, setup, teardown, wrap
from quietstar.elastic import choose_resume
from quietstar.errors import ConfigError, UserError
from quietstar.health import RunWatch
from quietstar.logging import Progress, start_run
from quietstar.model import Transformer
from quietstar.optim import autocast_context, build_optimizer, clip_grad_norm, maybe_compile, resolve_precision
from quietstar.rundir import RunLock, recover_run, set_aside_later
from quietstar.tokenizer import ByteTokenizer
from quietstar.methods.registry import TrainConfig, method_for, register_configs, run_recipe
from quietstar.methods.quietstar.thinker import QuietStar


@dataclass
class TrainResult:
    status: str  # "done" | "diverged"
    step: int  # optimizer steps completed
    losses: list = field(default_factory=list)  # the loss of each step run by this process
    metrics: dict = field(default_factory=dict)  # the last step's logged metrics
    output_dir: Optional[Path] = None
    checkpoint: Optional[Path] = None  # the newest checkpoint written
    sample: Optional[dict] = None  # a decoded thought from the last batch
    curves: Optional[Path] = None  # the learning-curve plot written at the end


def build_thinker(cfg: TrainConfig, device: torch.device):
    """(the run's model, tokenizer): the base model from pretrained weights (model.name) or a seeded random-init
    preset, wrapped by the run's method (methods.method_for: Quiet-STaR, the plain LM, a distilled student)."""
    spec = cfg.model
    dtype = getattr(torch, spec.dtype)
    torch.manual_seed(cfg.train.seed)  # the random init (preset, talk head) is a function of the seed
    if spec.name:
        from quietstar.loading import load_pretrained

        base, tok = load_pretrained(spec.name, dtype=dtype)
        if tok is None:
            raise ConfigError(f"model.name={spec.name!r}: no tokenizer found (an HF dir needs tokenizer.json)")
    else:
        base = Transformer(spec.architecture()).to(dtype)
        tok = ByteTokenizer(base.cfg.vocab_size)
    base.grad_checkpointing = {"true": True, "false": False, "auto": "auto"}[spec.grad_checkpointing]
    base.memory_budget_gb = cfg.train.memory_budget_gb
    return method_for(cfg).build(cfg, base, tok, device), tok


def config_yaml(cfg: TrainConfig) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def micro_step(model, batch: Batch, generator, precision: str, accum: int):
    """One micro-batch: forward (rollout + learning pass), scaled backward. -> (ThoughtOutput, finite as a
    0-dim bool tensor)."""
    with autocast_context(batch.input_ids.device, precision):
        out = model(batch.input_ids, attention_mask=batch.attention_mask, generator=generator,
                    doc_ids=batch.doc_ids)
    (out.loss / accum).backward()  # even when non-finite: under DDP every rank must join the all-reduce
    return out, torch.isfinite(out.loss.detach())


def sample_thought(qs: QuietStar, tok, batch: Batch, out, position: int) -> dict:
    """The thought sampled at one position of the first sequence, with its context, as text."""
    length = int(batch.attention_mask[0].sum())
    i = position if 0 <= position < length - 1 else max(0, length // 2)
    slot = i
    if getattr(out, "selection", None) is not None:  # thought.where: the thinking position nearest to i
        where = out.selection.positions[0].masked_fill(~out.selection.valid[0], 1 << 30)
        slot = int((where - i).abs().argmin())
        i = int(where[slot])
    ids = batch.input_ids[0].tolist()
    thought = tok.decode(out.thoughts[0, 0, slot].tolist())
    return {"position": i, "context": tok.decode(ids[max(0, i - 24):i + 1]), "thought": thought,
            "next": tok.decode(ids[i + 1:i + 4])}


@dataclass
class Session:
    """Everything one training run holds: built once by `start_session`, used by the step functions."""

    cfg: TrainConfig
    dist: DistInfo
    device: torch.device
    precision: str
    out_dir: Path
    qs: QuietStar
    tok: object
    model: torch.nn.Module  # qs, or its DDP wrapper
    generator: torch.Generator
    stream: object
    skipped: dict
    optimizer: torch.optim.Optimizer
    scheduler: object
    params: list
    lock: RunLock  # held on the run dir until the run ends
    watch: RunWatch  # divergence beyond NaN; which checkpoints are healthy
    start_step: int = 0
    wandb_id: Optional[str] = None
    tokens_seen: int = 0
    resume_reason: str = ""  # why the run resumes without resume=<path> (elastic.choose_resume)


def start_session(cfg: TrainConfig) -> Session:
    """Dist, device, seed, precision, output dir, model, data, optimizer and schedule, and the resume."""
    # ---------------------------------------------------------------- setup: dist, device, seed, precision
    dist: DistInfo = setup(cfg.dist, cfg.train.device)
    device = dist.device
    precision = resolve_precision(device, cfg.train.precision)
    check_device_dtype(cfg, device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    attention.set_backend(cfg.attention.backend)
    out_dir = Path(cfg.output_dir or default_output_dir()).resolve()
    out_dir = dist.broadcast_object(out_dir)  # every rank writes (checkpoint shards) where rank 0 does
    lock = RunLock(out_dir)
    choice = claim_run_dir(cfg, dist, lock, out_dir)
    if choice.path is not None and str(choice.path) != cfg.resume:
        cfg = replace(cfg, resume=str(choice.path))

    # ---------------------------------------------------------------- model
    qs, tok = build_thinker(cfg, device)
    model = wrap(qs, dist, cfg.dist)  # DDP wrapper, or qs itself (sharded in place by FSDP)
    maybe_compile(qs.model, cfg.train.compile)
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed + dist.rank)

    # ---------------------------------------------------------------- data
    skipped: dict = {}
    stream = build_stream(cfg.data, tok, cfg.train.seed, dist.rank, dist.world_size, skipped)

    # ---------------------------------------------------------------- optimizer + schedule
    optimizer, scheduler = build_optimizer(qs, cfg.optim, cfg.train.max_steps)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    s = Session(cfg, dist, device, precision, out_dir, qs, tok, model, generator, stream, skipped, optimizer,
                scheduler, params, lock, RunWatch(cfg.health, dist.is_main), resume_reason=choice.reason)
    stream.record = cfg.train.record_samples
    resume(s)
    return s


class FailedOnRankZero(UserError):
    """Rank 0 refused to start (its own error says why, once): the other ranks stop with it."""

    quiet = True  # run_main prints nothing for it


def claim_run_dir(cfg: TrainConfig, dist: DistInfo, lock: RunLock, out_dir: Path):
    """Rank 0: take the run dir's lock, finish or roll back an interrupted save, choose what to resume
    (elastic.choose_resume), write config.yaml. A user error there stops every rank at once (the others
    would otherwise wait for rank 0 in the next collective). -> the ResumeChoice, the same on every rank."""
    choice, failure = None, None
    if dist.is_main:
        try:
            lock.acquire()  # before anything is written: a second run into this dir fails here
            lines = recover_checkpoints(out_dir / "checkpoints")
            if cfg.resume and cfg.resume != "auto":
                lines += recover_run(cfg.resume)
            for line in lines:
                print(line, flush=True)
            choice = choose_resume(cfg, out_dir)
            (out_dir / "config.yaml").write_text(config_yaml(cfg))
        except UserError as e:
            lock.release()
            failure = e
    choice, message = dist.broadcast_object((choice, None if failure is None else str(failure)))
    if failure is not None:
        raise failure
    if message is not None:
        raise FailedOnRankZero(message)
    return choice


def resume(s: Session) -> None:
    """Continue from cfg.resume's newest checkpoint: weights, optimizer, schedule, RNG and data position."""
    cfg, dist = s.cfg, s.dist
    # ---------------------------------------------------------------- resume
    if s.resume_reason and dist.is_main and not cfg.resume:
        print(s.resume_reason, flush=True)  # resume=auto or a restart, with nothing to resume: a new run
    if cfg.resume:
        state = load_checkpoint(cfg.resume, s.qs, s.optimizer, s.scheduler, s.generator, dist,
                                cfg.checkpoint.verify_hashes)
        s.start_step, s.wandb_id = int(state["step"]), state.get("wandb_id")
        s.tokens_seen = int(state.get("extra", {}).get("tokens_seen", 0))
        s.stream.load_state_dict(state["data"])
        where = find_checkpoint(cfg.resume)
        if s.start_step >= cfg.train.max_steps:
            raise ConfigError(f"resume: {where} is at step {s.start_step}, and train.max_steps="
                              f"{cfg.train.max_steps}: nothing to train; raise train.max_steps")
        if dist.is_main:
            why = f" ({s.resume_reason})" if s.resume_reason else ""
            print(f"resumed from {where} at step {s.start_step}{why}", flush=True)
            saved_world = int(state.get("world_size") or 1)
            if saved_world != dist.world_size:
                print(world_change_note(cfg, where, saved_world, dist.world_size), flush=True)
            if where.parent.resolve() == (s.out_dir / "checkpoints").resolve():  # an earlier step of this run
                aside = set_aside_later(s.out_dir / "checkpoints", s.start_step, s.out_dir / "metrics.jsonl")
                if aside:
                    print(f"later checkpoints and metrics of this run moved to {aside}", flush=True)


def world_change_note(cfg: TrainConfig, where: Path, saved_world: int, world: int) -> str:
    """One line on a resume with another number of processes: what carries over and what does not."""
    saved = read_train_config(where, TrainConfig)
    was = saved.data.batch_size * saved.optim.grad_accum * saved_world
    now = cfg.data.batch_size * cfg.optim.grad_accum * world
    batch = (f"the global batch stays {now} rows" if was == now else
             f"the global batch changes from {was} to {now} rows a step (data.batch_size * optim.grad_accum * "
             f"processes; set data.batch_size={was // world} to keep it)" if was % world == 0 else
             f"the global batch changes from {was} to {now} rows a step")
    return (f"{where} was written by {saved_world} process(es), this run has {world}: the data cursor is shared, so "
            f"no row is skipped or repeated, and {batch}; the optimizer state is resharded; each process's "
            f"thought-sampling generator and torch/numpy/python RNG state carry over only for ranks below "
            f"{min(saved_world, world)}, so rows sampled by another rank's generator than before draw other thoughts")


def checkpoint(s: Session, run, step: int) -> Path:
    cfg = s.cfg
    return save_checkpoint(s.out_dir / "checkpoints", step, s.qs, s.optimizer, s.scheduler,
                           data_state=s.stream.state_dict(), generator=s.generator, config_yaml=config_yaml(cfg),
                           tokenizer=s.tok, dist=s.dist, wandb_id=run.id if s.dist.is_main else None,
                           keep_last=cfg.checkpoint.keep_last, save_optimizer=cfg.checkpoint.save_optimizer,
                           verify_hashes=cfg.checkpoint.verify_hashes, extra={"tokens_seen": s.tokens_seen},
                           protect=s.watch.protected)


@dataclass
class StepResult:
    metrics: dict  # name -> 0-dim tensor (mean over the micro-batches), on the device
    loss: torch.Tensor  # 0-dim
    finite: bool  # loss and gradient finite on every rank
    finite_loss: bool
    n_tokens: int
    batch: Batch
    out: object  # the last micro-batch's ThoughtOutput


def accumulate(s: Session) -> tuple[dict, torch.Tensor, int, Batch, object]:
    """Forward and backward of `optim.grad_accum` micro-batches. -> (mean metrics as 0-dim tensors,
    finite-loss flag as a 0-dim tensor, tokens, last batch, last output); no host sync."""
    accum = s.cfg.optim.grad_accum
    sums: dict = {}
    n_tokens, finite = 0, torch.ones((), dtype=torch.bool, device=s.device)
    batch = out = None
    for micro in range(accum):
        batch = s.stream.next_batch()
        n_tokens += batch.n_tokens  # counted on the host copy: no device sync
        batch = batch.to(s.device)
        with no_sync(s.model, s.dist, sync=micro == accum - 1):
            out, ok = micro_step(s.model, batch, s.generator, s.precision, accum)
        finite = finite & ok
        for k, v in out.metrics.items():
            sums[k] = sums[k] + v / accum if k in sums else v / accum
    return sums, finite, n_tokens, batch, out


def train_step(s: Session) -> StepResult:
    """One optimizer step; no update when the loss or the gradient is non-finite on any rank. One host
    sync (the finiteness check the skip needs); the metrics stay on the device."""
    sums, finite_loss, n_tokens, batch, out = accumulate(s)
    grad_norm = clip_grad_norm(s.params, s.cfg.optim.grad_clip)  # the same on every rank
    finite = bool(finite_loss & torch.isfinite(grad_norm).to(finite_loss.device))
    finite = not s.dist.any(not finite)
    if finite:
        s.optimizer.step()
        s.scheduler.step()
        if getattr(s.qs, "ema", None) is not None:  # thought.ema_decay: the teacher follows the update
            s.qs.ema.update(s.qs.model)
    s.optimizer.zero_grad(set_to_none=True)
    sums["train/grad_norm"] = grad_norm.detach()
    return StepResult(sums, sums["train/loss"], finite, finite or bool(finite_loss), n_tokens, batch, out)


def to_numbers(s: Session, pending: list) -> list[dict]:
    """The pending steps' 0-dim metric tensors as floats, in one device-to-host copy, averaged over ranks."""
    keys = [sorted(m) for m in pending]
    flat = torch.stack([torch.as_tensor(m[k]).detach().float().reshape(()).to(s.device) for m, ks in zip(pending, keys) for k in ks])
    values, i, out = flat.tolist(), 0, []
    for ks in keys:
        out.append(s.dist.mean(dict(zip(ks, values[i:i + len(ks)]))))
        i += len(ks)
    return out


def enter_curriculum_stage(s: Session, step: int, stage: Optional[int]) -> int:
    """Set the thought and talk lengths of the curriculum stage that `step` belongs to (the same parameters
    go on); say so when a stage begins. -> the stage."""
    if s.cfg.thought.stage_at(step) == stage:
        return stage
    now, thought = s.cfg.thought.at_step(step)
    s.qs.configure(thought)
    if s.dist.is_main:
        print(f"[curriculum] stage {now + 1}/{len(s.cfg.thought.curriculum)} from step {step}: "
              f"n_ahead={s.qs.cfg.n_ahead} n_ahead_talk={s.qs.cfg.n_ahead_talk}", flush=True)
    return now


def train(cfg: TrainConfig, on_step: Optional[Callable[[int, TrainResult], None]] = None) -> TrainResult:
    """Train per `cfg`. on_step(step, result), if given, runs after each step's logging and checkpoint."""
    s = start_session(cfg)
    # ---------------------------------------------------------------- logging
    run = start_run(cfg.logger, s.out_dir, config=config_to_dict(cfg), rank=s.dist.rank, resume_id=s.wandb_id)
    progress = Progress(cfg.train.max_steps, s.start_step, cfg.train.progress and s.dist.is_main)
    result = TrainResult("done", s.start_step, output_dir=s.out_dir)
    # ---------------------------------------------------------------- loop
    s.model.train()
    pending, last = [], None  # metrics of the steps not yet logged (0-dim tensors)
    stage = None  # the thought-length curriculum's stage (thought.curriculum)
    for step in range(s.start_step + 1, cfg.train.max_steps + 1):
        t0 = time.perf_counter()
        if cfg.thought.curriculum:
            stage = enter_curriculum_stage(s, step, stage)
        r = train_step(s)
        last = r
        if not r.finite:  # stop cleanly: no update, no checkpoint
            log_pending(pending, s, run, result)
            result.status = "diverged"
            result.checkpoint = s.watch.stop(step, f"non-finite {'loss' if not r.finite_loss else 'gradient'}")
            break
        dt = time.perf_counter() - t0
        s.tokens_seen += r.n_tokens * s.dist.world_size
        extra = {"train/lr": s.scheduler.get_last_lr()[0], "perf/step_time_s": dt,
                 "perf/tok_per_s": r.n_tokens * s.dist.world_size / dt, "perf/tokens_seen": s.tokens_seen,
                 "data/epoch": s.stream.epoch}
        if stage is not None:
            extra.update({"thought/curriculum_stage": stage, "thought/n_ahead": s.qs.cfg.n_ahead,
                          "thought/n_ahead_talk": s.qs.cfg.n_ahead_talk})
        pending.append((step, r.metrics, extra))
        if cfg.train.record_samples:
            record_samples(s, step)
        every = cfg.checkpoint.every
        save = (every and step % every == 0) or (step == cfg.train.max_steps and cfg.checkpoint.save_final)
        if (step % cfg.train.log_every == 0 or step == cfg.train.max_steps or save) and \
                log_pending(pending, s, run, result):  # the divergence watch reads the numbers
            result.status, result.checkpoint = "diverged", s.watch.last_healthy
            break
        progress.update(step, {**result.metrics, **pending[-1][2]} if pending else result.metrics)
        if save and s.watch.may_checkpoint(step):
            try:
                result.checkpoint = checkpoint(s, run, step)
                s.watch.saved(result.checkpoint)
            except NonFiniteStateError as e:
                result.status, result.checkpoint = "diverged", s.watch.stop(step, str(e))
                break
        if on_step is not None:
            on_step(step, result)
    log_pending(pending, s, run, result, write=False)  # steps after the last log (a break): numbers only
    progress.close()
    finish(s, run, result, last)
    return result


def record_samples(s: Session, step: int) -> None:
    """Append the ids of the rows every process consumed in `step` to <output dir>/samples.jsonl (rank 0)."""
    rows = s.stream.take_row_ids()
    if s.dist.active:
        import torch.distributed as tdist

        gathered = [None] * s.dist.world_size
        tdist.all_gather_object(gathered, rows)
    else:
        gathered = [rows]
    if s.dist.is_main:
        with open(s.out_dir / "samples.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "rows": gathered}) + "\n")


def watched_nll(metrics: dict, cfg: TrainConfig) -> float:
    """The NLL the divergence watch follows: the objective's, or where the objective trains none
    (thought.nll_weight=0, RLP's own recipe: its train/nll is 0 on every step) the model's NLL without a
    thought, which every thought step measures."""
    key = "train/nll_base" if cfg.thought.nll_weight == 0 else "train/nll"
    return metrics.get(key, metrics["train/loss"])


def log_pending(pending: list, s: Session, run, result: TrainResult, write: bool = True) -> bool:
    """Turn the pending steps' metrics into numbers (one sync), feed them to the divergence watch, write the
    newest, record every loss. -> whether the watch saw the run go bad."""
    if not pending:
        return False
    numbers = to_numbers(s, [m for _, m, _ in pending])
    bad = False
    for (step, _, host), metrics in zip(pending, numbers):
        metrics.update(host)
        result.losses.append(metrics["train/loss"])
        result.step, result.metrics = step, metrics
        bad = bad or s.watch.after_step(step, watched_nll(metrics, s.cfg), metrics["train/grad_norm"])
    if write:
        run.log(result.metrics, step=result.step)
    pending.clear()
    return bad


def finish(s: Session, run, result: TrainResult, last: Optional[StepResult]) -> None:
    if last is not None and s.dist.is_main:
        result.sample = sample_thought(s.qs, s.tok, last.batch.to("cpu"), last.out, s.cfg.train.sample_position)
        run.summary({"final/loss": result.losses[-1] if result.losses else math.nan, "final/step": result.step})
        result.curves = write_curves(s.out_dir)
        print_summary(s.cfg, result, run, s.skipped)
    run.finish(exit_code=0 if result.status == "done" else 1)
    s.lock.release()
    teardown(s.dist)


def write_curves(out_dir: Path) -> Optional[Path]:
    """The run's learning curves (quietstar/plots.py) as <out_dir>/curves.png; a failure only warns."""
    from quietstar.plots import plot_run

    try:
        return plot_run(out_dir / "metrics.jsonl", out_dir / "curves.png")
    except Exception as e:  # a plot must never cost a finished run its summary
        print(f"  (no curves.png: {type(e).__name__}: {e})", flush=True)
        return None


def default_output_dir() -> Path:
    """outputs/<date>/<time>.<microseconds>-<pid> (as configs/train.yaml's hydra.run.dir): unique even for
    two launches in the same second."""
    now = time.time()
    return Path("outputs") / f"{time.strftime('%Y-%m-%d/%H-%M-%S', time.localtime(now))}." \
        f"{int(now * 1e6) % 1_000_000:06d}-{os.getpid()}"


def print_summary(cfg: TrainConfig, result: TrainResult, run, skipped: dict) -> None:
    m = result.metrics
    if not m:
        last = ""
    elif not cfg.thought.enabled:  # a plain LM
        last = f", final loss {m['train/loss']:.4f} (plain LM: nll {m.get('train/nll', math.nan):.4f})"
    else:
        last = (f", final loss {m['train/loss']:.4f} (nll {m.get('train/nll', math.nan):.4f}: without thoughts "
                f"{m.get('train/nll_base', math.nan):.4f}, talk after thoughts {m.get('train/nll_talk', math.nan):.4f}; "
                f"reward {m.get('thought/reward_mean', math.nan):+.4f})")
    print(f"\n{result.status}: {result.step}/{cfg.train.max_steps} steps{last}")
    print(f"  outputs:    {result.output_dir}")
    print(f"  metrics:    {result.output_dir / 'metrics.jsonl'}")
    if result.checkpoint:
        print(f"  checkpoint: {result.checkpoint}")
    if result.curves:
        print(f"  curves:     {result.curves}")
    if run.dir:
        print(f"  wandb:      {run.dir} ({cfg.logger.mode})")
    if any(skipped.values()):
        print(f"  data:       skipped {sum(skipped.values())} bad record(s): {skipped}")
    s = result.sample
    if s and cfg.thought.enabled:
        print(f"  a sampled thought after position {s['position']}:")
        print(f"    text:    ...{s['context']!r}")
        print(f"    thought: {s['thought']!r}")
        print(f"    next:    {s['next']!r}")


# -------------------------------------------------------------------------------------------- Hydra entry


def resume_config(node, overrides: list[str]):
    """The checkpoint's saved config, with only what this command line names changed on top of it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), read_config_node(node.resume))
    for o in OverridesParser.create().parse_overrides(overrides):
        key = o.key_or_group
        if key in ("resume", "output_dir") or key.startswith("hydra"):
            continue
        if key == "experiment":
            raise ConfigError("experiment=... cannot be combined with resume=...: the checkpoint's config is "
                             "used; name the fields to change instead")
        OmegaConf.update(merged, key, OmegaConf.select(node, key), merge=False)
    merged.resume = node.resume
    return merged


def config_dir() -> Path:
    """configs/: beside the package in a checkout, inside it in an install (pyproject's package-dir)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent / "configs"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise ConfigError(f"no configs/train.yaml beside or inside {here}: a broken checkout or install")


def main() -> None:
    """The Hydra entry point: `python train.py ...` from a checkout, `quietstar-train ...` from an install."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig

    from quietstar.errors import run_main, tracebacks_wanted

    register_configs()
    if tracebacks_wanted():
        os.environ.setdefault("HYDRA_FULL_ERROR", "1")

    def run(node: DictConfig) -> None:
        hc = HydraConfig.get()
        if node.resume and node.resume != "auto":  # auto: this command line's config (elastic.choose_resume)
            node = resume_config(node, list(hc.overrides.task))
        node.output_dir = hc.runtime.output_dir
        cfg: TrainConfig = build_config(node)
        if cfg.recipe:  # a multi-stage experiment (a method's run: quietstar/methods/), each stage a train() run
            result = run_recipe(cfg, train)
        else:
            result = train(cfg)
        if result.status != "done" and hc.mode.name == "RUN":
            raise SystemExit(1)

    @hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
    def hydra_main(node: DictConfig) -> None:
        run_main(run, node)

    hydra_main()


if __name__ == "__main__":
    main()
