"""The fused thought-grid attention kernel (kernels/thought_attention.py) against its references.

Oracles: kernels/reference.py (dense masked softmax from the grid predicate) and the `dense` backend of
quietstar/attention.py, both in fp64. Tolerances (docs/testing.md): the kernel's error against the fp64
oracle may be at most twice the error of the same computation done by PyTorch at the kernel's dtype
(plus two units in the last place of max|oracle|), for out, lse, dq, dk and dv.

On CPU the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), in fp32,
at small shapes; with CUDA the same tests run compiled, and the bf16/fp16 tests at realistic sizes run too.
"""

import pytest
import torch

from quietstar.kernels import thought_attention as ta
from quietstar.kernels.reference import thought_attention_ref
from quietstar import attention
from quietstar.attention import dense_attention, grid_attention
from quietstar.masks import n_grid_rows

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


def _inputs(B, H, G, n, S, L, D, seed=0, device=DEVICE):
    g = torch.Generator(device="cpu").manual_seed(seed)
    R = n_grid_rows(n, S)
    mk = lambda h: torch.randn(B, h, R, L, D, generator=g, dtype=torch.float64).to(device)
    return mk(H), mk(G), mk(G), mk(H)  # q, k, v, and an upstream gradient dO


def _fwd_bwd(fn, q, k, v, do, dtype):
    """out, lse and (dq, dk, dv) of fn at `dtype`, everything returned in fp64 for comparison."""
    q, k, v = (x.to(dtype).requires_grad_() for x in (q, k, v))
    out, lse = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), do.to(out.dtype))
    return [None if t is None else t.double() for t in (out, lse, *grads)]


def assert_within_baseline(name, got, base, oracle, dtype):
    """max|got - oracle| <= 2 max|base - oracle| + 2 eps(dtype) max|oracle|  (docs/testing.md).

    The second term is two units in the last place of the largest oracle value: it only matters where
    PyTorch happens to be exact to rounding on an element where the kernel's different summation order
    (online softmax, delta = rowsum(dO * O)) is not."""
    finite = torch.isfinite(oracle)
    assert torch.equal(finite, torch.isfinite(got)), f"{name}: non-finite entries differ from the oracle"
    got, base, oracle = (torch.where(finite, t, torch.zeros_like(t)) for t in (got, base, oracle))
    err = (got - oracle).abs()
    err_base = (base - oracle).abs().max().item()
    bound = 2 * err_base + 2 * torch.finfo(dtype).eps * oracle.abs().max().item()
    assert err.max().item() <= bound, (f"{name}: max abs diff {err.max().item():.3e} (mean {err.mean().item():.3e}) "
                                       f"> bound {bound:.3e}; PyTorch {dtype} max abs diff {err_base:.3e}")


def check_kernel(B, H, G, n, S, L, D, lengths=None, dtype=torch.float32, seed=0, doc_ids=None):
    q, k, v, do = _inputs(B, H, G, n, S, L, D, seed)
    if lengths is not None:
        lengths = torch.as_tensor(lengths, device=DEVICE)
    if doc_ids is not None:
        doc_ids = torch.as_tensor(doc_ids, device=DEVICE)
    # the fp64 oracles: the reference and the dense backend agree to rounding
    ref = _fwd_bwd(lambda q, k, v: thought_attention_ref(q, k, v, n, lengths, doc_ids=doc_ids), q, k, v, do,
                   torch.float64)
    dense = _fwd_bwd(lambda q, k, v: (dense_attention(q, k, v, n, lengths, doc_ids), None), q, k, v, do,
                     torch.float64)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ref[:1] + ref[2:], dense[:1] + dense[2:]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=f"reference vs dense oracle: {name}")
    base = _fwd_bwd(lambda q, k, v: thought_attention_ref(q, k, v, n, lengths, compute_dtype=dtype, doc_ids=doc_ids),
                    q, k, v, do, dtype)
    got = _fwd_bwd(lambda q, k, v: ta.thought_attention(q, k, v, n, lengths, return_lse=True, doc_ids=doc_ids),
                   q, k, v, do, dtype)
    for name, g_, b_, r_ in zip(("out", "lse", "dq", "dk", "dv"), got, base, ref):
        assert_within_baseline(name, g_, b_, r_, dtype)


