"""Data-parallel training on torch.distributed: DDP, or FSDP2 (`fully_shard`) for models that do not fit.

Launch with torchrun; `dist=none` (the default) runs in one process without a process group:

    torchrun --nproc_per_node=8 train.py dist=fsdp model=mistral_7b ...

The process group uses nccl on GPU and gloo on CPU (`dist.backend=auto`). Every rank reads its own slice
of the same global batch (data.SequenceStream), rank 0 alone logs and writes the non-sharded parts of a
checkpoint; FSDP checkpoints are sharded with torch.distributed.checkpoint (checkpoint.py).

FSDP2 wraps each transformer block and then the whole QuietStar module (the root unit holds the
embeddings, final norm, thought embeddings and talk head), so parameters are gathered per block for
each of the rollout's steps and for the learning pass, and resharded after.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as tdist
import torch.nn as nn


@dataclass
class DistInfo:
    kind: str = "none"  # none | ddp | fsdp
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.kind != "none" and tdist.is_available() and tdist.is_initialized()

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()

    def mean(self, values: dict) -> dict:
        """Average a dict of floats over ranks (one all-reduce); unchanged in one process."""
        if not self.active or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self._comm_device())
        tdist.all_reduce(t)
        return {k: float(v) / self.world_size for k, v in zip(keys, t.tolist())}

    def any(self, flag: bool) -> bool:
        """True on every rank if any rank passes True."""
        if not self.active:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self._comm_device())
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def broadcast_object(self, obj):
        if not self.active:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def _comm_device(self) -> torch.device:
        return self.device if tdist.get_backend() == "nccl" else torch.device("cpu")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """train.device -> this rank's device (cuda:<local rank> for `auto`/`cuda` when there is a GPU)."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but CUDA is not available (use train.device=auto or cpu)")
    if name == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(name)


def setup(cfg, device_name: str = "auto") -> DistInfo:
    """Start the process group for dist.kind=ddp|fsdp (under torchrun) and pick this rank's device."""
    if cfg.kind == "none":
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("launched with several processes (WORLD_SIZE > 1) but dist.kind=none; "
                             "pass dist=ddp or dist=fsdp")
        return DistInfo(device=resolve_device(device_name))
    if "RANK" not in os.environ:
        # a single process without torchrun: a world of one, so the same code path runs
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29511"))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    device = resolve_device(device_name, local)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not tdist.is_initialized():
        timeout = datetime.timedelta(seconds=cfg.timeout_s)
        store = attempt_store(world, timeout)
        tdist.init_process_group(backend=backend, timeout=timeout, store=store,
                                 rank=rank if store is not None else -1, world_size=world if store is not None else -1,
                                 device_id=device if device.type == "cuda" else None)
    return DistInfo(cfg.kind, rank, world, local, device)


def restart_count() -> int:
    """How many times torchrun's elastic agent has restarted this group (0 for a first start or no torchrun)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def attempt_store(world: int, timeout: datetime.timedelta):
    """Under torchrun's agent store: the agent's TCPStore with a key prefix of its own for this attempt; None
    elsewhere (init_process_group's env:// then makes the store).

    The agent keeps one store for all the restarts of a group. Without a prefix per attempt, a restarted rank
    can read the peer addresses the previous, dead group left there (gloo connects to a closed port and the
    restart fails, or waits on a peer that will never answer)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = tdist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                           timeout=timeout)
    return tdist.PrefixStore(f"quietstar/attempt_{restart_count()}", store)


def wrap(qs: nn.Module, info: DistInfo, cfg) -> nn.Module:
    """-> the module to call for a training forward: DDP(qs), qs sharded in place by FSDP2, or qs."""
    if info.kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DDP(qs, device_ids=ids, broadcast_buffers=False)  # buffers: constants and the EMA teacher, equal on every rank
    if info.kind == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(info.device.type, (info.world_size,))
        for block in qs.model.layers:
            fully_shard(block, mesh=mesh, reshard_after_forward=cfg.reshard_after_forward)
        fully_shard(qs, mesh=mesh, reshard_after_forward=cfg.reshard_after_forward)
        return qs
    return qs


def no_sync(model: nn.Module, info: DistInfo, sync: bool):
    """Skip the gradient all-reduce on accumulation micro-steps that are not the last one."""
    if sync or info.kind == "none":
        return contextlib.nullcontext()
    if info.kind == "ddp":
        return model.no_sync()
    model.set_requires_gradient_sync(False)  # FSDP2: re-enabled by the next call with sync=True

    @contextlib.contextmanager
    def _restore():
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    return _restore()


def teardown(info: DistInfo) -> None:
    """End the process group: a barrier, then a moment for gloo's worker threads before the group goes.

    A gloo worker thread drops each finished collective, and the tensors a Python caller handed it, a little
    after the caller has gone on; freeing such a tensor takes the GIL. The group's destructor joins that
    thread while holding the GIL, so a process that frees its last reference to the group (the one DDP's
    reducer holds, when train() returns) while the thread still holds the final barrier's work waits forever
    (seen as a restarted rank that finished its steps and never exited). Sleeping releases the GIL."""
    if info.active:
        tdist.barrier()
        time.sleep(0.2)
        tdist.destroy_process_group()
