"""The grid predicate, the dense oracle, and the split backend against it (forward and all gradients)."""

import pytest
import torch

from quietstar import attention, split
from quietstar.attention import dense_attention, grid_attention
from quietstar.masks import dense_grid_mask, flex_mask_mod, grid_rows, n_grid_rows
from quietstar.split import decode_step_attention, split_attention


def reference_mask(L, S, length):
    """The official construction (docs/official.md): M_0 causal with pad keys blocked, then
    M_s = cat(M_{s-1}, D) with D the diagonal restricted to what M_0 allows. Step-major keys."""
    valid = torch.arange(L) < length
    m0 = torch.tril(torch.ones(L, L, dtype=torch.bool)) & valid[None, :]
    diag = torch.eye(L, dtype=torch.bool) & torch.diag(m0)[None, :]
    full = torch.zeros(S * L, S * L, dtype=torch.bool)
    m = m0
    for s in range(S):
        full[s * L:(s + 1) * L, :(s + 1) * L] = m
        m = torch.cat([m, diag], dim=1)
    return full


@pytest.mark.parametrize("L,S,length", [(3, 3, 3), (5, 4, 3), (7, 1, 7)])
def test_dense_mask_matches_official_construction(L, S, length):
    ours = dense_grid_mask(L, 1, S, torch.tensor([length]))[0]
    theirs = reference_mask(L, S, length)
    # pad queries: the official mask blocks a pad position's own diagonal; ours does too (j < length)
    assert torch.equal(ours, theirs)


def test_grid_rows_and_copies_are_private():
    n, S, L = 2, 3, 4
    step, copy = grid_rows(n, S)
    assert step.tolist() == [0, 1, 2, 1, 2] and copy.tolist() == [-1, 0, 0, 1, 1]
    mask = dense_grid_mask(L, n, S)[0].view(n_grid_rows(n, S), L, n_grid_rows(n, S), L)
    # a copy-1 query never sees a copy-0 branch key, and vice versa
    assert not mask[3:, :, 1:3].any() and not mask[1:3, :, 3:].any()
    # every branch query sees its own text prefix
    for r in range(1, 5):
        assert torch.equal(mask[r, :, 0], torch.tril(torch.ones(L, L, dtype=torch.bool)))


def test_flex_mask_mod_matches_dense():
    L, n, S = 5, 2, 3
    lengths = torch.tensor([5, 3])
    docs = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    mm = flex_mask_mod(L, n, S, lengths, docs)
    N = n_grid_rows(n, S) * L
    idx = torch.arange(N)
    for b in range(2):
        got = mm(torch.tensor(b), torch.tensor(0), idx[:, None], idx[None, :])
        assert torch.equal(got, dense_grid_mask(L, n, S, lengths, docs)[b])


def _qkv(B, H, G, n, S, L, D, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    R = n_grid_rows(n, S)
    mk = lambda h: torch.randn(B, h, R, L, D, generator=g, dtype=dtype).requires_grad_()
    return mk(H), mk(G), mk(G)


@pytest.mark.parametrize("H,G,n,S,L", [(4, 4, 1, 3, 9), (6, 2, 2, 4, 37), (4, 1, 3, 2, 5), (2, 2, 2, 1, 6)])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("tile", [None, 4])  # PyTorch's fused CPU kernels; the tiled path (several tiles, a ragged last one)
def test_split_equals_dense_forward_and_grads(H, G, n, S, L, padded, tile):
    B, D = 2, 8
    q, k, v = _qkv(B, H, G, n, S, L, D)
    lengths = torch.tensor([L, max(1, L // 2)]) if padded else None
    ref = dense_attention(q, k, v, n, lengths)
    out = split_attention(q, k, v, n, lengths, tile=tile)
    grad = torch.randn_like(ref)
    g_ref = torch.autograd.grad((ref * grad).sum(), (q, k, v))
    g_out = torch.autograd.grad((out * grad).sum(), (q, k, v))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    for name, a, b in zip("qkv", g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=f"d{name}")


@pytest.mark.parametrize("tile", [None, 3])
def test_split_equals_dense_with_documents(tile):
    B, H, G, n, S, L, D = 2, 4, 2, 2, 3, 8, 8
    q, k, v = _qkv(B, H, G, n, S, L, D, seed=1)
    docs = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [0, 1, 1, 1, 1, 1, 2, 2]])
    lengths = torch.tensor([8, 6])
    ref = dense_attention(q, k, v, n, lengths, docs)
    out = split_attention(q, k, v, n, lengths, docs, tile=tile)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    g = torch.autograd.grad(out.sum(), (q, k, v))
    g_ref = torch.autograd.grad(ref.sum(), (q, k, v))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("backend", ["split", "dense"])
@pytest.mark.parametrize("padded,docs", [(False, False), (True, False), (True, True)])
def test_text_attention_is_the_grid_text_row(backend, padded, docs):
    """text_attention (the text row's own forward, before the rollout) equals row 0 of the dense grid oracle,
    forward and every gradient (fp64), GQA included."""
    B, H, G, L, D = 2, 4, 2, 8, 8
    q, k, v = _qkv(B, H, G, 2, 3, L, D, seed=5)
    lengths = torch.tensor([8, 5]) if padded else None
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [0, 1, 1, 1, 1, 1, 2, 2]]) if docs else None
    ref = dense_attention(q, k, v, 2, lengths, doc_ids)[:, :, 0]  # row 0 sees only row 0
    with attention.use_backend(backend):
        out = attention.text_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], lengths, doc_ids)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    grad = torch.randn_like(ref)
    for name, a, b in zip("qkv", torch.autograd.grad((out * grad).sum(), (q, k, v)),
                          torch.autograd.grad((ref * grad).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=f"d{name}")


@pytest.mark.parametrize("backend,tile", [("split", None), ("split", 3), ("dense", None)])
@pytest.mark.parametrize("padded,docs", [(False, False), (True, False), (True, True)])
def test_grid_rows_attention_is_the_grid_thought_rows(backend, tile, padded, docs):
    """grid_rows_attention (the thought rows' queries alone, over the whole grid's keys) equals rows 1.. of the
    dense grid oracle, forward and every gradient (fp64): the split backend without the text row's queries
    (fused CPU kernels and the tiled path), the others with zero queries there."""
    B, H, G, n, S, L, D = 2, 4, 2, 2, 3, 8, 8
    q, k, v = _qkv(B, H, G, n, S, L, D, seed=6)
    lengths = torch.tensor([8, 5]) if padded else None
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [0, 1, 1, 1, 1, 1, 2, 2]]) if docs else None
    ref = dense_attention(q, k, v, n, lengths, doc_ids)[:, :, 1:]
    q_rows = q[:, :, 1:].detach().requires_grad_()
    if tile is None:
        with attention.use_backend(backend):
            out = attention.grid_rows_attention(q_rows, k, v, n, lengths, doc_ids)
    else:
        key_ok = None if lengths is None else torch.arange(L)[None] < lengths[:, None]
        out = split._SplitAttention.apply(q_rows, k, v, n, key_ok, doc_ids, tile, True)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    grad = torch.randn_like(ref)
    g_out = torch.autograd.grad((out * grad).sum(), (q_rows, k, v))
    g_ref = torch.autograd.grad((ref * grad).sum(), (q, k, v))
    for name, a, b in zip("qkv", g_out, (g_ref[0][:, :, 1:], *g_ref[1:])):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=f"d{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padded", [False, True])