# (B, H, G, n, S, L, D, lengths): odd L, S in {1, 2, 5}, n in {1, 2}, GQA ratios 1, 2, 3, 4, padding
SHAPES = [
    (1, 2, 2, 1, 1, 37, 16, None),  # S = 1: plain causal attention
    (2, 3, 1, 2, 2, 37, 16, [37, 19]),  # GQA 3, padding
    (2, 4, 1, 1, 5, 20, 32, [20, 7]),  # GQA 4, S = 5, padding
    (1, 4, 2, 2, 5, 37, 16, None),  # GQA 2, two copies, 5 steps: R = 9 rows, 3 row tiles
    (1, 2, 2, 2, 2, 24, 64, [13]),  # head dim 64
]


@pytest.mark.parametrize("B,H,G,n,S,L,D,lengths", SHAPES)
def test_kernel_matches_reference_fp32(B, H, G, n, S, L, D, lengths):
    check_kernel(B, H, G, n, S, L, D, lengths)


@pytest.mark.parametrize("tiles", [
    # row-0 key tile wider than the position tile, one row per program, split dk/dv of row 0
    dict(fwd=dict(BLOCK_R=1, BLOCK_P=16, BLOCK_N=32), dq=dict(BLOCK_R=2, BLOCK_P=16, BLOCK_N=32),
         dkdv=dict(BLOCK_N=32, BLOCK_R=1, BLOCK_P=16, nsplit=3), branch=dict(BLOCK_P=32)),
    # position tile wider than the key tile; all rows of the grid in one program
    dict(fwd=dict(BLOCK_R=8, BLOCK_P=32, BLOCK_N=16), dq=dict(BLOCK_R=8, BLOCK_P=32, BLOCK_N=16),
         dkdv=dict(BLOCK_N=16, BLOCK_R=2, BLOCK_P=32, nsplit=2), branch=dict(BLOCK_P=16)),
], ids=["narrow", "wide"])
def test_kernel_other_tilings(tiles):
    with ta.fixed_tiles(**tiles):
        check_kernel(2, 2, 1, 2, 4, 37, 16, lengths=[37, 21], seed=1)


def _docs(L, starts):
    """doc_ids (L,) with documents starting at `starts` (after 0)."""
    return [sum(j >= s for s in starts) for j in range(L)]


@pytest.mark.parametrize("B,H,G,n,S,L,D,lengths,starts", [
    (2, 2, 1, 2, 4, 37, 16, None, ([5, 6, 20, 33], [17])),  # one-token and tile-crossing documents
    (1, 4, 2, 1, 3, 40, 16, [35], ([16, 31],)),  # boundaries on tile edges, padding after the last one
])
def test_kernel_packed_documents_match_the_dense_oracle(B, H, G, n, S, L, D, lengths, starts):
    """Packed documents in the kernel: out, lse and all gradients against the fp64 dense oracle with doc_ids."""
    check_kernel(B, H, G, n, S, L, D, lengths, doc_ids=[_docs(L, s) for s in starts], seed=6)


def test_kernel_packed_documents_other_tilings():
    tiles = dict(fwd=dict(BLOCK_R=1, BLOCK_P=16, BLOCK_N=32), dq=dict(BLOCK_R=2, BLOCK_P=16, BLOCK_N=32),
                 dkdv=dict(BLOCK_N=32, BLOCK_R=1, BLOCK_P=16, nsplit=3), branch=dict(BLOCK_P=32))
    with ta.fixed_tiles(**tiles):
        check_kernel(2, 2, 1, 2, 3, 37, 16, [37, 30], doc_ids=[_docs(37, [9, 30]), _docs(37, [1, 2, 18])], seed=7)


def test_document_bounds():
    start, end = ta.document_bounds(torch.tensor([[0, 0, 1, 2, 2, 2]]))
    assert start.tolist() == [[0, 0, 2, 3, 3, 3]] and end.tolist() == [[2, 2, 3, 6, 6, 6]]


