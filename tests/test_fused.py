"""The fused RMSNorm, RMSNorm + projections, output projection + residual + norm + projections, and SwiGLU
functions (quietstar/fused.py; SwiGLU in one block of rows and in several) against the unfused PyTorch computation they replace (forward and every gradient; fp32 and fp64 to rounding, gradcheck in fp64, bf16 and bf16 autocast by
the tolerance rule of docs/testing.md), and what a block keeps for backward against model.py's estimate."""

import pytest
import torch
import torch.nn.functional as F

from quietstar import fused
from quietstar.fused import ResidualNormLinearsFunction, RMSNormLinearsFunction, rms_norm, swiglu_down
from quietstar.memory import measure_saved_bytes, saved_bytes_per_token
from quietstar.model import ModelConfig, Transformer
from quietstar.methods.quietstar.thinker import QuietStar
from quietstar.methods.quietstar.config import ThoughtConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def rms_norm_unfused(x, weight, eps):
    xf = x.to(torch.promote_types(x.dtype, torch.float32))  # model.py's norm before fused.py
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def swiglu_down_unfused(gate, up, w_down):
    return F.linear(F.silu(gate) * up, w_down)


def swiglu_down_in_row_blocks(gate, up, w_down):
    """swiglu_down with 4 rows a block: the inputs' 15 rows go in 4, 4, 4 and 3 (backward keeps the split)."""
    saved, fused.SWIGLU_BLOCK_BYTES = fused.SWIGLU_BLOCK_BYTES, {"cpu": 4 * 4 * gate.shape[-1]}
    try:
        assert fused._block_rows(gate[..., 0].numel(), gate.shape[-1], gate.device) == 4 < gate[..., 0].numel()
        return swiglu_down(gate, up, w_down)
    finally:
        fused.SWIGLU_BLOCK_BYTES = saved


def rms_inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(2, 7, 48, generator=g)).to(dtype)  # odd row count, rows of different scale
    w = (0.5 + torch.rand(48, generator=g)).to(dtype)
    return x, w


def swiglu_inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate = (2 * torch.randn(3, 5, 40, generator=g)).to(dtype)
    up = torch.randn(3, 5, 40, generator=g).to(dtype)
    w = (0.2 * torch.randn(24, 40, generator=g)).to(dtype)
    return gate, up, w


def norm_linears(x, w_norm, w1, b1, w2, eps):  # two projections of one norm, the first with a bias
    return torch.cat(RMSNormLinearsFunction.apply(x, w_norm, eps, w1, w2, b1, None), -1)


def norm_linears_unfused(x, w_norm, w1, b1, w2, eps):
    y = rms_norm_unfused(x, w_norm, eps)
    return torch.cat([F.linear(y, w1, b1), F.linear(y, w2)], -1)


def norm_linears_inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, w = rms_inputs(dtype, seed)
    w1, b1, w2 = (0.2 * torch.randn(32, 48, generator=g)), torch.randn(32, generator=g), 0.2 * torch.randn(16, 48, generator=g)
    return x, w, w1.to(dtype), b1.to(dtype), w2.to(dtype)


def residual_norm_linears(x, o, wo, w_norm, w1, b1, w2, eps):  # h, then two projections of norm(h)
    return torch.cat(ResidualNormLinearsFunction.apply(x, o, wo, w_norm, eps, w1, w2, b1, None), -1)


def residual_norm_linears_unfused(x, o, wo, w_norm, w1, b1, w2, eps):  # model.py's block before fused.py
    B, H, N, D = o.shape
    h = x + F.linear(o.transpose(1, 2).reshape(B, N, H * D), wo)
    return torch.cat([h, norm_linears_unfused(h, w_norm, w1, b1, w2, eps)], -1)


def residual_norm_linears_inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    x, w, w1, b1, w2 = norm_linears_inputs(dtype, seed)  # x (2, 7, 48)
    o = torch.randn(2, 4, 7, 6, generator=g)  # (B, H, N, D): 4 heads of 6
    return x, o.to(dtype), (0.2 * torch.randn(48, 24, generator=g)).to(dtype), w, w1, b1, w2


CASES = {"rms_norm": (rms_norm, rms_norm_unfused, rms_inputs, (1e-5,)),
         "residual_norm_linears": (residual_norm_linears, residual_norm_linears_unfused, residual_norm_linears_inputs,
                                   (1e-5,)),
         "swiglu_down": (swiglu_down, swiglu_down_unfused, swiglu_inputs, ()),
         "swiglu_down_row_blocks": (swiglu_down_in_row_blocks, swiglu_down_unfused, swiglu_inputs, ()),
         "rms_norm_linears": (norm_linears, norm_linears_unfused, norm_linears_inputs, (1e-5,))}


