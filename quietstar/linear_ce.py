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

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

# fp32 logits per chunk: 64 MiB on CPU (about 500 rows at V = 32k: smaller chunks slow the matmuls, larger ones
# add to the peak), 256 MiB on GPU
CHUNK_BYTES = {"cpu": 1 << 26, "cuda": 1 << 28}


# columns of the vocabulary per matmul of the logits on CPU (elsewhere one matmul): 1024 columns of the weight
# stay in cache while every row of the chunk uses them, and the logits come 1.1-1.6x faster than from one
# (rows, d) x (d, V) matmul at V = 32k-49k, d = 256-576, most at few rows (bench/bench_lm_head.py)
VOCAB_BLOCK = {"cpu": 1024}


def logits_into(h: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (c, V) = h (c, d) @ weight (V, d)^T, in blocks of VOCAB_BLOCK columns on CPU. -> out"""
    V, block = weight.shape[0], VOCAB_BLOCK.get(h.device.type)
    if block is None or V <= block:
        return torch.mm(h, weight.t(), out=out)
    for v0 in range(0, V, block):
        torch.mm(h, weight[v0:v0 + block].t(), out=out[:, v0:v0 + block])
    return out


def chunk_rows(device: torch.device, V: int, buffers: int = 1) -> int:
    """Rows per chunk of a vocabulary pass that keeps `buffers` fp32 (rows, V) tensors: CHUNK_BYTES of them."""
    return max(1, CHUNK_BYTES.get(device.type, 1 << 25) // (4 * buffers * V))


class LogitsBuffer:
    """A reusable (rows, V) scratch tensor for the chunked vocabulary passes of one step. A fresh tensor of
    64 MiB costs a page fault per 4 KiB page when first written (on CPU about half the time of the matmul
    that fills it), so the sampler's T - 3 steps share one, and so do the learning pass's two scoring calls.
    It holds its memory until it is dropped."""

    def __init__(self):
        self.t: Optional[torch.Tensor] = None

    def get(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        t = self.t
        if t is None or t.numel() < rows * cols or t.dtype != dtype or t.device != device:
            self.t = t = torch.empty(rows * cols, dtype=dtype, device=device)
        return t[:rows * cols].view(rows, cols)


def lm_head_chunks(h: torch.Tensor, weight: torch.Tensor, chunk: Optional[int] = None,
                   buf: Optional[LogitsBuffer] = None):
    """Yield (c0, c1, logits (c1 - c0, V)) for the rows c0:c1 of h (N, d), `chunk` rows at a time (default
    chunk_rows), without gradient. Without autocast the chunks share one fp32 buffer (`buf`'s, or a new one):
    each chunk's logits are valid until the next one is yielded, and the caller may overwrite them. Under
    autocast each is F.linear's result in autocast's dtype."""
    N, chunk = h.shape[0], chunk or chunk_rows(h.device, weight.shape[0])
    out = None
    if h.dtype == weight.dtype == torch.float32 and not torch.is_autocast_enabled(h.device.type):
        out = (buf or LogitsBuffer()).get(min(chunk, N), weight.shape[0], weight.dtype, h.device)
    for c0 in range(0, N, chunk):
        hc = h[c0:c0 + chunk]
        logits = F.linear(hc, weight) if out is None else logits_into(hc, weight, out[:hc.shape[0]])
        yield c0, c0 + hc.shape[0], logits


class WeightGradSum:
    """One weight gradient for several fused sums of one loss. Each `linear_logprob_sum(..., dw_into=this,
    dw_scale=a)` adds a x its dW into one fp32 (V, d) tensor instead of handing autograd a (V, d) tensor of its
    own, where a is the sum's coefficient in the loss; `attach(weight)` returns a zero to add to the loss,
    whose backward gives the weight that total (times the loss's incoming gradient). So a step holds, scales
    and accumulates one (V, d) gradient instead of one per call (each a fresh 32 MB at V = 32k, d = 256 on
    CPU: page faults). Only for sums that enter the loss linearly with the coefficients given."""

    def __init__(self):
        self.t: Optional[torch.Tensor] = None
        self.written = False

    def buffer(self, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.t is None:
            self.t = torch.empty_like(weight, dtype=dtype)
        return self.t

    def take(self, g: torch.Tensor, dtype: torch.dtype, who: str) -> torch.Tensor:
        """The summed gradient times the incoming gradient g, scaled in place and handed over (no copy): once."""
        dw, self.t = self.t, None
        if dw is None:
            raise RuntimeError(f"{who}: backward ran twice through the same sum (retain_graph); its weight gradient "
                               "is handed over on the first backward. Recompute the sum instead")
        return (dw.mul_(g.to(dw.dtype)) if self.written else dw.zero_()).to(dtype)

    def attach(self, weight: torch.Tensor) -> torch.Tensor:
        """A 0-dim zero to add to the loss: it carries the summed weight gradient back to `weight`."""
        if self.t is None:  # no call computed a weight gradient
            return weight.new_zeros((), dtype=torch.float32)
        return _AttachWeightGrad.apply(weight, self)


class _AttachWeightGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, acc: WeightGradSum):
        ctx.acc, ctx.dtype = acc, weight.dtype
        return acc.t.new_zeros(())

    @staticmethod
    def backward(ctx, g):
        return ctx.acc.take(g, ctx.dtype, "WeightGradSum"), None


class _LinearLogProbSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, coef, temperature: float, chunk: int, grad_h: bool, grad_w: bool,
                skip_zero: bool, buf: Optional[LogitsBuffer], entropy: bool, dw_into: Optional[WeightGradSum],
                dw_scale: float):
        # h (N, d), weight (V, d), targets (N,), coef (N,) -> (sum_t coef_t logp_t, logp (N,), entropy (N,) or None)
        N, V = h.shape[0], weight.shape[0]
        dt = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
        acc = torch.float64 if dt == torch.float64 else torch.float32  # softmax math: fp32, or fp64 given fp64
        grad = grad_h or grad_w
        # With `entropy`, each weighted row's entropy from the gradient matmul's output g = dL/dh = c (W_y - p W):
        # H = lse - sum_v p_v z_v = -log p_y + h . g / c (no extra vocabulary pass).
        dz_rows = grad or entropy  # the rows whose dL/dz is formed
        # A row with coef 0 has dL/dz = 0 exactly: it needs no gradient matmuls, and with skip_zero no log-prob
        # either (NaN there). REINFORCE with clamped advantages zeroes about half its rows. The rows with a
        # weight go first (`order`, gathered a chunk at a time); the rows past n_live get their log-prob only.
        order, n_live = None, N
        if dz_rows or skip_zero:
            live = coef != 0
            live_idx = live.nonzero().squeeze(1)
            n_live = live_idx.numel()
            if n_live < N:
                order = live_idx if skip_zero else torch.cat([live_idx, live.logical_not().nonzero().squeeze(1)])
        M = N if order is None else order.numel()  # rows to compute
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(dt)
            logp = torch.empty(M, dtype=acc, device=h.device)
            ent = torch.full((M,), float("nan"), dtype=acc, device=h.device) if entropy else None
            dh = torch.empty(n_live, h.shape[1], dtype=h.dtype, device=h.device) if grad_h else None
            # fp32 dW: written by the first live chunk (beta = 0 ignores the empty memory), then accumulated; into
            # dw_into's (scaled by dw_scale) when given, else into this sum's own, which backward hands over
            own = WeightGradSum() if grad_w and dw_into is None else None
            dw_sum = dw_into if own is None else own
            alpha = dw_scale if own is None else 1.0
            dw, dw_written = None, False
            if grad_w:
                dw, dw_written = dw_sum.buffer(weight, acc), dw_sum.written
                if dt != acc and not dw_written:  # accumulated by add_ below: from zero
                    dw.zero_()
                    dw_written = True
            z_all = (buf or LogitsBuffer()).get(min(chunk, M), V, acc, h.device)  # one logits buffer, every chunk
            for c0 in range(0, M, chunk):
                c1 = min(M, c0 + chunk)
                rows = slice(c0, c1) if order is None else order[c0:c1]
                hc = h[rows].to(dt)
                if temperature != 1.0:
                    hc = hc / temperature
                y = targets[rows, None]
                z = z_all[:c1 - c0]
                if dt == acc:
                    logits_into(hc, w, z)  # (c, V)
                else:
                    z.copy_(F.linear(hc, w))
                m = z.amax(-1, keepdim=True)
                z_y = z.gather(-1, y)
                z.sub_(m).exp_()
                s = z.sum(-1, keepdim=True)
                logp[c0:c1] = (z_y - m - s.log()).squeeze(-1)
                if not dz_rows or c0 >= n_live:
                    continue
                c1 = min(c1, n_live)  # a chunk that straddles n_live: its dead tail needs no gradient
                cc = coef[rows][:c1 - c0, None].to(acc)
                gz = z[:c1 - c0].mul_(-cc / s[:c1 - c0]).scatter_add_(-1, y[:c1 - c0], cc)  # c (onehot(y) - p): dL/dz
                gz, hc = gz.to(dt), hc[:c1 - c0]
                if grad_h or entropy:
                    g = gz @ w  # (c, d)
                    if entropy:
                        ent[c0:c1] = (hc.to(acc) * g.to(acc)).sum(-1) / cc.squeeze(-1) - logp[c0:c1]
                    if grad_h:
                        dh[c0:c1] = g.to(h.dtype) / temperature
                if grad_w:
                    if gz.dtype == acc:
                        dw.addmm_(gz.t(), hc, beta=1 if dw_written else 0, alpha=alpha)
                    else:
                        dw.add_(gz.t() @ hc, alpha=alpha)
                    dw_written = True
            if grad_w:  # left unwritten (no row with a weight), take() gives a zero gradient
                dw_sum.written = dw_written
            coef_done = coef if order is None else coef[order]
            loss = (coef_done.to(acc) * logp).sum()
            if order is not None:  # back to the callers' row order; rows skipped: NaN
                unorder = lambda t: torch.full((N,), float("nan"), dtype=acc, device=h.device).index_copy_(0, order, t)
                logp = unorder(logp)
                ent = None if ent is None else unorder(ent)
        ctx.n_rows, ctx.w_dtype = N, weight.dtype
        # dW is held on ctx, not saved: backward scales it in place and hands it over (the one (V, d) tensor
        # autograd then accumulates, no copy), so the node's backward runs once (no retain_graph); with dw_into
        # the weight's gradient goes through dw_into.attach instead
        ctx.own = own
        ctx.save_for_backward(dh, None if n_live == N else live_idx)
        if ent is None:
            ctx.mark_non_differentiable(logp)
            return loss, logp
        ctx.mark_non_differentiable(logp, ent)
        return loss, logp, ent

    @staticmethod
    def backward(ctx, g, _g_logp, _g_ent=None):
        dh, live_idx = ctx.saved_tensors
        if dh is not None:
            dh = dh * g.to(dh.dtype)
            if live_idx is not None:  # only the rows with a weight have a gradient
                dh = dh.new_zeros(ctx.n_rows, dh.shape[1]).index_copy_(0, live_idx, dh)
        dw = None if ctx.own is None else ctx.own.take(g, ctx.w_dtype, "linear_logprob_sum")
        return (dh, dw, None, None, None, None, None, None, None, None, None, None, None)


def linear_logprob_sum(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, coef: torch.Tensor,
                       temperature: float = 1.0, chunk: Optional[int] = None, skip_zero: bool = False,
                       buf: Optional[LogitsBuffer] = None, entropy: bool = False,
                       dw_into: Optional[WeightGradSum] = None, dw_scale: float = 1.0):
    """-> (sum_t coef_t * log softmax(h_t W^T / temperature)[targets_t], the log-probs (...,), detached),
    both fp32 (fp64 for fp64 inputs). With skip_zero, rows with coef_t = 0 cost nothing and their log-prob
    is NaN (not computed); otherwise they cost a forward sweep for their log-prob, but no gradient matmuls.
    `buf`: the logits scratch to reuse (default: a new one for this call). With `entropy` (temperature 1),
    a third output: the entropy of softmax(h_t W^T) (...,), detached, at the rows with coef_t != 0 (NaN at
    the others), from the same pass. With `dw_into` (a WeightGradSum), the weight's gradient of dw_scale x the
    sum is added there instead of being returned by this sum's backward: the caller attaches it to the loss.

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
    if entropy and temperature != 1.0:
        raise ValueError(f"linear_logprob_sum: entropy needs temperature 1, got {temperature}")
    V = weight.shape[0]
    chunk = chunk or chunk_rows(h.device, V)
    grad = torch.is_grad_enabled()
    out = _LinearLogProbSum.apply(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1), coef.reshape(-1),
                                  float(temperature), chunk, grad and h.requires_grad, grad and weight.requires_grad,
                                  skip_zero, buf, entropy, dw_into, float(dw_scale))
    return (out[0], *(t.view(shape) for t in out[1:]))


# --------------------------------------------------------------------------------------------------
# distillation: KL(teacher || student) through two LM heads, chunked
#
# Per row t, with teacher logits u = h'_t W'^T, p = softmax(u), student logits z = h_t W^T, q = softmax(z):
#
#     KL_t = sum_v p_v (log p_v - log q_v),        dKL_t/dz = q - p
#
# and a plain NLL term -log q[y_t] (dz = q - onehot(y_t)) shares the pass, so the weighted sum
# sum_t a_t KL_t - b_t log q[y_t] is one vocabulary sweep: dz = (a_t + b_t) q - a_t p - b_t onehot(y_t),
# dz/dh = W, dz/dW = h. The teacher side carries no gradient; neither its logits nor the student's are kept.


class DistillRows(NamedTuple):
    kl: torch.Tensor  # (N,) KL(p_t || q_t), detached
    student_logp: torch.Tensor  # (N,) log q[y_t], detached
    teacher_logp: torch.Tensor  # (N,) log p[y_t], detached


class _LinearKLSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, h_teacher, weight_teacher, targets, coef_kl, coef_nll, chunk: int, grad_h: bool,
                grad_w: bool):
        # h (N, d), weight (V, d), h_teacher (N, d'), weight_teacher (V, d'), targets / coefs (N,)
        N = h.shape[0]
        dt = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
        acc = torch.float64 if dt == torch.float64 else torch.float32
        rows = [torch.empty(N, dtype=acc, device=h.device) for _ in range(3)]  # kl, log q[y], log p[y]
        with torch.autocast(h.device.type, enabled=False):
            w, wt = weight.to(dt), weight_teacher.to(dt)
            dh = torch.empty_like(h) if grad_h else None
            dw = torch.zeros_like(weight, dtype=acc) if grad_w else None
            for c0 in range(0, N, chunk):
                c1 = min(N, c0 + chunk)
                hc, y = h[c0:c1].to(dt), targets[c0:c1, None]
                logp = torch.log_softmax(F.linear(h_teacher[c0:c1].to(dt), wt).to(acc), -1)  # (c, V)
                logq = torch.log_softmax(F.linear(hc, w).to(acc), -1)  # (c, V)
                p = logp.exp()
                rows[0][c0:c1] = (p * (logp - logq)).sum(-1)
                rows[1][c0:c1] = logq.gather(-1, y).squeeze(-1)
                rows[2][c0:c1] = logp.gather(-1, y).squeeze(-1)
                if not (grad_h or grad_w):
                    continue
                a, b = coef_kl[c0:c1, None].to(acc), coef_nll[c0:c1, None].to(acc)
                gz = logq.exp_().mul_(a + b).sub_(a * p).scatter_add_(-1, y, -b).to(dt)  # dL/dz
                if grad_h:
                    dh[c0:c1] = (gz @ w).to(h.dtype)
                if grad_w:
                    dw.add_(gz.t() @ hc)
        ctx.save_for_backward(dh, None if dw is None else dw.to(weight.dtype))
        for r in rows:
            ctx.mark_non_differentiable(r)
        loss = (coef_kl.to(acc) * rows[0]).sum() - (coef_nll.to(acc) * rows[1]).sum()
        return (loss, *rows)

    @staticmethod
    def backward(ctx, g, *_g_rows):
        dh, dw = ctx.saved_tensors
        return (None if dh is None else dh * g.to(dh.dtype), None if dw is None else dw * g.to(dw.dtype),
                None, None, None, None, None, None, None, None)


def linear_kl_sum(h: torch.Tensor, weight: torch.Tensor, h_teacher: torch.Tensor, weight_teacher: torch.Tensor,
                  targets: torch.Tensor, coef_kl: torch.Tensor, coef_nll: Optional[torch.Tensor] = None,
                  chunk: Optional[int] = None):
    """-> (sum_t coef_kl_t KL(p_t || q_t) - coef_nll_t log q_t[targets_t], DistillRows), the sum fp32 (fp64 for
    fp64 inputs), with q = softmax(h W^T) the student's and p = softmax(h_teacher weight_teacher^T) the teacher's
    next-token distribution.

    h (..., d) and weight (V, d) are the student's (the sum is differentiable in both; the gradients are
    computed here, chunk by chunk); h_teacher (..., d') and weight_teacher (V, d') the teacher's, without
    gradient (the same LM-head weight may be passed twice). targets, coef_kl and coef_nll (default 0) are
    (...,) without gradient. Memory for backward: O(tokens * d + V * d); no (tokens, V) tensor is kept.
    """
    shape = targets.shape
    coef_nll = torch.zeros_like(coef_kl) if coef_nll is None else coef_nll
    if h.shape[:-1] != shape or h_teacher.shape[:-1] != shape or coef_kl.shape != shape or coef_nll.shape != shape:
        raise ValueError(f"linear_kl_sum: h {tuple(h.shape)}, h_teacher {tuple(h_teacher.shape)}, targets "
                         f"{tuple(shape)}, coef_kl {tuple(coef_kl.shape)} and coef_nll {tuple(coef_nll.shape)} must "
                         "share their leading dims")
    if weight.shape[0] != weight_teacher.shape[0]:
        raise ValueError(f"linear_kl_sum: student and teacher vocabularies differ ({weight.shape[0]} vs "
                         f"{weight_teacher.shape[0]})")
    if coef_kl.requires_grad or coef_nll.requires_grad:
        raise ValueError("linear_kl_sum: coef_kl and coef_nll must not require grad (detach them)")
    V = weight.shape[0]
    chunk = chunk or chunk_rows(h.device, V, buffers=4)  # ~4 (c, V) buffers live
    grad = torch.is_grad_enabled()
    loss, *rows = _LinearKLSum.apply(h.reshape(-1, h.shape[-1]), weight,
                                     h_teacher.detach().reshape(-1, h_teacher.shape[-1]), weight_teacher.detach(),
                                     targets.reshape(-1), coef_kl.reshape(-1), coef_nll.reshape(-1), chunk,
                                     grad and h.requires_grad, grad and weight.requires_grad)
    return loss, DistillRows(*(r.view(shape) for r in rows))