def test_empty_sequence_gives_zero_output_and_gradients():
    """lengths[b] == 0: no key is visible; out = 0, lse = -inf, finite (zero) gradients, like the reference."""
    q, k, v, do = _inputs(2, 2, 1, 1, 3, 17, 16, seed=2)
    lengths = torch.tensor([17, 0], device=DEVICE)
    got = _fwd_bwd(lambda q, k, v: ta.thought_attention(q, k, v, 1, lengths, return_lse=True),
                   q, k, v, do, torch.float32)
    ref = _fwd_bwd(lambda q, k, v: thought_attention_ref(q, k, v, 1, lengths), q, k, v, do, torch.float64)
    out, lse, dq, dk, dv = got
    assert torch.all(out[1] == 0) and torch.all(lse[1] == float("-inf"))
    assert all(torch.all(x[1] == 0) for x in (dq, dk, dv))
    torch.testing.assert_close(out, ref[0], rtol=0, atol=1e-5)


def test_noncontiguous_views_through_the_dispatch_point():
    """q, k, v as views of transposed projections (as in the model), backend `triton` vs `split`, with autograd."""
    B, H, G, n, S, L, D = 2, 4, 2, 2, 3, 19, 16
    R = n_grid_rows(n, S)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, R, L, 32, generator=g).to(DEVICE).requires_grad_()  # (B, R, L, C)
    wq = torch.randn(32, H * D, generator=g).to(DEVICE) / 8
    wkv = torch.randn(32, 2 * G * D, generator=g).to(DEVICE) / 8
    lengths = torch.tensor([L, 11], device=DEVICE)

    def attend(backend):
        q = (x @ wq).view(B, R, L, H, D).permute(0, 3, 1, 2, 4)  # (B, H, R, L, D), non-contiguous
        k, v = (x @ wkv).view(B, R, L, 2, G, D).permute(3, 0, 4, 1, 2, 5).unbind(0)  # (B, G, R, L, D)
        assert not q.is_contiguous() and not k.is_contiguous()
        with attention.use_backend(backend):
            out = grid_attention(q, k, v, n, lengths)
        return out, torch.autograd.grad(out.square().sum(), x)[0]

    out_t, dx_t = attend("triton")
    out_s, dx_s = attend("split")
    torch.testing.assert_close(out_t, out_s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx_t, dx_s, rtol=1e-4, atol=1e-4)


def test_input_validation():
    q, k, v, _ = _inputs(1, 2, 1, 1, 2, 8, 16)
    with pytest.raises(ValueError, match="power of two"):
        ta.thought_attention(q[..., :12].float(), k[..., :12].float(), v[..., :12].float(), 1)
    with pytest.raises(ValueError):
        ta.thought_attention(q.float(), k.float(), v.float(), 3)  # R = 2 rows is not 1 + 3 (S - 1)
    with pytest.raises(ValueError):
        ta.thought_attention(q.float(), k[:, :, :1].float(), v[:, :, :1].float(), 1)


# --------------------------------------------------------------------------------------------------
# compiled, on CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,H,G,n,S,L,D,lengths", SHAPES[1:])
def test_kernel_matches_reference_half(B, H, G, n, S, L, D, lengths, dtype):
    check_kernel(B, H, G, n, S, L, D, lengths, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,H,G,n,S,L,D", [
    (1, 8, 2, 2, 4, 256, 128),  # Mistral-like head dim, GQA 4, R = 7
    (2, 9, 3, 1, 8, 320, 64),  # SmolLM2-like (9 q heads, 3 kv heads), R = 8
])
def test_kernel_realistic_sizes(B, H, G, n, S, L, D, dtype):
    lengths = [L] + [L - 37] * (B - 1)
    check_kernel(B, H, G, n, S, L, D, lengths, dtype=dtype, seed=4)


@pytest.mark.gpu
def test_kernel_long_grid_bf16():
    """S = 16, n = 2 (R = 31 rows), L = 512: the dense oracle holds (R L)^2 = 2.5e8 scores per head."""
    check_kernel(1, 2, 1, 2, 16, 512, 64, [450], dtype=torch.bfloat16, seed=5)