def value_and_grads(fn, inputs, extra, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves, *extra)
    out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("name", list(CASES))
def test_equals_the_unfused_computation_in_fp32(name):
    fused, unfused, make, extra = CASES[name]
    inputs = make(torch.float32)
    grad_out = torch.randn(unfused(*inputs, *extra).shape, generator=torch.Generator().manual_seed(5))
    got, want = value_and_grads(fused, inputs, extra, grad_out), value_and_grads(unfused, inputs, extra, grad_out)
    for what, a, b in zip(["out"] + [f"grad {i}" for i in range(len(inputs))], got, want):
        assert a.dtype == b.dtype, what
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} {what}: {m}")


@pytest.mark.parametrize("name", list(CASES))
def test_gradcheck_fp64(name):
    fused, unfused, make, extra = CASES[name]
    inputs = [t.requires_grad_() for t in make(torch.float64)]
    assert torch.autograd.gradcheck(lambda *t: fused(*t, *extra), inputs)
    grad_out = torch.randn(unfused(*inputs, *extra).shape, dtype=torch.float64)
    for a, b in zip(value_and_grads(fused, inputs, extra, grad_out), value_and_grads(unfused, inputs, extra, grad_out)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16", "bf16_autocast"])
@pytest.mark.parametrize("name", list(CASES))
def test_bf16_within_the_unfused_bf16_error(name, autocast):
    """bf16 inputs (or fp32 inputs under CPU bf16 autocast, as the GPU recipe runs): the fused error against
    the fp64 computation is at most twice the unfused bf16 computation's, and every dtype is the same."""
    fused, unfused, make, extra = CASES[name]
    ref_in = make(torch.float64)
    grad_out = torch.randn(unfused(*ref_in, *extra).shape, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(5))
    ref = value_and_grads(unfused, ref_in, extra, grad_out)
    low = make(torch.float32 if autocast else torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        got = value_and_grads(fused, low, extra, grad_out)
        base = value_and_grads(unfused, low, extra, grad_out)
    for i, (g, b, r) in enumerate(zip(got, base, ref)):
        assert g.dtype == b.dtype, i
        assert max_err(g, r) <= 2 * max_err(b, r) + 1e-6, (name, i, max_err(g, r), max_err(b, r))


def saved_per_grid_token(model_cfg, L, autocast=False):
    """(bytes layer 0 keeps for backward, grid tokens) of the learning pass (memory.measure_saved_bytes)."""
    torch.manual_seed(0)
    qs = QuietStar(Transformer(model_cfg), None, ThoughtConfig(n_ahead=5, n_ahead_talk=2, n_thoughts=2))
    x = torch.randint(0, model_cfg.vocab_size, (2, L), generator=torch.Generator().manual_seed(1))
    return measure_saved_bytes(qs, x, qs.rollout(x, generator=torch.Generator().manual_seed(2)), autocast)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_a_block_keeps_what_the_estimate_says(autocast, capsys):
    """Per grid token, layer 0 of the learning pass keeps exactly saved_bytes_per_token: the block's
    input and both norms' 1/rms, q/k/v/out/LSE of the attention, gate and up; nothing else. (The unfused
    norms, projections and SwiGLU kept 3 + 3 + 2 d-sized and 4 I-sized tensors; these keep 1 + 0 + 0 and 2:
    the projections after a norm recompute the normed input, the output projection reads the attention's
    own output, and the feed-forward norm's input is recomputed from the block's input and that output.)"""
    cfg = ModelConfig.from_preset("tiny", dim=64, intermediate_size=96)
    (b1, t1), (b2, t2) = saved_per_grid_token(cfg, 12, autocast), saved_per_grid_token(cfg, 20, autocast)
    per_token = (b2 - b1) / (t2 - t1)  # the weight casts autocast keeps do not grow with tokens
    assert per_token == saved_bytes_per_token(cfg, 4, 2 if autocast else 4)
    # nothing per call besides: under autocast too, fused.py re-casts every projection's weight in backward
    assert b1 - t1 * per_token == 0
    d, I = cfg.dim, cfg.intermediate_size
    if not autocast:  # 4 d-sized + 2 I-sized fp32 tensors (and 1/rms, LSE)
        assert 4 * (4 * d + 2 * I) < per_token < 4 * (4 * d + 2 * I + 16)
