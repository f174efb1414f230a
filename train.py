"""Quiet-STaR training.

    python train.py                                   # SmolLM2-135M on the embedded synthetic math corpus
    python train.py model=tiny train.max_steps=5      # the tiny random model (seconds)
    python train.py data=jsonl data.path=../shared/data/math_web/train.jsonl thought.n_ahead=12
    python train.py -m thought.n_ahead=4,8            # a Hydra multirun sweep
    python train.py resume=outputs/<date>/<time>-<pid>  # continue a run from its newest checkpoint
    python train.py experiment=gpu                    # the preset for a real run on a GPU
    torchrun --nproc_per_node=2 train.py dist=ddp     # data parallel (dist=fsdp: sharded)

Hydra composes configs/train.yaml and the command line into a typed `TrainConfig` (quietstar/config.py);
`train(cfg)` below is plain Python and never imports Hydra, so tests and notebooks call it directly.
Everything a run writes goes to its output dir (Hydra's): config.yaml, metrics.jsonl, checkpoints/,
wandb/. Each step is: rollout of thoughts (no grad) + one learning pass over the thought grid
(quietstar/thinker.py), `optim.grad_accum` micro-batches per optimizer step.

Environment: QUIETSTAR_SIGKILL_AFTER_STEP=k kills the process with SIGKILL right after step k (after its
logging and checkpoint), to test exact resumption.
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from quietstar import attention
from quietstar.checkpoint import (NonFiniteStateError, RunLock, find_checkpoint, init_weights, load_checkpoint,
                                  read_config_node, recover_checkpoints, recover_run, save_checkpoint,
                                  set_aside_later)
from quietstar.config import TrainConfig, build_config, check_device_dtype, config_to_dict
from quietstar.data import Batch, ByteTokenizer, build_stream
from quietstar.dist import DistInfo, no_sync, setup, teardown, wrap
from quietstar.errors import ConfigError
from quietstar.health import RunWatch
from quietstar.logging import Progress, start_run
from quietstar.model import Transformer
from quietstar.optim import autocast_context, build_optimizer, clip_grad_norm, maybe_compile, resolve_precision
from quietstar.plain import PlainLM
from quietstar.thinker import QuietStar


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
    """(QuietStar, tokenizer): pretrained weights by model.name, or a seeded random-init preset."""
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
    base.grad_checkpointing = spec.grad_checkpointing
    cls = QuietStar if cfg.thought.enabled else PlainLM
    qs = cls(base, tok, cfg.thought)
    if cfg.init_from:
        init_weights(qs, cfg.init_from)
    return qs.to(device), tok


def config_yaml(cfg: TrainConfig) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def micro_step(model, batch: Batch, generator, precision: str, accum: int):
    """One micro-batch: forward (rollout + learning pass), scaled backward. -> (ThoughtOutput, finite)."""
    with autocast_context(batch.input_ids.device, precision):
        out = model(batch.input_ids, attention_mask=batch.attention_mask, generator=generator,
                    doc_ids=batch.doc_ids)
    (out.loss / accum).backward()  # even when non-finite: under DDP every rank must join the all-reduce
    return out, bool(torch.isfinite(out.loss.detach()))


def sample_thought(qs: QuietStar, tok, batch: Batch, out, position: int) -> dict:
    """The thought sampled at one position of the first sequence, with its context, as text."""
    length = int(batch.attention_mask[0].sum())
    i = position if 0 <= position < length - 1 else max(0, length // 2)
    ids = batch.input_ids[0].tolist()
    thought = qs.decode_thought(out.thoughts, 0, 0, i) if hasattr(qs, "decode_thought") else \
        tok.decode(out.thoughts[0, 0, i].tolist())
    return {"position": i, "context": tok.decode(ids[max(0, i - 24):i + 1]), "thought": thought,
            "next": tok.decode(ids[i + 1:i + 4])}


def train(cfg: TrainConfig) -> TrainResult:
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
    if dist.is_main:
        lock.acquire()  # before anything is written: a second run into this dir fails here
        for line in recover_checkpoints(out_dir / "checkpoints") + (recover_run(cfg.resume) if cfg.resume else []):
            print(line, flush=True)
        (out_dir / "config.yaml").write_text(config_yaml(cfg))

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

    # ---------------------------------------------------------------- resume
    start_step, wandb_id, tokens_seen = 0, None, 0
    if cfg.resume:
        state = load_checkpoint(cfg.resume, qs, optimizer, scheduler, generator, dist,
                                cfg.checkpoint.verify_hashes)
        start_step, wandb_id = int(state["step"]), state.get("wandb_id")
        tokens_seen = int(state.get("extra", {}).get("tokens_seen", 0))
        stream.load_state_dict(state["data"])
        if start_step >= cfg.train.max_steps:
            raise ConfigError(f"resume: {find_checkpoint(cfg.resume)} is at step {start_step}, and train.max_steps="
                              f"{cfg.train.max_steps}: nothing to train; raise train.max_steps")
        if dist.is_main:
            print(f"resumed from {find_checkpoint(cfg.resume)} at step {start_step}", flush=True)
            if find_checkpoint(cfg.resume).parent.resolve() == (out_dir / "checkpoints").resolve():
                aside = set_aside_later(out_dir / "checkpoints", start_step, out_dir / "metrics.jsonl")
                if aside:
                    print(f"later checkpoints and metrics of this run moved to {aside}", flush=True)

    # ---------------------------------------------------------------- logging
    run = start_run(cfg.logger, out_dir, config=config_to_dict(cfg), rank=dist.rank, resume_id=wandb_id)
    progress = Progress(cfg.train.max_steps, start_step, cfg.train.progress and dist.is_main)
    ckpt_root = out_dir / "checkpoints"
    kill_after = int(os.environ.get("QUIETSTAR_SIGKILL_AFTER_STEP", "0") or 0)
    result = TrainResult("done", start_step, output_dir=out_dir)
    watch = RunWatch(cfg.health, dist.is_main)  # divergence beyond NaN; which checkpoints are healthy

    def checkpoint(step: int) -> Path:
        return save_checkpoint(ckpt_root, step, qs, optimizer, scheduler, data_state=stream.state_dict(),
                               generator=generator, config_yaml=config_yaml(cfg), tokenizer=tok, dist=dist,
                               wandb_id=run.id if dist.is_main else None, keep_last=cfg.checkpoint.keep_last,
                               save_optimizer=cfg.checkpoint.save_optimizer,
                               verify_hashes=cfg.checkpoint.verify_hashes, extra={"tokens_seen": tokens_seen},
                               protect=watch.protected)

    # ---------------------------------------------------------------- loop
    model.train()
    accum = cfg.optim.grad_accum
    batch = out = None
    for step in range(start_step + 1, cfg.train.max_steps + 1):
        t0 = time.perf_counter()
        sums: dict = {}
        n_tokens, finite = 0, True
        for micro in range(accum):
            batch = stream.next_batch().to(device)
            with no_sync(model, dist, sync=micro == accum - 1):
                out, ok = micro_step(model, batch, generator, precision, accum)
            finite &= ok
            n_tokens += batch.n_tokens
            for k, v in out.metrics.items():
                sums[k] = sums.get(k, 0.0) + v / accum
        grad_norm = float(clip_grad_norm(params, cfg.optim.grad_clip))  # the same on every rank
        if dist.any(not finite) or not math.isfinite(grad_norm):  # stop cleanly: no update, no checkpoint
            optimizer.zero_grad(set_to_none=True)
            result.status = "diverged"
            result.checkpoint = watch.stop(step, f"non-finite {'loss' if not finite else 'gradient'}")
            break
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        metrics = dist.mean(sums)
        dt = time.perf_counter() - t0
        tokens_seen += n_tokens * dist.world_size
        metrics.update({"train/lr": scheduler.get_last_lr()[0],
                        "train/grad_norm": grad_norm,
                        "perf/step_time_s": dt, "perf/tok_per_s": n_tokens * dist.world_size / dt,
                        "perf/tokens_seen": tokens_seen, "data/epoch": stream.epoch})
        result.losses.append(metrics["train/loss"])
        result.step, result.metrics = step, metrics
        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            run.log(metrics, step=step)
        progress.update(step, metrics)
        if watch.after_step(step, metrics.get("train/nll", metrics["train/loss"]), grad_norm):
            result.status, result.checkpoint = "diverged", watch.last_healthy
            break
        every = cfg.checkpoint.every
        if ((every and step % every == 0) or (step == cfg.train.max_steps and cfg.checkpoint.save_final)) \
                and watch.may_checkpoint(step):
            try:
                result.checkpoint = checkpoint(step)
                watch.saved(result.checkpoint)
            except NonFiniteStateError as e:
                result.status, result.checkpoint = "diverged", watch.stop(step, str(e))
                break
        if step == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    progress.close()

    # ---------------------------------------------------------------- summary
    if batch is not None and out is not None and dist.is_main:
        result.sample = sample_thought(qs, tok, batch.to("cpu"), out, cfg.train.sample_position)
        run.summary({"final/loss": result.losses[-1] if result.losses else math.nan, "final/step": result.step})
        result.curves = write_curves(out_dir)
        print_summary(cfg, result, run, skipped)
    run.finish(exit_code=0 if result.status == "done" else 1)
    lock.release()
    teardown(dist)
    return result


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
    print(f"\n{result.status}: {result.step}/{cfg.train.max_steps} steps"
          + (f", final loss {m['train/loss']:.4f} (nll {m.get('train/nll', math.nan):.4f}: without thoughts "
             f"{m.get('train/nll_base', math.nan):.4f}, talk after thoughts {m.get('train/nll_talk', math.nan):.4f}; "
             f"reward {m.get('thought/reward_mean', math.nan):+.4f})" if m else ""))
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
    if s:
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


if __name__ == "__main__":
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig

    from quietstar.config import register_configs
    from quietstar.errors import run_main, tracebacks_wanted

    register_configs()
    if tracebacks_wanted():
        os.environ.setdefault("HYDRA_FULL_ERROR", "1")

    def run(node: DictConfig) -> None:
        hc = HydraConfig.get()
        if node.resume:
            node = resume_config(node, list(hc.overrides.task))
        node.output_dir = hc.runtime.output_dir
        cfg: TrainConfig = build_config(node)
        if cfg.recipe:  # a multi-stage experiment (quietstar/recipes/), each stage a train() run
            from quietstar.recipes import run_recipe

            result = run_recipe(cfg, train)
        else:
            result = train(cfg)
        if result.status != "done" and hc.mode.name == "RUN":
            raise SystemExit(1)

    @hydra.main(version_base="1.3", config_path="configs", config_name="train")
    def main(node: DictConfig) -> None:
        run_main(run, node)

    main()
