"""The `flex` backend (quietstar/flex.py) against the dense oracle, forward and gradients where supported.

On CPU (torch 2.13): FlexAttention's uncompiled path checks the block mask, the layout and GQA, and
`torch.compile(flex_attention)`'s forward runs through inductor's C++ backend (the first run compiles for
about half a minute; later ones load inductor's on-disk cache). FlexAttention has no CPU backward, so the
gradient tests are marked `gpu` (skipped without CUDA). Tolerances as in test_kernels.py (docs/testing.md).
"""

import pytest
import torch

from quietstar import attention
from quietstar.attention import dense_attention, grid_attention
from quietstar.masks import dense_grid_mask, n_grid_rows

flex = pytest.importorskip("quietstar.flex", reason="torch.nn.attention.flex_attention is unavailable")

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


def _inputs(B, H, G, n, S, L, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    R = n_grid_rows(n, S)
    mk = lambda h: torch.randn(B, h, R, L, D, generator=g, dtype=torch.float64).to(DEVICE)
    return mk(H), mk(G), mk(G), mk(H)


def _run(fn, q, k, v, do, dtype, grads=True):
    q, k, v = (x.to(dtype).requires_grad_(grads) for x in (q, k, v))
    out = fn(q, k, v)
    if not grads:
        return [out.double()]
    return [out.double(), *(g.double() for g in torch.autograd.grad(out, (q, k, v), do.to(dtype)))]


def assert_within_baseline(name, got, base, oracle, dtype):
    err = (got - oracle).abs()
    err_base = (base - oracle).abs().max().item()
    bound = 2 * err_base + 2 * torch.finfo(dtype).eps * oracle.abs().max().item()
    assert err.max().item() <= bound, (f"{name}: max abs diff {err.max().item():.3e} (mean {err.mean().item():.3e}) "
                                       f"> bound {bound:.3e}; dense {dtype} max abs diff {err_base:.3e}")


def check_flex(B, H, G, n, S, L, D, lengths=None, docs=None, dtype=torch.float32, compiled=True, grads=True):
    q, k, v, do = _inputs(B, H, G, n, S, L, D)
    lengths = None if lengths is None else torch.as_tensor(lengths, device=DEVICE)
    docs = None if docs is None else torch.as_tensor(docs, device=DEVICE)
    dense = lambda q, k, v: dense_attention(q, k, v, n, lengths, docs)
    oracle = _run(dense, q, k, v, do, torch.float64, grads)
    base = _run(dense, q, k, v, do, dtype, grads)
    got = _run(lambda q, k, v: flex.flex_grid_attention(q, k, v, n, lengths, docs, compiled=compiled),
               q, k, v, do, dtype, grads)
    for name, g_, b_, o_ in zip(("out", "dq", "dk", "dv"), got, base, oracle):
        assert_within_baseline(name, g_, b_, o_, dtype)


def test_block_mask_covers_the_predicate_and_is_cached():
    L, n, S, B = 23, 2, 3, 2
    N = n_grid_rows(n, S) * L
    lengths = torch.tensor([23, 9], device=DEVICE)
    bm = flex.grid_block_mask(L, n, S, B, lengths, device=DEVICE)
    assert flex.grid_block_mask(L, n, S, B, lengths.clone(), device=DEVICE) is bm  # same content: cached
    assert flex.grid_block_mask(L, n, S, B, torch.tensor([23, 10], device=DEVICE), device=DEVICE) is not bm
    dense = dense_grid_mask(L, n, S, lengths, device=DEVICE)  # (B, N, N)
    idx = torch.arange(N, device=DEVICE)
    for b in range(B):  # the mask_mod the kernel evaluates inside partial blocks is the predicate
        got = bm.mask_mod(torch.tensor(b, device=DEVICE), torch.tensor(0, device=DEVICE), idx[:, None], idx[None, :])
        assert torch.equal(got, dense[b])
    # every allowed (query, key) lies in a block the kernel visits
    bs = bm.BLOCK_SIZE[0]
    blocks = bm.to_dense()[:, 0].bool()  # (B, N/bs, N/bs) at block level
    covered = blocks.repeat_interleave(bs, 1).repeat_interleave(bs, 2)[:, :N, :N]
    assert not (dense & ~covered).any()


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("B,H,G,n,S,L,D,lengths,docs", [
    (2, 4, 2, 2, 3, 23, 16, [23, 9], None),
    (1, 3, 1, 1, 4, 17, 32, None, [[0] * 8 + [1] * 9]),
])
def test_flex_forward_matches_dense_uncompiled(B, H, G, n, S, L, D, lengths, docs):
    """FlexAttention's reference path with our block mask, layout and GQA (cheap on CPU)."""
    check_flex(B, H, G, n, S, L, D, lengths, docs, compiled=False, grads=False)


def test_flex_compiled_forward():
    """torch.compile(flex_attention) in fp32 (inductor's C++ kernel on CPU, Triton on CUDA), padding and GQA."""
    with torch.no_grad():
        check_flex(2, 4, 2, 2, 3, 23, 16, [23, 9], grads=False)


@pytest.mark.skipif(CUDA, reason="a CPU-only fact")
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_has_no_cpu_backward():
    """Why the gradient tests below are `gpu` tests: FlexAttention refuses inputs that require grad on CPU.
    Fails once torch gains a CPU backward, which the default suite should then test."""
    q, k, v, do = _inputs(1, 2, 2, 1, 2, 8, 16)
    with pytest.raises(NotImplementedError, match="backward on CPU"):
        _run(lambda q, k, v: flex.flex_grid_attention(q, k, v, 1, compiled=False), q, k, v, do, torch.float32)


@pytest.mark.gpu
def test_flex_grads_match_dense():
    """Compiled forward and backward against the dense oracle's output and gradients, fp32, padding, GQA 2
    and 3. GPU-only: torch 2.13 has no FlexAttention backward on CPU."""
    check_flex(2, 4, 2, 2, 3, 23, 16, [23, 9])
    check_flex(1, 6, 2, 1, 5, 40, 64, [33])


@pytest.mark.gpu
def test_flex_packed_documents_grads_match_dense():
    """Packed documents (doc_ids in the mask_mod), compiled forward and backward. GPU-only, as above."""
    check_flex(1, 3, 1, 1, 4, 17, 32, None, [[0] * 8 + [1] * 9])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flex_realistic_half(dtype):
    """bf16/fp16 at a Mistral-like head dim, compiled, output and gradients. GPU-only, as above."""
    check_flex(1, 8, 2, 2, 4, 256, 128, [200], dtype=dtype)


@pytest.mark.gpu
def test_flex_through_dispatch_point():
    """attention.backend=flex through grid_attention, bf16, output and gradients. GPU-only: the dispatcher
    allows `flex` on CUDA alone."""
    def via(backend):
        def fn(q, k, v):
            with attention.use_backend(backend):
                return grid_attention(q, k, v, 2, lengths)
        return fn

    q, k, v, do = _inputs(2, 4, 2, 2, 3, 32, 64)
    lengths = torch.tensor([32, 20], device=DEVICE)
    oracle = _run(via("dense"), q, k, v, do, torch.float64)
    base = _run(via("dense"), q, k, v, do, torch.bfloat16)
    got = _run(via("flex"), q, k, v, do, torch.bfloat16)
    for name, g_, b_, o_ in zip(("out", "dq", "dk", "dv"), got, base, oracle):
        assert_within_baseline(name, g_, b_, o_, torch.bfloat16)
