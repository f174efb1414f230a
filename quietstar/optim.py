"""AdamW with explicit parameter groups, the LR schedule, and the precision / compile setup.

Parameter groups (each with its LR multiplier from OptimConfig, applied by the schedule):
  decay       base-model matrices (weight decay on)                        lr * base_lr_mult
  no_decay    base-model norms and biases (no weight decay)                lr * base_lr_mult
  thought     <start>/<end> embeddings                                     lr * thought_embedding_lr_mult
  talk_head   the mixing head (matrices decayed, biases not)               lr * talk_head_lr_mult
  gate        thought.where=gate's head (no weight decay)                  lr * talk_head_lr_mult
A group whose multiplier is 0 is frozen (requires_grad off), not just given LR 0.

Schedule: linear warmup from 0 over `warmup_steps`, then constant, cosine or linear decay to
`min_lr_ratio * lr` at `max_steps`. `LambdaLR` with a picklable schedule object, so its state_dict
round-trips through a checkpoint.

Precision: on GPU, fp32 master weights under bf16 autocast (`precision=auto|bf16`); on CPU, fp32 by default
and the same bf16 autocast with `precision=bf16` (the official code ran pure bf16 weights, which freezes most
of the model at lr 1e-6; docs/official.md).
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class WarmupSchedule:
    """LR factor at optimizer step `step` (0-based): warmup, then constant / cosine / linear."""

    warmup_steps: int
    max_steps: int
    kind: str = "constant"
    min_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.kind == "constant":
            return 1.0
        span = max(1, self.max_steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        shape = 0.5 * (1 + math.cos(math.pi * t)) if self.kind == "cosine" else 1.0 - t
        return self.min_ratio + (1 - self.min_ratio) * shape


def param_groups(qs: nn.Module, cfg) -> list[dict]:
    """The parameter groups of a QuietStar model (see the module docstring), with `lr_mult` set."""
    groups = {
        "decay": dict(params=[], weight_decay=cfg.weight_decay, lr_mult=cfg.base_lr_mult),
        "no_decay": dict(params=[], weight_decay=0.0, lr_mult=cfg.base_lr_mult),
        "thought": dict(params=[], lr_mult=cfg.thought_embedding_lr_mult,
                        weight_decay=cfg.weight_decay if cfg.thought_embedding_weight_decay is None
                        else cfg.thought_embedding_weight_decay),
        "talk_head": dict(params=[], weight_decay=cfg.weight_decay, lr_mult=cfg.talk_head_lr_mult),
        "talk_head_no_decay": dict(params=[], weight_decay=0.0, lr_mult=cfg.talk_head_lr_mult),
        "gate": dict(params=[], weight_decay=0.0, lr_mult=cfg.talk_head_lr_mult),
    }
    for name, p in qs.named_parameters():
        if name in ("start_embedding", "end_embedding"):
            key = "thought"
        elif name.startswith("talk_head."):
            key = "talk_head" if p.dim() >= 2 else "talk_head_no_decay"
        elif name.startswith("gate."):
            key = "gate"
        else:
            key = "decay" if p.dim() >= 2 else "no_decay"
        groups[key]["params"].append(p)
    out = []
    for name, g in groups.items():
        if not g["params"]:
            continue
        if g["lr_mult"] == 0:
            for p in g["params"]:
                p.requires_grad_(False)
            continue
        out.append({"name": name, **g})
    return out


def build_optimizer(qs: nn.Module, cfg, max_steps: int):
    """-> (AdamW over the parameter groups, LambdaLR schedule). `cfg` is an OptimConfig."""
    groups = param_groups(qs, cfg)
    for g in groups:
        g["lr"] = cfg.lr * g["lr_mult"]
    params = [p for g in groups for p in g["params"]]
    fused = cfg.fused
    if fused is None:  # one kernel per parameter instead of a dozen elementwise passes (bench/results/adamw_step_cpu.json)
        fused = bool(params) and {p.device.type for p in params} in ({"cuda"}, {"cpu"}) and "fused" in \
            inspect.signature(torch.optim.AdamW).parameters
    extra = {"fused": True} if fused else {"foreach": None}
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                            weight_decay=cfg.weight_decay, **extra)
    schedule = WarmupSchedule(cfg.warmup_steps, max_steps, cfg.schedule, cfg.min_lr_ratio)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    return opt, sched


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """Global grad norm before clipping (clipped in place when max_norm > 0). For FSDP2's DTensor
    gradients the norm is over the full (unsharded) gradient."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(())
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=None)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast (fp32 master weights stay in the optimizer) on a GPU or, asked for, on the CPU (bf16 matmul
    units make its projections several times faster); nothing for fp32."""
    if precision == "fp32" or device.type not in ("cuda", "cpu"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def resolve_precision(device: torch.device, precision: str) -> str:
    """auto -> bf16 on GPU, fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def maybe_compile(model: nn.Module, enabled: bool) -> None:
    """torch.compile each transformer block in place (`Module.compile`): state_dict keys stay plain
    (no `_orig_mod.` prefix), so checkpoints from compiled and eager runs are interchangeable."""
    if not enabled:
        return
    for layer in model.layers:
        layer.compile()