def test_split_error_is_that_of_pytorch_at_the_same_dtype(padded, dtype):
    """fp32 / bf16 out and grads against fp64, within a small factor of dense PyTorch's own error at that dtype
    (docs/testing.md). In bf16 (what autocast's projections give the attention) the output gradient reaches
    backward in fp32, the output's dtype."""
    q, k, v = _qkv(2, 4, 2, 2, 5, 33, 16, dtype=torch.float32, seed=2)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    lengths = torch.tensor([33, 20]) if padded else None
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(0))

    def run(fn, *t):
        t = [x.detach().requires_grad_() for x in t]
        out = fn(*t, 2, lengths)
        return [out.double()] + [g.double() for g in torch.autograd.grad((out * grad.to(out.dtype)).sum(), t)]

    exact = run(dense_attention, q.double(), k.double(), v.double())
    torch_at_dtype = run(dense_attention, q, k, v)
    ours = run(split_attention, q, k, v)
    assert ours[0].dtype == torch.float64 and split_attention(q, k, v, 2).dtype == torch.float32
    for name, a, b, e in zip(("out", "dq", "dk", "dv"), ours, torch_at_dtype, exact):
        assert (a - e).abs().max() <= 4 * (b - e).abs().max() + 1e-7, (name, (a - e).abs().max(), (b - e).abs().max())


@pytest.mark.parametrize("step", [1, 2, 4])
def test_decode_step_equals_grid_rows(step):
    B, H, G, n, S, L, D = 2, 4, 2, 2, 5, 7, 8
    q, k, v = _qkv(B, H, G, n, S, L, D, seed=3)
    lengths = torch.tensor([7, 4])
    ref = dense_attention(q, k, v, n, lengths)[:, :, 1:].unflatten(2, (n, S - 1))[:, :, :, step - 1]
    branch = lambda t: t[:, :, 1:].unflatten(2, (n, S - 1))[:, :, :, :step]
    qs = q[:, :, 1:].unflatten(2, (n, S - 1))[:, :, :, step - 1]
    with torch.no_grad():
        out = decode_step_attention(qs, k[:, :, 0], v[:, :, 0], branch(k), branch(v), lengths)
    torch.testing.assert_close(out, ref.detach(), rtol=0, atol=1e-10)


def test_dispatch_and_override():
    q, k, v = _qkv(1, 2, 2, 1, 2, 5, 4)
    with attention.use_backend("dense"):
        assert attention.resolve_backend(q.device) == "dense"
        a = grid_attention(q, k, v, 1)
    with attention.use_backend("split"):
        b = grid_attention(q, k, v, 1)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert attention.resolve_backend(torch.device("cpu")) in ("split", "dense")
    with pytest.raises(ValueError, match="attention.backend"):
        with attention.use_backend("nope"):
            pass
