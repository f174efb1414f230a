"""Thinking where it matters (thought.where): the subset grid of the thinking positions, every backend against
the dense oracle, the selectors, the subset learning pass against the full grid, and generation."""

import os

import pytest
import torch

from quietstar import attention, split
from quietstar.attention import dense_attention, subset_grid_attention
from quietstar.masks import dense_grid_mask, flex_mask_mod, grid_coords, n_grid_rows
from quietstar.split import decode_step_attention


def _qkv(B, H, G, n, S, L, D, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    R = n_grid_rows(n, S)
    mk = lambda h: torch.randn(B, h, R, L, D, generator=g, dtype=dtype)
    return mk(H), mk(G), mk(G)


def _subset(t, positions, n, S):
    """A full-grid tensor (B, h, R, L, D) -> the subset grid's flattened (B, h, L + (R-1) P, D)."""
    B, h, R, L, D = t.shape
    rows = t[:, :, 1:].gather(3, positions[:, None, None, :, None].expand(B, h, R - 1, -1, D))
    return torch.cat([t[:, :, 0], rows.flatten(2, 3)], 2)


def _positions(B, L, P, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(L, generator=g)[:P].sort().values for _ in range(B)])


def test_subset_mask_is_the_full_mask_at_the_thinking_positions():
    L, n, S, P = 7, 2, 3, 3
    lengths, docs = torch.tensor([7, 5]), torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]])
    positions = _positions(2, L, P)
    full = dense_grid_mask(L, n, S, lengths, docs)  # (B, RL, RL)
    sub = dense_grid_mask(L, n, S, lengths, docs, positions=positions)
    R = n_grid_rows(n, S)
    # token t of the subset grid is token idx[b, t] of the full grid
    idx = torch.cat([torch.arange(L)[None].expand(2, L), (torch.arange(1, R)[None, :, None] * L
                                                          + positions[:, None, :]).flatten(1)], 1)
    for b in range(2):
        assert torch.equal(sub[b], full[b][idx[b]][:, idx[b]])
    mm = flex_mask_mod(L, n, S, lengths, docs, positions)
    N = sub.shape[1]
    i = torch.arange(N)
    for b in range(2):
        assert torch.equal(mm(torch.tensor(b), torch.tensor(0), i[:, None], i[None, :]), sub[b])
    step, copy, pos = grid_coords(L, n, S, positions)
    assert step.shape == (N,) and pos.shape == (2, N) and torch.equal(pos[:, L:L + P], positions)


