"""An exponential moving average of a model's weights: the no-thought teacher of the RLP reward.

    ema <- tau * ema + (1 - tau) * theta          after every optimizer step (thought.ema_decay = tau)

The averages are buffers, not parameters: the optimizer never sees them and they carry no gradient, but they
are in the state dict, so a checkpoint holds them and a resumed run continues them bitwise. They are kept in
fp32 when the weights are 16-bit (a 1e-3 step of a bf16 weight would round away); the teacher is the model's
own forward with `weights()` swapped in (torch.func.functional_call): no second module.
"""

from __future__ import annotations

import torch
from torch import nn


def _key(name: str) -> str:
    return name.replace(".", "__")  # a buffer's name cannot hold a dot


class EMATeacher(nn.Module):
    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.decay = decay
        for name, p in model.named_parameters():
            self.register_buffer(_key(name), self._stored(p))

    @staticmethod
    def _stored(p: torch.Tensor) -> torch.Tensor:
        p = p.detach()
        return p.float().clone() if p.element_size() < 4 else p.clone()

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """The average restarts at the model's current weights (a new run's teacher is its starting model)."""
        for name, p in model.named_parameters():
            getattr(self, _key(name)).copy_(p.detach())

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step of the average towards the model's weights."""
        avg, cur = [], []
        for name, p in model.named_parameters():
            avg.append(getattr(self, _key(name)))
            cur.append(p.detach().to(avg[-1].dtype))
        torch._foreach_lerp_(avg, cur, 1.0 - self.decay)

    def weights(self, model: nn.Module) -> dict:
        """{parameter name: averaged weight in the parameter's dtype}, for functional_call on `model`."""
        return {name: getattr(self, _key(name)).to(p.dtype) for name, p in model.named_parameters()}
