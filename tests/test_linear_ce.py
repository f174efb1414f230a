"""The fused LM-head log-probability sum against plain autograd (log_softmax + gather), fp64."""

import pytest
import torch
import torch.nn.functional as F

from quietstar import linear_ce
from quietstar.linear_ce import linear_logprob_sum, lm_head_chunks, logits_into


def reference(h, weight, targets, coef, temperature):
    logp = F.log_softmax(F.linear(h, weight) / temperature, -1).gather(-1, targets[..., None]).squeeze(-1)
    return (coef * logp).sum(), logp


def inputs(shape=(3, 10), d=16, V=37, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, d, generator=g, dtype=dtype)
    weight = torch.randn(V, d, generator=g, dtype=dtype) * 0.5
    targets = torch.randint(0, V, shape, generator=g)
    coef = torch.randn(shape, generator=g, dtype=dtype)
    coef[0, :3] = 0  # masked tokens
    return h, weight, targets, coef


@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("chunk", [None, 1, 7, 1000])
@pytest.mark.parametrize("vocab_block", [None, 8])  # the logits in one matmul (V < the block) or in ragged blocks
def test_value_logprobs_and_gradients_equal_autograd(temperature, chunk, vocab_block, monkeypatch):
    if vocab_block:
        monkeypatch.setitem(linear_ce.VOCAB_BLOCK, "cpu", vocab_block)
    h, weight, targets, coef = inputs()
    grads = []
    for fn in (reference, lambda *a: linear_logprob_sum(*a, chunk=chunk)):
        hh, ww = h.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, logp = fn(hh, ww, targets, coef, temperature)
        (2.5 * loss).backward()  # an upstream gradient other than 1
        grads.append((loss.detach(), logp.detach(), hh.grad, ww.grad))
    (la, pa, gha, gwa), (lb, pb, ghb, gwb) = grads
    assert pb.shape == targets.shape and pb.dtype == torch.float64
    torch.testing.assert_close(lb, la, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pb, pa, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ghb, gha, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gwb, gwa, rtol=1e-10, atol=1e-12)


def test_only_the_inputs_that_need_it_get_gradients():
    h, weight, targets, coef = inputs()
    hh = h.clone().requires_grad_()
    loss, _ = linear_logprob_sum(hh, weight, targets, coef)
    loss.backward()
    ref_h = h.clone().requires_grad_()
    reference(ref_h, weight, targets, coef, 1.0)[0].backward()
    torch.testing.assert_close(hh.grad, ref_h.grad, rtol=1e-10, atol=1e-12)
    ww = weight.clone().requires_grad_()
    linear_logprob_sum(h, ww, targets, coef)[0].backward()
    assert ww.grad is not None and ww.grad.shape == weight.shape


def test_no_grad_gives_the_same_logprobs():
    h, weight, targets, coef = inputs()
    with torch.no_grad():
        loss, logp = linear_logprob_sum(h.requires_grad_(), weight, targets, coef)
    assert not loss.requires_grad
    torch.testing.assert_close(logp, reference(h.detach(), weight, targets, coef, 1.0)[1], rtol=1e-10, atol=1e-12)


def test_float32_matches_the_float32_pytorch_error():
    h, weight, targets, coef = inputs(shape=(4, 33), d=32, V=500)
    exact = [t.detach() for t in _grads(reference, h, weight, targets, coef)]
    torch_err = [(a - e).abs().max() for a, e in zip(_grads(reference, h.float(), weight.float(), targets, coef.float()), exact)]
    ours_err = [(a - e).abs().max() for a, e in
                zip(_grads(lambda *a: linear_logprob_sum(*a, chunk=16), h.float(), weight.float(), targets, coef.float()), exact)]
    for name, o, t in zip(("dh", "dW"), ours_err, torch_err):
        assert o <= 4 * t + 1e-7, (name, o.item(), t.item())


def _grads(fn, h, weight, targets, coef):
    h, weight = h.clone().requires_grad_(), weight.clone().requires_grad_()
    fn(h, weight, targets, coef, 1.0)[0].backward()
    return h.grad.double(), weight.grad.double()


def test_bad_arguments_are_refused():
    h, weight, targets, coef = inputs()
    with pytest.raises(ValueError, match="coef must not require grad"):
        linear_logprob_sum(h, weight, targets, coef.clone().requires_grad_())
    with pytest.raises(ValueError, match="share their leading dims"):
        linear_logprob_sum(h, weight, targets, coef[:, :-1])