@pytest.mark.parametrize("H,G,n,S,L,P", [(4, 2, 2, 4, 23, 6), (2, 2, 1, 3, 9, 9), (4, 1, 3, 2, 11, 1)])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("docs", [False, True])
def test_subset_split_and_dense_equal_the_full_grid(H, G, n, S, L, P, padded, docs):
    """At the thinking positions the subset grid's output equals the full grid's, and the split backend's
    forward and every gradient equal the dense oracle's on the subset grid (fp64)."""
    B, D = 2, 8
    q, k, v = _qkv(B, H, G, n, S, L, D)
    positions = _positions(B, L, P)
    lengths = torch.tensor([L, max(1, L // 2)]) if padded else None
    doc_ids = (torch.arange(L)[None].expand(B, L) >= torch.tensor([[L // 3], [L // 2]])).long() if docs else None
    full = dense_attention(q, k, v, n, lengths, doc_ids)
    qs, ks, vs = (_subset(t, positions, n, S).requires_grad_() for t in (q, k, v))
    with attention.use_backend("dense"):
        ref = subset_grid_attention(qs, ks, vs, n, S, positions, lengths, doc_ids)
    torch.testing.assert_close(ref, _subset(full, positions, n, S), rtol=0, atol=1e-12)
    with attention.use_backend("split"):
        out = subset_grid_attention(qs, ks, vs, n, S, positions, lengths, doc_ids)
    grad = torch.randn_like(ref)
    g_ref = torch.autograd.grad((ref * grad).sum(), (qs, ks, vs))
    g_out = torch.autograd.grad((out * grad).sum(), (qs, ks, vs))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    for name, a, b in zip("qkv", g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=f"d{name}")


@pytest.mark.parametrize("backend,tile", [("split", None), ("split", 2), ("dense", None)])
@pytest.mark.parametrize("padded,docs", [(False, False), (True, True)])
def test_subset_grid_rows_attention_is_the_subset_grid_branch_rows(backend, tile, padded, docs):
    """subset_grid_rows_attention (the branch rows' queries alone, over the whole subset grid's keys) equals the
    branch rows of the dense oracle on the subset grid, forward and every gradient (fp64)."""
    B, H, G, n, S, L, P, D = 2, 4, 2, 2, 4, 13, 5, 8
    q, k, v = _qkv(B, H, G, n, S, L, D, seed=9)
    positions = _positions(B, L, P, seed=6)
    lengths = torch.tensor([13, 8]) if padded else None
    doc_ids = (torch.arange(L)[None].expand(B, L) >= torch.tensor([[L // 3], [L // 2]])).long() if docs else None
    qs, ks, vs = (_subset(t, positions, n, S).requires_grad_() for t in (q, k, v))
    with attention.use_backend("dense"):
        ref = subset_grid_attention(qs, ks, vs, n, S, positions, lengths, doc_ids)[:, :, L:]
    q_rows = qs[:, :, L:].detach().requires_grad_()
    if tile is None:
        with attention.use_backend(backend):
            out = attention.subset_grid_rows_attention(q_rows, ks, vs, n, S, positions, lengths, doc_ids)
    else:
        key_ok = None if lengths is None else torch.arange(L)[None] < lengths[:, None]
        out = split._SubsetSplitAttention.apply(q_rows, ks, vs, n, S, positions, key_ok, doc_ids, tile, True)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    grad = torch.randn_like(ref)
    g_out = torch.autograd.grad((out * grad).sum(), (q_rows, ks, vs))
    g_ref = torch.autograd.grad((ref * grad).sum(), (qs, ks, vs))
    for name, a, b in zip("qkv", g_out, (g_ref[0][:, :, L:], *g_ref[1:])):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=f"d{name}")


def test_subset_split_tiled_path_equals_dense():
    """The pure-PyTorch prefix path (the one off the CPU), several query tiles."""
    B, H, G, n, S, L, P, D = 2, 4, 2, 2, 3, 13, 5, 8
    q, k, v = _qkv(B, H, G, n, S, L, D, seed=4)
    positions = _positions(B, L, P, seed=1)
    lengths = torch.tensor([13, 8])
    qs, ks, vs = (_subset(t, positions, n, S).requires_grad_() for t in (q, k, v))
    with attention.use_backend("dense"):
        ref = subset_grid_attention(qs, ks, vs, n, S, positions, lengths)
    key_ok = torch.arange(L)[None] < lengths[:, None]
    out = split._SubsetSplitAttention.apply(qs, ks, vs, n, S, positions, key_ok, None, 2, False)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    for a, b in zip(torch.autograd.grad(out.sum(), (qs, ks, vs)), torch.autograd.grad(ref.sum(), (qs, ks, vs))):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_subset_flex_forward_equals_dense():
    """FlexAttention's unfused path (CPU has no FlexAttention backward; compiled and with gradients on CUDA)."""
    from quietstar.flex import flex_grid_attention
    B, H, G, n, S, L, P, D = 2, 4, 2, 2, 3, 17, 5, 16
    q, k, v = _qkv(B, H, G, n, S, L, D, dtype=torch.float32, seed=5)
    positions, lengths = _positions(B, L, P, seed=2), torch.tensor([17, 10])
    qs, ks, vs = (_subset(t, positions, n, S) for t in (q, k, v))
    with attention.use_backend("dense"):
        ref = subset_grid_attention(qs.double(), ks.double(), vs.double(), n, S, positions, lengths)
        base = subset_grid_attention(qs, ks, vs, n, S, positions, lengths).double()
    got = flex_grid_attention(qs, ks, vs, n, lengths, positions=positions, S=S, compiled=False).double()
    assert (got - ref).abs().max() <= 2 * (base - ref).abs().max() + 1e-6


@pytest.mark.gpu
def test_subset_flex_grads_equal_dense_cuda():
    B, H, G, n, S, L, P, D = 2, 4, 2, 2, 4, 64, 16, 64
    dev = torch.device("cuda")
    q, k, v = (t.to(dev) for t in _qkv(B, H, G, n, S, L, D, dtype=torch.float32, seed=6))
    positions, lengths = _positions(B, L, P, seed=3).to(dev), torch.tensor([64, 40], device=dev)
    qs, ks, vs = (_subset(t, positions, n, S).requires_grad_() for t in (q, k, v))
    with attention.use_backend("dense"):
        ref = subset_grid_attention(qs, ks, vs, n, S, positions, lengths)
    with attention.use_backend("flex"):
        out = subset_grid_attention(qs, ks, vs, n, S, positions, lengths)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(torch.autograd.grad(out.sum(), (qs, ks, vs)), torch.autograd.grad(ref.sum(), (qs, ks, vs))):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("B,H,G,n,S,L,P,lengths,docs", [
    (2, 4, 2, 2, 4, 37, 9, [37, 20], False),  # GQA, padding, several text and column tiles
    (1, 2, 2, 1, 3, 20, 20, None, False),  # every position
    (2, 2, 1, 3, 2, 19, 1, [19, 7], True),  # one position, packed documents
])
def test_subset_triton_equals_dense(B, H, G, n, S, L, P, lengths, docs):
    """The fused kernel on the subset grid (the Triton interpreter on CPU), forward and every gradient,
    against the dense oracle: errors within twice those of fp32 PyTorch (docs/testing.md)."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the kernel in the Triton interpreter on CPU tensors (TRITON_INTERPRET=1, set on CPU by conftest); the gpu-marked kernel tests cover CUDA")
    from quietstar.kernels.thought_attention import subset_thought_attention
    D = 16
    q, k, v = _qkv(B, H, G, n, S, L, D, dtype=torch.float32, seed=8)
    positions = _positions(B, L, P, seed=5)
    lengths = None if lengths is None else torch.tensor(lengths)
    doc_ids = (torch.arange(L)[None].expand(B, L) >= torch.tensor([[L // 3]] * B)).long() if docs else None
    qs, ks, vs = (_subset(t, positions, n, S) for t in (q, k, v))
    grad = torch.randn(qs.shape, generator=torch.Generator().manual_seed(1))

    def run(fn, dtype):
        t = [x.to(dtype).requires_grad_() for x in (qs, ks, vs)]
        out = fn(*t)
        return [out.double()] + [g.double() for g in torch.autograd.grad((out * grad.to(dtype)).sum(), t)]

    with attention.use_backend("dense"):
        dense = lambda a, b, c: subset_grid_attention(a, b, c, n, S, positions, lengths, doc_ids)
        exact, base = run(dense, torch.float64), run(dense, torch.float32)
    got = run(lambda a, b, c: subset_thought_attention(a, b, c, n, S, positions, lengths, doc_ids), torch.float32)
    for name, g_, b_, e in zip(("out", "dq", "dk", "dv"), got, base, exact):
        assert (g_ - e).abs().max() <= 2 * (b_ - e).abs().max() + 1e-6, name


@pytest.mark.parametrize("step", [1, 3])
def test_subset_decode_step_equals_the_subset_grid(step):
    B, H, G, n, S, L, P, D = 2, 4, 2, 2, 5, 9, 4, 8
    q, k, v = _qkv(B, H, G, n, S, L, D, seed=7)
    positions, lengths = _positions(B, L, P, seed=4), torch.tensor([9, 5])
    qs, ks, vs = (_subset(t, positions, n, S) for t in (q, k, v))
    with attention.use_backend("dense"):
        ref = subset_grid_attention(qs, ks, vs, n, S, positions, lengths)
    rows = lambda t: t[:, :, L:].unflatten(2, (n, S - 1, P))  # (B, h, n, S-1, P, D)
    with torch.no_grad():
        out = decode_step_attention(rows(qs)[:, :, :, step - 1], ks[:, :, :L], vs[:, :, :L],
                                    rows(ks)[:, :, :, :step], rows(vs)[:, :, :, :step], lengths, positions=positions)
    torch.testing.assert_close(out, rows(ref)[:, :, :, step - 1], rtol=0, atol=1e-10)


# --------------------------------------------------------------------------------------------------
# the layer: selection, the subset learning pass against the full grid, the gate, generation

from quietstar.model import ModelConfig, Transformer  # noqa: E402
from quietstar.methods.quietstar.thinker import QuietStar
from quietstar.methods.quietstar.config import ThoughtConfig  # noqa: E402
from quietstar.methods.quietstar.where import Selection, fires, select  # noqa: E402


def tiny_qs(seed=0, dtype=torch.float32, **cfg):
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_preset("tiny")).to(dtype)
    qs = QuietStar(model, None, ThoughtConfig(**{**dict(n_ahead=5, n_ahead_talk=3, n_thoughts=2), **cfg}))
    with torch.no_grad():  # a talk head that mixes, so talk predictions differ from the base ones
        qs.talk_head.net[4].weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(7))
    return qs


def batch(B=2, L=13, lengths=(13, 8), V=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (B, L), generator=g)
    return x, (torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]).long()


@pytest.mark.parametrize("backend", ["dense", "split"])
def test_subset_grid_hidden_equals_the_full_grid_at_the_thinking_positions(backend):
    qs = tiny_qs(dtype=torch.float64)
    x, mask = batch()
    thoughts = qs.rollout(x, mask, generator=torch.Generator().manual_seed(0))  # (B, n, L, T-3)
    positions = torch.tensor([[0, 3, 4, 9], [1, 2, 5, 7]])
    sub_thoughts = thoughts.gather(2, positions[:, None, :, None].expand(-1, 2, -1, thoughts.shape[-1]))
    with attention.use_backend(backend):
        full = qs.grid_hidden(x, thoughts, mask)  # (B, R, L, d)
        sub = qs.grid_hidden(x, sub_thoughts, mask, positions=positions)
    torch.testing.assert_close(sub.text, full[:, 0], rtol=0, atol=1e-10)
    want = full[:, 1:].gather(2, positions[:, None, :, None].expand(-1, full.shape[1] - 1, -1, full.shape[-1]))
    torch.testing.assert_close(sub.rows, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("backend", ["dense", "split"])
@pytest.mark.parametrize("subset", [False, True])
def test_the_text_row_then_the_thought_rows_is_one_grid_forward(backend, subset):
    """The learning pass runs the text row first (the rollout samples on its K/V) and the thought rows on top of
    it: hidden states and every parameter's gradient equal one forward over the whole (or subset) grid (fp64)."""
    from quietstar.methods.quietstar.thinker import GridPass

    qs = tiny_qs(dtype=torch.float64)
    x, mask = batch()
    lengths = mask.sum(-1)
    thoughts = qs.rollout(x, mask, generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([[0, 3, 4, 9], [1, 2, 5, 7]]) if subset else None
    if subset:
        thoughts = thoughts.gather(2, positions[:, None, :, None].expand(-1, 2, -1, thoughts.shape[-1]))
    sel = None if positions is None else Selection(positions, torch.ones_like(positions, dtype=torch.bool))
    params = list(qs.parameters())
    with attention.use_backend(backend):
        one = GridPass.hidden(qs, x, thoughts, lengths, None, positions)
        one = one if subset else qs.grid(2).states(one.flatten(1, 2), x.shape[1])
        two = GridPass.run(qs, x, lengths, None, None, thoughts, sel).hidden
    w_text, w_rows = torch.randn_like(one.text), torch.randn_like(one.rows)
    grads = [torch.autograd.grad((h.text * w_text).sum() + (h.rows * w_rows).sum(), params, allow_unused=True)
             for h in (one, two)]
    torch.testing.assert_close(two.text, one.text, rtol=0, atol=1e-10)
    torch.testing.assert_close(two.rows, one.rows, rtol=0, atol=1e-10)
    for p, a, b in zip(params, *grads):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("fraction,prescored", [(0.25, True), (0.5, False)])
def test_the_entropy_step_scores_the_base_term_before_choosing(fraction, prescored):
    """where = entropy below a third of the positions: the base NLL's pass gives the entropies that choose the
    positions, and the base weights' change at the thinking positions is scored with the talk terms (above it,
    a separate entropy pass). Either way the step equals the one given the same thoughts and selection (the
    base term scored with the talk terms at its final weights), and the selection is the entropy rule's on the
    text row."""
    x, mask = batch(lengths=(13, 13))
    qs = tiny_qs(dtype=torch.float64, where="entropy", think_fraction=fraction)
    assert qs.prescore_base() is prescored
    out = qs(x, mask, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        h_text = qs.model(x, return_hidden=True)
        want = qs.thinking_positions(h_text, mask.sum(-1))
    assert torch.equal(out.selection.positions, want.positions) and torch.equal(out.selection.valid, want.valid)
    ref = qs(x, mask, thoughts=out.thoughts, selection=out.selection)
    for name in ("loss", "nll", "policy_loss", "ce_base", "ce_talk", "rewards"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), rtol=1e-12, atol=1e-12, msg=name)
    params = list(qs.parameters())
    for a, b in zip(torch.autograd.grad(out.loss, params), torch.autograd.grad(ref.loss, params)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def _all_selected(B, L):
    return Selection(torch.arange(L)[None].expand(B, L).contiguous(), torch.ones(B, L, dtype=torch.bool))


def test_every_position_selected_is_the_all_positions_step():
    """The subset objective at q = 1 is the official one: the same loss and the same gradients."""
    x, mask = batch()
    ref_qs = tiny_qs(dtype=torch.float64)
    thoughts = ref_qs.rollout(x, mask, generator=torch.Generator().manual_seed(1))
    ref = ref_qs(x, mask, thoughts=thoughts)
    qs = tiny_qs(dtype=torch.float64, where="entropy")
    out = qs(x, mask, thoughts=thoughts, selection=_all_selected(*x.shape))
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.rewards, ref.rewards, rtol=0, atol=1e-12)
    g_ref = torch.autograd.grad(ref.loss, list(ref_qs.parameters()))
    g = torch.autograd.grad(out.loss, list(qs.parameters()))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_subset_losses_are_the_full_grids_at_the_thinking_positions():
    """Talk CEs, mixing weights and rewards at the thinking positions equal the full grid's there; the others
    train as plain NLL, and the selection is what the entropy rule picks."""
    x, mask = batch(lengths=(13, 13))
    qs = tiny_qs(dtype=torch.float64, where="entropy", think_fraction=0.4)
    with torch.no_grad():
        h_text = qs.model(x, return_hidden=True)
        sel = qs.thinking_positions(h_text, mask.sum(-1))
        entropy = qs.think_scores(h_text)
    P = sel.positions.shape[1]
    assert P == 6  # ceil(0.4 * 13)
    for b in range(2):  # the highest entropies among positions with a next token
        order = entropy[b, :-1].argsort(descending=True)[:P].sort().values
        assert torch.equal(sel.positions[b], order)
    full_qs = tiny_qs(dtype=torch.float64)
    thoughts = full_qs.rollout(x, mask, generator=torch.Generator().manual_seed(2))
    full = full_qs(x, mask, thoughts=thoughts)
    pos = sel.positions
    sub_thoughts = thoughts.gather(2, pos[:, None, :, None].expand(-1, 2, -1, thoughts.shape[-1]))
    out = qs(x, mask, thoughts=sub_thoughts, selection=sel)
    gather = lambda t: t.gather(-1, pos[:, None, None].expand(*t.shape[:3], P))  # (B, n, K, L) -> (B, n, K, P)
    torch.testing.assert_close(out.ce_talk, gather(full.ce_talk), rtol=0, atol=1e-10)
    torch.testing.assert_close(out.mix_weights, gather(full.mix_weights), rtol=0, atol=1e-10)
    torch.testing.assert_close(out.ce_base, full.ce_base, rtol=0, atol=1e-10)
    torch.testing.assert_close(out.rewards, full.rewards.gather(2, pos[:, None].expand(-1, 2, -1)), rtol=0, atol=1e-10)
    assert out.metrics["thought/think_fraction"].item() == pytest.approx(12 / 24)  # 6 of 12 positions with a target


def test_rollout_at_the_thinking_positions_samples_their_thoughts():
    """The rollout's branches at the thinking positions are those of the full rollout given the same tokens:
    the subset rollout's sampling distributions equal the full grid's rows there."""
    qs = tiny_qs(dtype=torch.float64, where="entropy", think_fraction=0.5)
    x, mask = batch()
    out = qs.next_token_logits(x, mask, torch.Generator().manual_seed(3), n_thoughts=1)
    sel = out.selection
    assert out.mixed.shape[2] == sel.positions.shape[1] == 7
    full_qs = tiny_qs(dtype=torch.float64)
    full_thoughts = torch.zeros(2, 1, x.shape[1], out.thoughts.shape[-1], dtype=torch.long)
    full_thoughts.scatter_(2, sel.positions[:, None, :, None].expand_as(out.thoughts), out.thoughts)
    ref = full_qs.next_token_logits(x, mask, n_thoughts=1, thoughts=full_thoughts)
    torch.testing.assert_close(out.base, ref.base, rtol=0, atol=1e-10)
    want = ref.mixed.gather(2, sel.positions[:, None, :, None].expand(-1, 1, -1, ref.mixed.shape[-1]))
    torch.testing.assert_close(out.mixed, want, rtol=0, atol=1e-10)
    every = out.full()  # the prediction used at each position: mixed where it thought, base elsewhere
    thinking = out.thinking()
    assert thinking.sum().item() == sel.valid.sum().item() == 14
    torch.testing.assert_close(every.mixed[:, 0][thinking], ref.mixed[:, 0][thinking], rtol=0, atol=1e-10)
    torch.testing.assert_close(every.mixed[:, 0][~thinking], out.base[~thinking], rtol=0, atol=0)
    assert bool((every.mix_weight[:, 0][~thinking] == 0).all()) and every.thoughts.shape == full_thoughts.shape


def test_selection_is_deterministic_under_a_seed_and_explores():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 40, generator=g)
    eligible = torch.ones(3, 40, dtype=torch.bool)
    eligible[1, 30:] = False
    a = select(scores, eligible, 0.25, explore=0.4, generator=torch.Generator().manual_seed(5))
    b = select(scores, eligible, 0.25, explore=0.4, generator=torch.Generator().manual_seed(5))
    c = select(scores, eligible, 0.25, explore=0.4, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a.positions, b.positions) and not torch.equal(a.positions, c.positions)
    assert a.positions.shape == (3, 10) and bool(a.valid.all())
    for row in range(3):
        picked = set(a.positions[row].tolist())
        assert len(picked) == 10 and all(eligible[row, p] for p in picked)
        top6 = scores[row].masked_fill(~eligible[row], -1e9).topk(6).indices.tolist()
        assert set(top6) <= picked  # 10 - round(0.4 * 10) slots by score, 4 explored
    # a threshold: each row its own count, filler slots not valid; ties go to the earlier position
    t = select(torch.tensor([[0., 2., 2., 0.], [3., 0., 0., 0.]]), torch.ones(2, 4, dtype=torch.bool), 1.0,
               threshold=1.0)
    assert t.positions.tolist() == [[1, 2], [0, 1]] and t.valid.tolist() == [[True, True], [True, False]]


def test_gate_learns_only_from_its_own_loss():
    x, mask = batch()
    qs = tiny_qs(where="gate", think_fraction=0.5)
    out = qs(x, mask, generator=torch.Generator().manual_seed(0))
    assert "thought/gate_mse" in out.metrics
    gate_params = list(qs.gate.parameters())
    loss = qs.gate_loss(qs.model(x, return_hidden=True), out.selection.positions, out.rewards + 1.0,
                        torch.ones(2, 7, dtype=torch.bool))
    g = torch.autograd.grad(loss, gate_params + [qs.model.layers[0].attention.wq.weight], allow_unused=True)
    assert all(t is not None and t.abs().sum() > 0 for t in g[:-1]) and g[-1] is None
    # a gate step moves its predictions towards the observed rewards
    target = torch.full((2, 2, 7), 0.3)
    opt = torch.optim.SGD(gate_params, lr=0.5)
    h = qs.model(x, return_hidden=True).detach()
    pos, scorable = out.selection.positions, torch.ones(2, 7, dtype=torch.bool)
    before = qs.gate_loss(h, pos, target, scorable)
    for _ in range(20):
        opt.zero_grad()
        qs.gate_loss(h, pos, target, scorable).backward()
        opt.step()
    assert qs.gate_loss(h, pos, target, scorable) < 0.1 * before


def test_fires_is_an_online_top_fraction():
    hist = torch.tensor([[1., 2., 3., 4., float("nan")]])
    assert fires(torch.tensor([3.5]), hist, 0.25).tolist() == [False]  # 1 of 4 above: not fewer than 0.25 * 4
    assert fires(torch.tensor([4.5]), hist, 0.25).tolist() == [True]
    assert fires(torch.tensor([2.5]), hist, 0.5).tolist() == [False] and fires(torch.tensor([3.5]), hist, 0.5).tolist() == [True]
    assert fires(torch.tensor([0.0]), hist[:, 4:], 0.1).tolist() == [True]  # nothing seen yet
    assert fires(torch.tensor([0.0]), hist, 0.5, threshold=-1.0).tolist() == [True]


def test_generation_thinks_only_where_the_selector_fires():
    from quietstar.generate import generate_stream
    x = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    run = lambda qs, think=True: [s for s in generate_stream(qs, x, max_new_tokens=6, think=think,
                                                             generator=torch.Generator().manual_seed(1))]
    never = run(tiny_qs(where="entropy", think_threshold=1e9))
    plain = run(tiny_qs(), think=False)
    assert [int(s.tokens[0]) for s in never] == [int(s.tokens[0]) for s in plain]
    assert all(s.thoughts is None and not s.thinking.any() for s in never)
    always = run(tiny_qs(where="entropy", think_threshold=-1.0))
    every = run(tiny_qs())
    assert [int(s.tokens[0]) for s in always] == [int(s.tokens[0]) for s in every]
    assert all(bool(s.thinking.all()) for s in always)
    some = run(tiny_qs(where="entropy", think_fraction=0.3))
    assert 0 < sum(int(s.thinking[0]) for s in some) < 6


def test_where_config_errors_name_the_field():
    with pytest.raises(ValueError, match="ThoughtConfig.where"):
        ThoughtConfig(where="sometimes")
    with pytest.raises(ValueError, match="think_fraction"):
        ThoughtConfig(where="entropy", think_fraction=0.0)
    with pytest.raises(ValueError, match="impl='grid'"):
        ThoughtConfig(where="gate", impl="sequential_dense")
    qs = tiny_qs(where="entropy")
    x, mask = batch()
    with pytest.raises(ValueError, match="without the selection"):
        qs(x, mask, thoughts=torch.zeros(2, 2, 13, 2, dtype=torch.long))


def test_a_new_run_starts_or_drops_the_gate(tmp_path):
    """init_from: a checkpoint without a gate into a where=gate run keeps the fresh gate (everything else
    loaded); a gate checkpoint into a run without one drops it."""
    from quietstar.checkpoint import init_weights, save_checkpoint
    from quietstar.config import OptimConfig
    from quietstar.optim import build_optimizer

    def ckpt(qs, root):
        opt, sched = build_optimizer(qs, OptimConfig(), max_steps=1)
        return save_checkpoint(root, 1, qs, opt, sched, data_state={}, generator=None, config_yaml="{}\n",
                               tokenizer=None, save_optimizer=False)

    plain, gated = tiny_qs(seed=1), tiny_qs(seed=2, where="gate")
    p_dir, g_dir = ckpt(plain, tmp_path / "a"), ckpt(gated, tmp_path / "b")
    fresh = tiny_qs(seed=3, where="gate")
    gate_before = {k: v.clone() for k, v in fresh.gate.state_dict().items()}
    init_weights(fresh, p_dir)
    assert all(torch.equal(v, gate_before[k]) for k, v in fresh.gate.state_dict().items())
    assert torch.equal(fresh.model.tok_embeddings.weight, plain.model.tok_embeddings.weight)
    no_gate = tiny_qs(seed=4)
    init_weights(no_gate, g_dir)
    assert no_gate.gate is None and torch.equal(no_gate.talk_head.net[4].weight, gated.talk_head.net[4].weight)
