"""RMSNorm, the attention's output projection with the residual add, and the SwiGLU feed-forward as autograd
functions that keep the minimum for backward.

Autograd through the unfused ops keeps every intermediate some op's backward reads: RMSNorm keeps its
(fp32) input, the normalised input and the scaled output, and SwiGLU keeps silu(gate) and the product
silu(gate) * up beside gate and up. In the learning pass these are kept for every token of the thought grid
(B R L of them, docs/thought-grid.md), in every layer. The functions below keep only their inputs (and
RMSNorm's per-row 1/rms) and recompute the rest in backward: a few elementwise ops, and for the
feed-forward one (N, I) product, against 2 d-sized and 2 I-sized tensors per block and token fewer to keep.

Values and gradients are those of the unfused computation (tests/test_fused.py: fp32 and fp64 to rounding,
bf16 within twice the error of the unfused bf16 computation), and autocast sees the same ops: the
normalisation is done in fp32 whatever the input dtype, and the down projection is an ordinary F.linear
in forward, so autocast casts it as it casts nn.Linear. Backward runs outside autocast, so it redoes those
casts explicitly.

Shape legend: N tokens (any leading dims), d model dim, I feed-forward (SwiGLU) width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class RMSNormFunction(torch.autograd.Function):
    """weight * (x / rms(x)), normalised in fp32 (fp64 for fp64 x) and scaled in the input dtype (the Llama
    reference's way).

    Saves x (in its own dtype, not an fp32 copy) and rstd = 1/rms(x) (..., 1) fp32; the normalised input is
    recomputed from them in backward."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):  # x (..., d), weight (d,)
        xf, rstd = _rms_stats(x, eps)  # rstd (..., 1) fp32
        ctx.save_for_backward(x, weight, rstd)
        return _normed(x, rstd, weight, xf)

    @staticmethod
    def backward(ctx, grad):  # grad (..., d)
        x, weight, rstd = ctx.saved_tensors
        return (*_rms_norm_backward(grad, x, weight, rstd, ctx.needs_input_grad[1]), None)


def _rms_norm_backward(grad, x, weight, rstd, grad_weight: bool):
    """(dx, dweight or None) of weight * (x * rstd) given its output gradient (..., d)."""
    x_hat = x.to(rstd.dtype) * rstd  # (..., d) fp32: the normalised input
    grad_w = None
    if grad_weight:
        grad_w = (grad * x_hat.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
    # the unfused graph rounds the gradient of the scaled input to x's dtype before the fp32 part
    g = (grad * weight).to(x.dtype).to(rstd.dtype)  # (..., d)
    # d/dx of x * rstd(x), rstd = (mean(x^2) + eps)^(-1/2): rstd * (g - x_hat * mean(g * x_hat)), in place on
    # the temporaries (both are this function's own)
    grad_x = g.sub_(x_hat.mul_((g * x_hat).mean(-1, keepdim=True))).mul_(rstd)
    return grad_x.to(x.dtype), grad_w


def _rms_stats(x, eps: float):
    """x in fp32 (fp64 for fp64 x) and 1/rms(x) (..., 1)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return xf, torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


def _normed(x, rstd, weight, xf=None):
    """weight * (x * rstd), the product rounded to x's dtype before the scale (the Llama reference's way);
    xf: x already in rstd's dtype. Forward and the recomputations in backward all go through this."""
    return weight * ((x.to(rstd.dtype) if xf is None else xf) * rstd).to(x.dtype)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the projections of x run in: autocast's for an fp32 x under autocast, else x's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if x.dtype == torch.float32 and torch.is_autocast_enabled(dev) else x.dtype


class RMSNormLinearsFunction(torch.autograd.Function):
    """F.linear(y, w_i, b_i) for each projection i that reads y = rms_norm(x) (cast once to the projections'
    dtype): q, k and v after the attention norm, gate and up after the feed-forward norm.

    Saves x and 1/rms(x), as RMSNormFunction does, and not y: each projection's weight gradient needs y, so
    backward recomputes it (a few elementwise ops) instead of keeping one more d-sized tensor per token."""

    @staticmethod
    def forward(ctx, x, norm_weight, eps: float, *weights_and_biases):  # w_1 .. w_n, then b_1 .. b_n (or None)
        n = len(weights_and_biases) // 2
        ws, bs = weights_and_biases[:n], weights_and_biases[n:]
        xf, rstd = _rms_stats(x, eps)
        ctx.dtype = compute_dtype(x)
        y = _normed(x, rstd, norm_weight, xf).to(ctx.dtype)
        ctx.save_for_backward(x, norm_weight, rstd, *ws, *bs)
        return tuple(F.linear(y, w, b) for w, b in zip(ws, bs))  # under autocast as nn.Linear: w, b cast

    @staticmethod
    def backward(ctx, *grads):  # one (..., out_i) per projection, in ctx.dtype
        x, norm_weight, rstd, *wb = ctx.saved_tensors
        grad_x, grad_norm, grad_wb = _norm_linears_backward(grads, x, norm_weight, rstd, wb, ctx.dtype,
                                                            ctx.needs_input_grad[1], ctx.needs_input_grad[3:])
        return (grad_x, grad_norm, None, *grad_wb)


def _norm_linears_backward(grads, x, norm_weight, rstd, wb, dt, grad_norm_weight: bool, needs_wb):
    """Backward of F.linear(y, w_i, b_i) for each projection i, y = rms_norm(x) recomputed in dtype dt:
    -> (dx, dnorm_weight or None, [dw_1 .. dw_n, db_1 .. db_n] (None where not needed or no bias))."""
    n = len(wb) // 2
    y = _normed(x, rstd, norm_weight).to(dt)  # recomputed, as in forward
    y2 = y.reshape(-1, y.shape[-1])
    grad_y, grad_ws, grad_bs = None, [], []
    for i, (g, w, b) in enumerate(zip(grads, wb[:n], wb[n:])):
        g2 = g.reshape(-1, g.shape[-1]).to(dt)
        grad_ws.append((g2.t() @ y2).to(w.dtype) if needs_wb[i] else None)
        grad_bs.append(g2.sum(0).to(b.dtype) if b is not None and needs_wb[n + i] else None)
        part = g.to(dt) @ w.to(dt)  # (..., d)
        grad_y = part if grad_y is None else grad_y.add_(part)
    del y, y2
    grad_x, grad_norm = _rms_norm_backward(grad_y.to(x.dtype), x, norm_weight, rstd, grad_norm_weight)
    return grad_x, grad_norm, grad_ws + grad_bs


class ResidualNormLinearsFunction(torch.autograd.Function):
    """The attention's output projection, the residual add and the feed-forward's norm and projections:
    h = x + wo(o with its heads merged), then F.linear(rms_norm(h), w_i, b_i) for gate and up.
    -> (h, gate, up).

    The unfused graph keeps the head-merged copy of the attention output o (nn.Linear keeps its input for
    the weight gradient) and h (the norm's input), two d-sized tensors per token. This keeps x (the block's
    input, which the attention's norm keeps anyway), o (which the attention's backward keeps anyway) and
    1/rms(h), and backward recomputes h with one (tokens, d) x (d, d) matmul: the output projection again."""

    @staticmethod
    def forward(ctx, x, o, wo, norm_weight, eps: float, *weights_and_biases):
        # x (B, N, d); o (B, H, N, D); wo (d, H D); then w_1 .. w_n, b_1 .. b_n (or None)
        n = len(weights_and_biases) // 2
        ws, bs = weights_and_biases[:n], weights_and_biases[n:]
        ctx.o_dtype = compute_dtype(o)
        h = x + F.linear(_merge_heads(o), wo)  # under autocast as nn.Linear; the add promotes to x's dtype
        hf, rstd = _rms_stats(h, eps)
        ctx.dtype = compute_dtype(h)
        y = _normed(h, rstd, norm_weight, hf).to(ctx.dtype)
        del hf
        ctx.save_for_backward(x, o, wo, norm_weight, rstd, *ws, *bs)
        return (h, *(F.linear(y, w, b) for w, b in zip(ws, bs)))

    @staticmethod
    def backward(ctx, grad_h, *grads):  # grad_h (B, N, d) (the residual path's) or None; one per projection
        x, o, wo, norm_weight, rstd, *wb = ctx.saved_tensors
        B, H, N, D = o.shape
        dt_o = ctx.o_dtype  # autocast's casts of the output projection, redone
        merged = _merge_heads(o).to(dt_o)  # (B, N, H D)
        h = x + F.linear(merged, wo.to(dt_o))  # recomputed by the same op as in forward
        merged = merged.reshape(B * N, H * D)
        grad_hn, grad_norm, grad_wb = _norm_linears_backward(grads, h, norm_weight, rstd, wb, ctx.dtype,
                                                             ctx.needs_input_grad[3], ctx.needs_input_grad[5:])
        del h
        g = grad_hn if grad_h is None else grad_hn.add_(grad_h.to(grad_hn.dtype))  # dL/dh (B, N, d)
        ga = g.to(dt_o).reshape(B * N, -1)  # dL/d(output projection), in the dtype it ran in
        grad_wo = (ga.t() @ merged).to(wo.dtype) if ctx.needs_input_grad[2] else None
        del merged
        grad_o = (ga @ wo.to(dt_o)).view(B, N, H, D).transpose(1, 2).to(o.dtype) if ctx.needs_input_grad[1] else None
        return (g.to(x.dtype), grad_o, grad_wo, grad_norm, None, *grad_wb)


# On CPU, SwiGLU's (tokens, I) work runs in blocks of rows whose temporaries take about this many bytes: a fresh
# (tokens, I) tensor of a learning pass is larger than the sizes malloc reuses (32 MB), so each is mapped anew
# and page-faulted when first written, which can take longer than the elementwise op that fills it (a grid of
# 14,336 tokens: forward 1.3-1.4x, backward 1.2x faster in blocks; bench/bench_swiglu.py). Elsewhere one block.
SWIGLU_BLOCK_BYTES = {"cpu": 1 << 23}


def _block_rows(n_rows: int, width: int, device: torch.device) -> int:
    block = SWIGLU_BLOCK_BYTES.get(device.type)
    return n_rows if block is None else max(1, block // (4 * width))


class SwiGLUDownFunction(torch.autograd.Function):
    """down(silu(gate) * up): the feed-forward after its gate and up projections.

    Saves gate and up (and the down weight, a parameter); silu(gate) and the product are recomputed in
    backward, where the down projection's weight gradient needs the product again. Forward and backward go
    through the rows in blocks (_block_rows): no (tokens, I) temporary, only the outputs."""

    @staticmethod
    def forward(ctx, gate, up, w_down):  # gate, up (..., I); w_down (d, I)
        ctx.save_for_backward(gate, up, w_down)
        I = gate.shape[-1]
        g2, u2 = gate.reshape(-1, I), up.reshape(-1, I)
        N = g2.shape[0]
        rows = ctx.rows = _block_rows(N, I, gate.device)
        if rows >= N:  # under autocast in its dtype, as nn.Linear
            return F.linear(F.silu(gate) * up, w_down)
        out = None
        for r0 in range(0, N, rows):
            r = slice(r0, r0 + rows)
            o = F.linear(F.silu(g2[r]) * u2[r], w_down)
            if out is None:
                out = o.new_empty(N, o.shape[-1])
            out[r] = o
        return out.view(*gate.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad):  # grad (..., d) in the dtype the projection ran in
        gate, up, w_down = ctx.saved_tensors
        dtype = grad.dtype  # autocast's cast of the product and the weight, redone
        I, rows = gate.shape[-1], ctx.rows
        g2, u2, gr = gate.reshape(-1, I), up.reshape(-1, I), grad.reshape(-1, grad.shape[-1])
        N = g2.shape[0]
        w = w_down.to(dtype)
        grad_gate, grad_up = torch.empty_like(g2), torch.empty_like(u2)
        grad_w = None
        if ctx.needs_input_grad[2]:  # summed over the blocks in fp32 (fp64 for fp64)
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            grad_w = torch.zeros(w_down.shape, dtype=acc, device=w_down.device)
        for r0 in range(0, N, rows):
            r = slice(r0, r0 + rows)
            silu = F.silu(g2[r])
            if grad_w is not None:
                prod = (silu * u2[r]).to(dtype)
                if dtype == acc:
                    grad_w.addmm_(gr[r].t(), prod)
                else:  # the matmul in autocast's dtype, as in forward
                    grad_w.add_(gr[r].t() @ prod)
                del prod
            grad_prod = (gr[r] @ w).to(gate.dtype)  # (rows, I)
            torch.mul(grad_prod, silu, out=grad_up[r])
            del silu
            torch.ops.aten.silu_backward.grad_input(grad_prod.mul_(u2[r]), g2[r], grad_input=grad_gate[r])
        grad_w = None if grad_w is None else grad_w.to(w_down.dtype)
        return grad_gate.view(gate.shape), grad_up.view(up.shape), grad_w


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """(..., d) -> (..., d): weight * x / sqrt(mean(x^2) + eps)."""
    return RMSNormFunction.apply(x, weight, eps)


def rms_norm_linears(x: torch.Tensor, norm: "torch.nn.Module", projections) -> tuple:
    """x (..., d) -> (F.linear(y, p.weight, p.bias) for p in projections), y = norm(x) in the projections'
    dtype: norm an RMSNorm (its .weight and .eps), projections nn.Linear modules that all read y."""
    return RMSNormLinearsFunction.apply(x, norm.weight, norm.eps, *[p.weight for p in projections],
                                        *[p.bias for p in projections])


def _merge_heads(o: torch.Tensor) -> torch.Tensor:
    """o (B, H, N, D) -> (B, N, H D): the attention heads side by side, as the output projection reads them."""
    B, H, N, D = o.shape
    return o.transpose(1, 2).reshape(B, N, H * D)


def residual_norm_linears(x: torch.Tensor, o: torch.Tensor, wo: torch.Tensor, norm: "torch.nn.Module",
                          projections) -> tuple:
    """x (B, N, d) the block's input, o (B, H, N, D) its attention output, wo (d, H D) the output projection's
    weight -> (h, *(F.linear(norm(h), p.weight, p.bias) for p in projections)) with h = x + wo(o merged):
    the residual stream after the attention and the feed-forward's gate and up."""
    return ResidualNormLinearsFunction.apply(x, o, wo, norm.weight, norm.eps, *[p.weight for p in projections],
                                             *[p.bias for p in projections])


def swiglu_down(gate: torch.Tensor, up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """gate, up (..., I), w_down (d, I) -> (..., d): F.linear(silu(gate) * up, w_down)."""
    return SwiGLUDownFunction.apply(gate, up, w_down)