def test_autocast_bf16_runs_the_matmuls_in_bf16_and_stays_close():
    """Under autocast (the GPU training path; CPU autocast here) the matmuls run in bf16, the softmax and
    dW accumulate in fp32: the error is that of bf16 PyTorch on the same computation."""
    h, weight, targets, coef = inputs(shape=(4, 33), d=32, V=500, dtype=torch.float32)
    exact = _grads(reference, h.double(), weight.double(), targets, coef.double())

    def bf16(fn):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _grads(fn, h, weight, targets, coef)

    ours = bf16(lambda *a: linear_logprob_sum(*a, chunk=16))
    torch_bf16 = bf16(reference)
    fp32 = _grads(lambda *a: linear_logprob_sum(*a, chunk=16), h, weight, targets, coef)
    for name, o, t, f, e in zip(("dh", "dW"), ours, torch_bf16, fp32, exact):
        assert (o - e).abs().max() <= 2 * (t - e).abs().max() + 1e-6, name
        assert (o - e).abs().max() > 10 * (f - e).abs().max(), name  # bf16 really was used


@pytest.mark.parametrize("zero_share", [0.5, 0.95, 1.0])
@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_rows_without_weight_skip_gradients_but_keep_logprobs(zero_share, chunk):
    """Rows with coef 0 (REINFORCE's clamped advantages) are reordered past the weighted ones and get no
    gradient matmuls: the log-probs keep the caller's order and every gradient equals autograd's."""
    h, weight, targets, coef = inputs(shape=(4, 9), seed=3)
    g = torch.Generator().manual_seed(1)
    coef[torch.rand(coef.shape, generator=g, dtype=torch.float64) < zero_share] = 0
    grads = []
    for fn in (reference, lambda *a: linear_logprob_sum(*a, chunk=chunk)):
        hh, ww = h.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, logp = fn(hh, ww, targets, coef, 2.0)
        loss.backward()
        grads.append((loss.detach(), logp.detach(), hh.grad, ww.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    assert (grads[1][2][coef == 0] == 0).all()


@pytest.mark.parametrize("zero_share", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_skip_zero_computes_only_the_weighted_rows(zero_share, chunk):
    """skip_zero: rows with coef 0 get no log-prob (NaN) and no work; the weighted rows' log-probs, the sum and
    every gradient equal autograd's."""
    h, weight, targets, coef = inputs(shape=(4, 9), seed=4)
    g = torch.Generator().manual_seed(2)
    coef[torch.rand(coef.shape, generator=g, dtype=torch.float64) < zero_share] = 0
    grads = []
    for fn in (reference, lambda *a: linear_logprob_sum(*a, chunk=chunk, skip_zero=True)):
        hh, ww = h.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, logp = fn(hh, ww, targets, coef, 3.0)
        (1.5 * loss).backward()
        grads.append((loss.detach(), logp.detach(), hh.grad, ww.grad))
    (la, pa, gha, gwa), (lb, pb, ghb, gwb) = grads
    live = coef != 0
    assert pb[~live].isnan().all() and not pb[live].isnan().any()
    torch.testing.assert_close(pb[live], pa[live], rtol=1e-10, atol=1e-12)
    for b, a in ((lb, la), (ghb, gha), (gwb, gwa)):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # no gradient: the same rows, the same values
        _, logp = linear_logprob_sum(h, weight, targets, coef, 3.0, chunk=chunk, skip_zero=True)
    assert torch.equal(logp.isnan(), ~live)


def test_a_shared_logits_buffer_changes_nothing():
    """Calls that share one LogitsBuffer (of another call's size first) give exactly what fresh ones give."""
    from quietstar.linear_ce import LogitsBuffer
    buf = LogitsBuffer()
    for shape, temperature, skip in (((4, 9), 1.0, False), ((2, 30), 3.0, True), ((3, 5), 2.0, False)):
        h, weight, targets, coef = inputs(shape=shape, seed=sum(shape), dtype=torch.float32)
        got, want = [], []
        for out, b in ((got, buf), (want, None)):
            hh, ww = h.clone().requires_grad_(), weight.clone().requires_grad_()
            loss, logp = linear_logprob_sum(hh, ww, targets, coef, temperature, chunk=8, skip_zero=skip, buf=b)
            loss.backward()
            out += [loss.detach(), logp, hh.grad, ww.grad]
        for a, b in zip(got, want):
            assert torch.equal(a.nan_to_num(), b.nan_to_num())
    assert buf.t is not None and buf.t.numel() == 8 * 37  # grown once, to the largest chunk


def test_the_entropy_of_each_weighted_row_comes_from_the_same_pass():
    """entropy=True: the entropy of softmax(h W^T) at each row with a weight (NaN where the weight is 0), to
    fp64 precision, the sum and log-probs unchanged; the plain-logits scoring path gives the same."""
    g = torch.Generator().manual_seed(3)
    h = (3 * torch.randn(70, 12, generator=g, dtype=torch.float64)).requires_grad_()
    W = torch.randn(300, 12, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 300, (70,), generator=g)
    c = torch.rand(70, generator=g, dtype=torch.float64)
    c[::5] = 0
    loss, logp, ent = linear_logprob_sum(h, W, y, c, chunk=16, entropy=True)
    logq = torch.log_softmax(h.detach() @ W.detach().T, -1)
    want = -(logq.exp() * logq).sum(-1)
    live = c != 0
    torch.testing.assert_close(ent[live], want[live], rtol=0, atol=1e-12)
    assert bool(ent[~live].isnan().all())
    loss0, logp0 = linear_logprob_sum(h, W, y, c, chunk=16)
    assert torch.equal(loss, loss0) and torch.equal(logp, logp0)
    with torch.no_grad():  # without gradients too
        torch.testing.assert_close(linear_logprob_sum(h, W, y, c, chunk=16, entropy=True)[2], ent, rtol=0, atol=0,
                                   equal_nan=True)
    with pytest.raises(ValueError, match="temperature 1"):
        linear_logprob_sum(h, W, y, c, temperature=3.0, entropy=True)


def test_a_second_backward_through_the_same_sum_is_refused():
    """The weight gradient is handed to autograd on the first backward (scaled in place, no copy): a second
    backward through the same graph says so instead of returning a wrong gradient."""
    h = torch.randn(6, 4, requires_grad=True)
    W = torch.randn(10, 4, requires_grad=True)
    loss, _ = linear_logprob_sum(h, W, torch.arange(6), torch.full((6,), 0.5))
    (2 * loss).backward(retain_graph=True)
    W_ref = W.detach().clone().requires_grad_()
    (2 * 0.5 * torch.log_softmax(h.detach() @ W_ref.T, -1)[torch.arange(6), torch.arange(6)].sum()).backward()
    torch.testing.assert_close(W.grad, W_ref.grad)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_sums_that_share_one_weight_gradient():
    """WeightGradSum: two sums add their scaled weight gradients into one buffer and attach() hands the total to
    the loss's backward: the gradients equal autograd's on full logits; with no weighted row, a zero gradient;
    a second backward is refused."""
    from quietstar.linear_ce import WeightGradSum

    g = torch.Generator().manual_seed(1)
    h1 = torch.randn(9, 6, generator=g, dtype=torch.float64, requires_grad=True)
    h2 = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(20, 6, generator=g, dtype=torch.float64, requires_grad=True)
    y1, y2 = torch.randint(0, 20, (9,), generator=g), torch.randint(0, 20, (5,), generator=g)
    c1, c2 = torch.rand(9, generator=g, dtype=torch.float64), torch.rand(5, generator=g, dtype=torch.float64)
    acc = WeightGradSum()
    s1, _ = linear_logprob_sum(h1, W, y1, c1, chunk=4, dw_into=acc, dw_scale=-1.0)
    s2, _ = linear_logprob_sum(h2, W, y2, c2, chunk=4, temperature=3.0, dw_into=acc, dw_scale=-7.0)
    loss = -s1 - 7.0 * s2 + acc.attach(W)
    (0.5 * loss).backward(retain_graph=True)
    ref = lambda h, y, c, t: (c * torch.log_softmax(h @ W.T / t, -1)[torch.arange(len(y)), y]).sum()
    want = torch.autograd.grad(0.5 * (-ref(h1, y1, c1, 1.0) - 7.0 * ref(h2, y2, c2, 3.0)), (h1, h2, W))
    for got, w in zip((h1.grad, h2.grad, W.grad), want):
        torch.testing.assert_close(got, w, rtol=1e-12, atol=1e-14)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()
    empty = WeightGradSum()
    s, _ = linear_logprob_sum(h1, W, y1, torch.zeros(9, dtype=torch.float64), dw_into=empty)
    W.grad = None
    (s + empty.attach(W)).backward()
    assert W.grad is not None and not W.grad.any()


@pytest.mark.parametrize("V,block", [(37, 8), (37, 37), (37, 1024), (2500, 1024)])
def test_logits_in_vocabulary_blocks_equal_one_matmul(V, block, monkeypatch):
    """logits_into (the CPU's logits a block of vocabulary columns at a time) and the chunks built on it equal
    h W^T, blocks that do not divide V included (fp32, to rounding)."""
    monkeypatch.setitem(linear_ce.VOCAB_BLOCK, "cpu", block)
    g = torch.Generator().manual_seed(3)
    h, weight = torch.randn(13, 24, generator=g), torch.randn(V, 24, generator=g)
    ref = h @ weight.t()
    torch.testing.assert_close(logits_into(h, weight, torch.full((13, V), float("nan"))), ref)
    got = torch.cat([logits.clone() for _, _, logits in lm_head_chunks(h, weight, chunk=5)])
    torch.testing.assert_close(got, ref)
