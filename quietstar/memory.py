"""Activation memory, and how many of the decoder's first blocks to checkpoint to fit a budget.

`saved_bytes_per_token` is what one block keeps for backward per token (`measure_saved_bytes` measures it);
`checkpoint_plan` picks the fewest of the first blocks to recompute in backward for the estimated peak of a
step to fit the budget (`memory_budget_gb`, or `auto_budget`: a share of the device's memory), and
Transformer.checkpointed_layers asks it once per call shape (`announced_plan`, which prints the choice).
docs/architecture.md, "Memory", derives the estimate. `cfg` is always a model.ModelConfig (this module sits below
model.py, which calls it, so it does not import it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

AUTO_BUDGET_FRACTION = {"cuda": 0.8, "cpu": 0.5}
"""The share of a device's memory that a training step may use when no budget is given
(Transformer.memory_budget_gb = None, train.memory_budget_gb: null). The estimate below leaves out the
Python and PyTorch runtime, the allocator's slack (on CPU, freed memory that malloc keeps: about a quarter of
a step's peak RSS), the rollout's and the loss's buffers, and on CPU everything else the machine runs."""


def device_memory_bytes(device: torch.device) -> int:
    """A device's total memory: the GPU's, or the machine's RAM (capped by a cgroup limit)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        total = min(total, int(limit)) if limit.isdigit() else total
    except OSError:
        pass
    return total


def auto_budget(device: torch.device) -> tuple[int, str]:
    """(bytes, description) of the default memory budget on `device`."""
    frac = AUTO_BUDGET_FRACTION.get(device.type, AUTO_BUDGET_FRACTION["cpu"])
    total = device_memory_bytes(device)
    what = "GPU memory" if device.type == "cuda" else "RAM"
    return int(frac * total), f"{frac:.0%} of {total / 2**30:.1f} GB {what}"


def saved_bytes_per_token(cfg, residual_bytes: int, compute_bytes: int) -> int:
    """Bytes one block keeps for backward per token: the residual stream in its dtype (residual_bytes, the
    parameters' dtype), everything after a projection in the compute dtype (compute_bytes: autocast's, or
    the parameters'). The attention is assumed to keep q, k, v, its output (fp32: the split backend merges
    in fp32) and a log-sum-exp per head (the split, flex and triton backends; dense also keeps its scores)."""
    d, I = cfg.dim, cfg.intermediate_size
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return (d * residual_bytes + 2 * 4  # the block's input and both norms' fp32 1/rms (fused.py recomputes the
            # normed inputs that the q/k/v and gate/up projections read, and the feed-forward norm's input)
            + (q + 2 * kv) * compute_bytes + 4 * cfg.n_heads  # the attention's q, k, v and log-sum-exp
            + q * 4  # its output (the output projection merges its heads again in backward)
            + 2 * I * compute_bytes)  # gate and up (fused.py recomputes the rest of SwiGLU)


def measure_saved_bytes(qs, input_ids: torch.Tensor, thoughts: torch.Tensor, autocast: bool = False) -> tuple[int, int]:
    """What block 0 of a QuietStar learning pass keeps for backward, measured with saved-tensor hooks (the
    check of `saved_bytes_per_token`): -> (bytes, grid tokens). Tensors block 1 keeps too (RoPE's cos and sin)
    and the parameters are left out; the model needs two or more blocks."""
    seen, layer = ({}, {}), [None]
    hooks = []
    for i in (0, 1):
        hooks.append(qs.model.layers[i].register_forward_pre_hook(lambda m, a, i=i: layer.__setitem__(0, i)))
        hooks.append(qs.model.layers[i].register_forward_hook(lambda m, a, o: layer.__setitem__(0, None)))

    def pack(t):
        if layer[0] is not None:
            seen[layer[0]][t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in qs.parameters()}
    try:
        with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=autocast), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            h = qs.grid_hidden(input_ids, thoughts)
    finally:
        for hk in hooks:
            hk.remove()
    own = sum(b for ptr, b in seen[0].items() if ptr not in seen[1] and ptr not in params)
    return own, h.shape[0] * h.shape[1] * h.shape[2]


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GB" if n_bytes >= 2**30 // 10 else f"{n_bytes / 2**20:.1f} MB"


@dataclass(frozen=True)
class CheckpointPlan:
    layers: int  # the first `layers` blocks are recomputed in backward
    peak_bytes: int  # the estimated peak with this plan
    message: str  # one line: what was chosen and why


def checkpoint_plan(cfg, tokens: int, residual_bytes: int, compute_bytes: int, fixed_bytes: int,
                    budget_bytes: int, budget_text: str = "") -> CheckpointPlan:
    """The fewest of the first blocks to checkpoint for the estimated peak of a forward + backward over
    `tokens` tokens to fit `budget_bytes`; when nothing fits, the plan with the lowest peak (the message
    says so).

    peak(k) = fixed + outside + k C + max(n_layers - k, [k > 0]) A: A = a block's saved activations, C = a
    checkpointed block's (its input), `outside` = the embedding output, the final norm's input and output
    and the gradient into it; reached at the end of forward, or while a checkpointed block is recomputed.
    fixed_bytes: what does not scale with tokens (weights, gradients, optimizer state). Checkpointing the
    last block never pays: its activations are needed at once, and recomputing it only adds its input C.
    So at most n_layers - 1 blocks are checkpointed, and a 1-block model never is.
    """
    A = tokens * saved_bytes_per_token(cfg, residual_bytes, compute_bytes)
    C = tokens * cfg.dim * residual_bytes
    base = fixed_bytes + 4 * C
    n = cfg.n_layers
    peak = lambda k: base + k * C + max(n - k, int(k > 0)) * A
    k = next((k for k in range(n) if peak(k) <= budget_bytes), n - 1)
    why = (f"{tokens} tokens x {A / tokens / 1024:.1f} KB per block; estimated peak {_size(peak(0))} without, "
           f"budget {_size(budget_bytes)}{f' ({budget_text})' if budget_text else ''}")
    if k == 0:
        what = "no activation checkpointing"
    else:
        what = f"activation checkpointing on {k} of {n} blocks (estimated peak {_size(peak(k))}"
        what += ", over budget even so)" if peak(k) > budget_bytes else ")"
    return CheckpointPlan(k, peak(k), f"{what}: {why}")


def announced_plan(cfg, tokens: int, residual_bytes: int, compute_bytes: int, fixed_bytes: int,
                   budget_gb: Optional[float], device: torch.device) -> CheckpointPlan:
    """checkpoint_plan against `budget_gb` (None: auto_budget of `device`), its message printed once by rank 0
    (Transformer.checkpointed_layers decides once per call shape)."""
    budget = (int(budget_gb * 2**30), "memory_budget_gb") if budget_gb is not None else auto_budget(device)
    plan = checkpoint_plan(cfg, tokens, residual_bytes, compute_bytes, fixed_bytes, *budget)
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0):  # rank 0 speaks
        print(plan.message, flush=True)
    return plan
