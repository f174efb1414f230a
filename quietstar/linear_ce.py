"""Linear layer + log-softmax + weighted sum, without keeping a vocabulary-sized tensor.

Every loss term of a Quiet-STaR step is a weighted sum of token log-probabilities under the LM head:

    sum_t  c_t * log softmax(h_t W^T / tau)[y_t]

with weights c_t that carry no gradient (loss masks, 1 / counts, detached advantages). Because the
weights are known when the term is computed, its gradients with respect to h and W can be computed in
the same pass, chunk by chunk, while each chunk's logits are in cache (the fused linear cross-entropy of
Liger-Kernel and of "Cut Your Losses in Large-Vocabulary Language Models", Wijmans et al. 2024). Nothing
of size (tokens, V) is kept for backward and nothing is recomputed: backward only scales the stored
dL/dh (tokens, d) and dL/dW (V, d) by the incoming scalar gradient.

Per chunk, with z = h W^T / tau, p = softmax(z):   d(sum c log p_y)/dz = c (onehot(y) - p),
dz/dh = W / tau, dz/dW = h / tau.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

CHUNK_BYTES = {"cpu": 1 << 25, "cuda": 1 << 28}  # fp32 logits per chunk: 32 MiB on CPU, 256 MiB on GPU


class _LinearLogProbSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, coef, temperature: float, chunk: int, grad_h: bool, grad_w: bool):
        # h (N, d), weight (V, d), targets (N,), coef (N,) -> (sum_t coef_t logp_t, logp (N,))
        N = h.shape[0]
        dt = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
        acc = torch.float64 if dt == torch.float64 else torch.float32  # softmax math: fp32, or fp64 given fp64
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(dt)
            logp = torch.empty(N, dtype=acc, device=h.device)
            dh = torch.empty_like(h) if grad_h else None
            dw = torch.zeros_like(weight, dtype=acc) if grad_w else None
            for c0 in range(0, N, chunk):
                c1 = min(N, c0 + chunk)
                hc = h[c0:c1].to(dt)
                if temperature != 1.0:
                    hc = hc / temperature
                y = targets[c0:c1, None]
                z = F.linear(hc, w).to(acc)  # (c, V)
                m = z.amax(-1, keepdim=True)
                z_y = z.gather(-1, y)
                z.sub_(m).exp_()
                s = z.sum(-1, keepdim=True)
                logp[c0:c1] = (z_y - m - s.log()).squeeze(-1)
                if not (grad_h or grad_w):
                    continue
                cc = coef[c0:c1, None].to(acc)
                z.mul_(-cc / s).scatter_add_(-1, y, cc)  # c (onehot(y) - p): dL/dz
                gz = z.to(dt)
                if grad_h:
                    dh[c0:c1] = (gz @ w).to(h.dtype) / temperature
                if grad_w:
                    dw.add_(gz.t() @ hc)
        ctx.save_for_backward(dh, None if dw is None else dw.to(weight.dtype))
        ctx.mark_non_differentiable(logp)
        return (coef.to(acc) * logp).sum(), logp

    @staticmethod
    def backward(ctx, g, _g_logp):
        dh, dw = ctx.saved_tensors
        return (None if dh is None else dh * g.to(dh.dtype), None if dw is None else dw * g.to(dw.dtype),
                None, None, None, None, None, None)


def linear_logprob_sum(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, coef: torch.Tensor,
                       temperature: float = 1.0, chunk: Optional[int] = None):
    """-> (sum_t coef_t * log softmax(h_t W^T / temperature)[targets_t], the log-probs (...,), detached),
    both fp32 (fp64 for fp64 inputs).

    h (..., d); weight (V, d); targets, coef (...,), coef without gradient. The sum is differentiable in
    h and weight; their gradients are computed here, in chunks of `chunk` rows (default: about
    CHUNK_BYTES of logits), so the call keeps O(tokens * d + V * d) memory for backward whatever V is.
    """
    shape = targets.shape
    if coef.shape != shape or h.shape[:-1] != shape:
        raise ValueError(f"linear_logprob_sum: h {tuple(h.shape)}, targets {tuple(shape)} and coef "
                         f"{tuple(coef.shape)} must share their leading dims")
    if coef.requires_grad:
        raise ValueError("linear_logprob_sum: coef must not require grad (detach it)")
    V = weight.shape[0]
    chunk = chunk or max(1, CHUNK_BYTES.get(h.device.type, 1 << 25) // (4 * V))
    grad = torch.is_grad_enabled()
    loss, logp = _LinearLogProbSum.apply(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1), coef.reshape(-1),
                                         float(temperature), chunk, grad and h.requires_grad,
                                         grad and weight.requires_grad)
    return loss, logp.view(shape)
