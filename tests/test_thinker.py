"""The Quiet-STaR layer: the grid against literal per-position rollouts, the losses against hand
computation and against the official sequential way, the zero-init invariants, and bad configs."""

import math

import pytest
import torch
import torch.nn.functional as F

from quietstar.attention import use_backend
from quietstar.model import ModelConfig, Transformer
from quietstar.methods.quietstar.thinker import QuietStar, TalkHead
from quietstar.methods.quietstar.config import ThoughtConfig


def tiny_qs(seed=0, **cfg):
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_preset("tiny"))
    defaults = dict(n_ahead=5, n_ahead_talk=3, n_thoughts=2)
    return QuietStar(model, None, ThoughtConfig(**{**defaults, **cfg}))


def batch(B=2, L=11, lengths=(11, 7), V=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (B, L), generator=g)
    mask = (torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]).long()
    return x, mask


def randomize_talk_head(qs, std=0.5, seed=7):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = qs.talk_head.net[4].weight
        w.copy_(torch.randn(w.shape, generator=g) * std)


def naive_grid_logits(qs, x, mask, thoughts):
    """For every (sequence, copy, real position i), literally build x_0..x_i + the branch tokens, with
    positions 0..i then i+1..i+S-1, and run the plain base model causally. -> (B, n, S, L, V), 0 at pads."""
    cfg = qs.cfg
    T, K = cfg.n_ahead, cfg.n_ahead_talk
    B, L = x.shape
    n = thoughts.shape[1]
    S = T + K - 1
    out = torch.zeros(B, n, S, L, qs.model.cfg.vocab_size)
    for b in range(B):
        length = int(mask[b].sum())
        for p in range(n):
            for i in range(length):
                future = [int(x[b, i + k]) if i + k < L else qs.pad_token_id for k in range(1, K)]
                branch = [qs.start_token_id] + thoughts[b, p, i].tolist() + [qs.end_token_id] + future
                ids = torch.tensor(x[b, :i + 1].tolist() + branch)[None]
                with torch.no_grad():
                    logits = qs.model(inputs_embeds=qs.embed(ids))[0]  # positions 0..i+S-1, plain causal
                out[b, p, :, i] = logits[i:]
    return out


@pytest.mark.parametrize("backend", ["split", "dense"])
def test_grid_logits_equal_literal_rollouts_tiny(backend):
    qs = tiny_qs(n_ahead=5, n_ahead_talk=3, n_thoughts=2)
    x, mask = batch()
    thoughts = qs.rollout(x, mask, generator=torch.Generator().manual_seed(0))
    with use_backend(backend), torch.no_grad():
        got = qs.grid_logits(x, thoughts, mask)
    want = naive_grid_logits(qs, x, mask, thoughts)
    real = mask.bool()[:, None, None, :, None]
    assert got.shape == want.shape == (2, 2, 7, 11, 256)
    assert ((got - want).abs() * real).max() <= 1e-4


@pytest.mark.slow
def test_grid_logits_equal_literal_rollouts_smollm2(smollm2):
    model, tok = smollm2
    qs = QuietStar(model, tok, ThoughtConfig(n_ahead=4, n_ahead_talk=2, n_thoughts=1))
    ids = [tok.encode("2 + 3 = 5, so x = 5."), tok.encode("Let y be 7.")]
    L = max(map(len, ids))
    x = torch.tensor([i + [tok.pad_id] * (L - len(i)) for i in ids])
    mask = torch.tensor([[1] * len(i) + [0] * (L - len(i)) for i in ids])
    thoughts = qs.rollout(x, mask, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = qs.grid_logits(x, thoughts, mask)
    want = naive_grid_logits(qs, x, mask, thoughts)
    assert ((got - want).abs() * mask.bool()[:, None, None, :, None]).max() <= 1e-3


def test_rollout_matches_the_grid_and_is_reproducible():
    qs = tiny_qs(n_ahead=6, n_ahead_talk=2, n_thoughts=2, gumbel_temperature=1e-6)  # ~greedy
    x, mask = batch()
    th = qs.rollout(x, mask, generator=torch.Generator().manual_seed(3))
    assert th.shape == (2, 2, 11, 3) and th.dtype == torch.long
    assert int(th.max()) < qs.model.cfg.vocab_size  # never a thought token (or anything past the vocab)
    # the rollout's incremental path samples what the learning pass's grid predicts at each step
    with torch.no_grad():
        z = qs.grid_logits(x, th, mask)  # (B, n, S, L, V)
    greedy = z[:, :, 1:4].argmax(-1).permute(0, 1, 3, 2)  # steps 1..T-3 predict t_1..t_{T-3}
    real = mask.bool()[:, None, :, None].expand_as(th)
    assert torch.equal(th[real], greedy[real])
    # a generator makes sampling reproducible; a different seed gives other thoughts
    qs.cfg.gumbel_temperature = 1.0
    a = qs.rollout(x, mask, generator=torch.Generator().manual_seed(5))
    b = qs.rollout(x, mask, generator=torch.Generator().manual_seed(5))
    c = qs.rollout(x, mask, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_rollout_sampling_in_chunks_is_the_same_sample(monkeypatch):
    """The LM head is applied in chunks of rows during the rollout; the sample and the entropy
    diagnostic do not depend on the chunk size."""
    import quietstar.linear_ce as linear_ce

    qs = tiny_qs(n_ahead=6, n_ahead_talk=2, n_thoughts=2)
    x, mask = batch()
    whole, ent, _ = qs._rollout(x, mask, generator=torch.Generator().manual_seed(4))
    monkeypatch.setitem(linear_ce.CHUNK_BYTES, "cpu", 4 * 256 * 5)  # 5 rows of 256 logits per chunk
    chunked, ent_chunked, _ = qs._rollout(x, mask, generator=torch.Generator().manual_seed(4))
    assert torch.equal(whole, chunked)
    assert ent_chunked.item() == pytest.approx(ent.item(), rel=1e-6) and ent.item() > 0


def test_zero_init_rewards_are_exactly_zero_and_talk_ce_is_shifted_base_ce():
    qs = tiny_qs(n_ahead=5, n_ahead_talk=3, n_thoughts=2)
    x, mask = batch()
    out = qs(x, mask, generator=torch.Generator().manual_seed(0))
    assert torch.all(out.mix_weights == 0)
    assert torch.all(out.rewards == 0) and torch.all(out.advantages == 0)
    assert out.reward.item() == 0.0 and out.policy_loss.item() == 0.0
    K, L = 3, 11
    for b, length in enumerate(mask.sum(-1).tolist()):
        for k in range(K):
            for i in range(length - 1 - k):  # the target x_{i+k+1} is real
                for p in range(2):
                    assert out.ce_talk[b, p, k, i] == out.ce_base[b, i + k]


def hand_losses(qs, x, mask, thoughts, out, z):
    """Straight loops over (b, copy, i, k, m) from the raw grid logits z (B, n, S, L, V) and w."""
    cfg = qs.cfg
    T, K = cfg.n_ahead, cfg.n_ahead_talk
    B, n, S, L, V = z.shape
    lengths = mask.sum(-1).tolist()
    ce = lambda logits, t: -F.log_softmax(logits.double(), -1)[t].item()
    base = [[ce(z[b, 0, 0, i], x[b, i + 1]) for i in range(lengths[b] - 1)] for b in range(B)]
    nll_base = sum(map(sum, base)) / sum(map(len, base))
    talk_means, rewards = [], torch.zeros(B, n, L, dtype=torch.float64)
    for k in range(K):
        tot, cnt = 0.0, 0
        for b in range(B):
            for p in range(n):
                for i in range(lengths[b] - 1 - k):
                    w = out.mix_weights[b, p, k, i].double()
                    mixed = (1 - w) * z[b, p, 0, i + k].double() + w * z[b, p, T - 1 + k, i].double()
                    c = ce(mixed, x[b, i + k + 1])
                    tot, cnt = tot + c, cnt + 1
                    if i + K <= lengths[b] - 1:
                        rewards[b, p, i] += base[b][i + k] - c
        talk_means.append(tot / cnt)
    nll = cfg.base_loss_weight * nll_base + (1 - cfg.base_loss_weight) * sum(talk_means) / K
    adv = (rewards - rewards.mean(1, keepdim=True)).clamp_min(0)
    for b in range(B):
        adv[b, :, max(0, lengths[b] - K):] = 0
    pg, cnt = 0.0, 0
    for b in range(B):
        for p in range(n):
            for i in range(lengths[b] - K):
                lp = [F.log_softmax(z[b, p, m, i].double() / cfg.policy_temperature, -1)[thoughts[b, p, i, m - 1]].item()
                      for m in range(1, T - 2)]
                pg += -adv[b, p, i].item() * sum(lp) / len(lp)
                cnt += 1
    return nll, rewards, adv, pg / cnt


def test_loss_index_alignment_by_hand():
    qs = tiny_qs(n_ahead=5, n_ahead_talk=3, n_thoughts=2, policy_temperature=3.0, policy_weight=10.0)
    randomize_talk_head(qs)
    x, mask = batch(L=9, lengths=(9, 6))
    thoughts = qs.rollout(x, mask, generator=torch.Generator().manual_seed(1))
    out = qs(x, mask, thoughts=thoughts)
    with torch.no_grad():
        z = qs.grid_logits(x, thoughts, mask)
    nll, rewards, adv, pg = hand_losses(qs, x, mask, thoughts, out, z)
    assert out.nll.item() == pytest.approx(nll, abs=1e-5)
    torch.testing.assert_close(out.rewards.double(), rewards, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.advantages.double(), adv, atol=1e-5, rtol=0)
    assert (adv > 0).any(), "the test needs some positive advantages"
    assert out.policy_loss.item() == pytest.approx(pg, abs=1e-6)
    assert out.loss.item() == pytest.approx(nll + 10.0 * pg, abs=1e-4)


def test_reference_quirks_change_what_they_say():
    x, mask = batch(L=10, lengths=(10, 6))
    fixed = tiny_qs(n_ahead=4, n_ahead_talk=2)
    ref = tiny_qs(n_ahead=4, n_ahead_talk=2, reward_drop_last_position=True, policy_mean_over_padding=True)
    for qs in (fixed, ref):
        randomize_talk_head(qs)
    th = fixed.rollout(x, mask, generator=torch.Generator().manual_seed(0))
    a, b = fixed(x, mask, thoughts=th), ref(x, mask, thoughts=th)
    L, K = 10, 2
    # fixed: scorable up to i = len-1-K; official: i <= L-2-K, so the last full position (b=0, i=7) is dropped
    assert (a.rewards[0, :, L - 1 - K] != 0).any() and (b.rewards[0, :, L - 1 - K] == 0).all()
    # official keeps partially padded positions with the pad terms zeroed (b=1, len 6: i = 4 sees one real target)
    assert (b.rewards[1, :, 4] != 0).any() and (a.rewards[1, :, 4] == 0).all()
    # official policy mean divides by every (row, position) of the window
    pg_sum = -(b.advantages[..., None] * b.thought_logprobs.nan_to_num(0.0)).mean(-1).sum()  # NaN: weight 0
    assert b.policy_loss.item() == pytest.approx(pg_sum.item() / (2 * 2 * (L - 1 - K)), rel=1e-5)


@pytest.mark.parametrize("n", [1, 2])
def test_gradients_equal_the_sequential_dense_way(n):
    qs = tiny_qs(n_ahead=5, n_ahead_talk=3, n_thoughts=n, policy_weight=3.0)
    randomize_talk_head(qs)
    x, mask = batch(L=9, lengths=(9, 7))
    thoughts = qs.rollout(x, mask, generator=torch.Generator().manual_seed(2))
    grads = {}
    for impl in ("grid", "sequential_dense"):
        qs.cfg.impl = impl
        qs.zero_grad()
        out = qs(x, mask, thoughts=thoughts)
        out.loss.backward()
        grads[impl] = (out.loss.detach(), {k: p.grad.clone() for k, p in qs.named_parameters()})
    (la, ga), (lb, gb) = grads["grid"], grads["sequential_dense"]
    assert la.item() == pytest.approx(lb.item(), abs=1e-5)
    if n > 1:
        assert out.policy_loss.item() > 0, "the policy term should be active"
    for name in ga:
        scale = gb[name].abs().max().item() + 1e-8
        assert (ga[name] - gb[name]).abs().max().item() <= 1e-4 * scale + 1e-7, name


def unfused_loss(qs, x, mask, thoughts):
    """The whole loss written with plain autograd ops (log_softmax + gather on full logits), vectorised."""
    cfg = qs.cfg
    T, K = cfg.n_ahead, cfg.n_ahead_talk
    h = qs.grid_hidden(x, thoughts, mask)
    B, R, L, d = h.shape
    n = thoughts.shape[1]
    W = qs.model.lm_head_weight
    lp = lambda hh, t, tau=1.0: F.log_softmax(F.linear(hh, W) / tau, -1).gather(-1, t[..., None]).squeeze(-1)
    h0, hb = h[:, 0], h[:, 1:].view(B, n, -1, L, d)
    lengths, i, xp = mask.sum(-1), torch.arange(L), F.pad(x, (0, K + 1))
    real = lambda k: ((i + k + 1)[None] < lengths[:, None]).double()  # (B, L)
    ce0 = -lp(h0, xp[:, 1:L + 1])
    nll_base = (ce0 * real(0)).sum() / real(0).sum()
    talk, reward = [], 0
    for k in range(K):
        at = (i + k).clamp(max=L - 1)
        hm, _ = qs.mix(h0[:, at][:, None].expand(B, n, L, d), hb[:, :, T - 2 + k])
        ce = -lp(hm, xp[:, k + 1:k + 1 + L][:, None].expand(B, n, L))
        ok = real(k)[:, None]
        talk.append((ce * ok).sum() / ok.expand(B, n, L).sum())
        reward = reward + (ce0[:, at][:, None] - ce).detach() * ok
    scorable = ((i + K)[None] <= lengths[:, None] - 1)[:, None].double()
    reward = reward * scorable
    adv = (reward - reward.mean(1, keepdim=True)).clamp_min(0) * scorable
    logp = lp(hb[:, :, :T - 3].permute(0, 1, 3, 2, 4), thoughts, cfg.policy_temperature)
    policy = -(adv[..., None] * logp).mean(-1).sum() / scorable.expand(B, n, L).sum()
    nll = cfg.base_loss_weight * nll_base + (1 - cfg.base_loss_weight) * torch.stack(talk).mean()
    return nll + cfg.policy_weight * policy


def test_fused_loss_gradients_equal_plain_autograd():
    qs = tiny_qs(n_ahead=6, n_ahead_talk=3, n_thoughts=2, policy_weight=3.0).double()
    randomize_talk_head(qs)
    x, mask = batch(L=9, lengths=(9, 6))
    thoughts = qs.rollout(x, mask, generator=torch.Generator().manual_seed(3))
    grads = []
    for fn in (lambda: qs(x, mask, thoughts=thoughts).loss, lambda: unfused_loss(qs, x, mask, thoughts)):
        qs.zero_grad()
        loss = fn()
        loss.backward()
        grads.append((loss.item(), {k: p.grad.clone() for k, p in qs.named_parameters()}))
    (la, ga), (lb, gb) = grads
    assert la == pytest.approx(lb, rel=1e-12)
    assert qs(x, mask, thoughts=thoughts).policy_loss.item() > 0, "the policy term should be active"
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-9, atol=1e-12, msg=name)


def test_thought_embeddings_init_once_and_survive_reload():
    qs = tiny_qs()
    e0 = qs.model.tok_embeddings.weight[0].detach()
    assert torch.equal(qs.start_embedding * 100.0, e0 * 1.0) or torch.allclose(qs.start_embedding * 100, e0)
    ids = torch.tensor([[3, qs.start_token_id, qs.end_token_id]])
    emb = qs.embed(ids)[0]
    assert torch.equal(emb[0], qs.model.tok_embeddings.weight[3])
    assert torch.allclose(emb[1], 100 * qs.start_embedding) and torch.allclose(emb[2], 100 * qs.end_embedding)
    with torch.no_grad():
        qs.start_embedding.add_(1.0)
        qs.talk_head.net[4].weight.add_(0.5)
    state = qs.state_dict()
    fresh = tiny_qs(seed=1)
    fresh.load_state_dict(state)
    x, mask = batch()
    fresh(x, mask, generator=torch.Generator().manual_seed(0))  # a forward must not re-initialise anything
    assert torch.equal(fresh.start_embedding, qs.start_embedding)
    assert torch.equal(fresh.talk_head.net[4].weight, qs.talk_head.net[4].weight)
    assert set(k for k in state if not k.startswith("model.")) == {
        "start_embedding", "end_embedding", *[f"talk_head.{k}" for k in qs.talk_head.state_dict()]}


def test_talk_head_shape_and_zero_init():
    head = TalkHead(8)
    assert head(torch.randn(3, 5, 8), torch.randn(3, 5, 8)).shape == (3, 5)
    assert torch.all(head(torch.randn(4, 8), torch.randn(4, 8)) == 0)
    assert sum(p.numel() for p in head.parameters()) == 2 * 8 * 8 + 8 + 8 * 8 + 8 + 8


def test_diagnostics_are_reported():
    qs = tiny_qs()
    randomize_talk_head(qs)
    x, mask = batch()
    out = qs(x, mask, generator=torch.Generator().manual_seed(0))
    for key in ("thought/reward_mean", "thought/reward_max", "thought/advantage_pos_frac",
                "thought/mix_weight_abs_mean", "thought/entropy_first_token", "thought/distinct_token_ratio",
                "thought/policy_term", "train/nll"):
        assert key in out.metrics and math.isfinite(out.metrics[key]), key
    assert 0 < out.metrics["thought/distinct_token_ratio"] <= 1
    assert out.metrics["thought/entropy_first_token"] > 0


@pytest.mark.parametrize("field,value", [("n_ahead", 2), ("n_ahead_talk", 0), ("n_thoughts", 0),
                                         ("gumbel_temperature", 0.0), ("impl", "fast")])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ThoughtConfig(**{field: value})


def test_sequence_shorter_than_talk_steps_is_refused():
    qs = tiny_qs(n_ahead_talk=3)
    with pytest.raises(ValueError, match="n_ahead_talk"):
        qs(torch.randint(0, 256, (1, 3)))
    with pytest.raises(ValueError, match="attention_mask"):
        qs(torch.randint(0, 256, (1, 8)), attention_mask=torch.ones(1, 7))


def test_reference_preset():
    ref = ThoughtConfig.reference()
    assert (ref.n_ahead, ref.n_ahead_talk, ref.n_thoughts, ref.policy_weight, ref.policy_temperature) == (12, 4, 2, 1e6, 3.0)
    assert ref.reward_drop_last_position and ref.policy_mean_over_padding and not ref.mix_sigmoid
    assert ref.n_grid_steps == 15


@pytest.mark.slow
def test_a_few_optimizer_steps_on_smollm2(smollm2):
    model, tok = smollm2
    text = ("Q: A farmer has 12 cows and buys 7 more. How many cows? A: 12 + 7 = 19. "
            "Q: If x + 4 = 10, what is x? A: x = 10 - 4 = 6.")
    ids = torch.tensor([tok.encode(text)[:24]])
    qs = QuietStar(model, tok, ThoughtConfig(n_ahead=4, n_ahead_talk=2, n_thoughts=2, policy_weight=1.0))
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    head_before = qs.talk_head.net[4].weight.detach().clone()
    emb_before = qs.start_embedding.detach().clone()
    opt = torch.optim.AdamW([p for p in qs.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    losses = []
    try:
        for _ in range(2):
            out = qs(ids, generator=g)
            assert torch.isfinite(out.loss)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            losses.append(out.loss.item())
        assert not torch.equal(qs.talk_head.net[4].weight, head_before)
        assert not torch.equal(qs.start_embedding, emb_before)
        print("smollm2 quiet-star losses:", losses, "thought:", repr(qs.decode_thought(out.thoughts, 0, 0, 10)))
    finally:  # the session fixture is shared: put the base weights back
        model.load_state_dict(saved)


def test_triton_backend_training_step_matches_split():
    pytest.importorskip("triton")
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the kernel in the Triton interpreter on CPU tensors (TRITON_INTERPRET=1, set on CPU by conftest); the gpu-marked kernel tests cover CUDA")
    qs = tiny_qs(n_ahead=4, n_ahead_talk=2, n_thoughts=2, policy_weight=3.0)
    randomize_talk_head(qs)
    x, mask = batch(L=7, lengths=(7, 5))
    thoughts = qs.rollout(x, mask, generator=torch.Generator().manual_seed(0))
    results = {}
    for backend in ("split", "triton"):
        qs.zero_grad()
        with use_backend(backend):
            out = qs(x, mask, thoughts=thoughts)
            out.loss.backward()
        results[backend] = (out.loss.item(), {k: p.grad.clone() for k, p in qs.named_parameters()})
    (la, ga), (lb, gb) = results["split"], results["triton"]
    assert la == pytest.approx(lb, abs=1e-5)
    for name in ga:
        scale = ga[name].abs().max().item() + 1e-8
        assert (ga[name] - gb[name]).abs().max().item() <= 1e-4 * scale + 1e-7, name


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised by torch's own compile machinery
def test_compiled_blocks_give_the_eager_step_and_do_not_recompile_per_rollout_step():
    import torch._dynamo
    from torch._dynamo.utils import counters

    from quietstar.optim import maybe_compile

    x, mask = batch()
    graphs = {}
    try:
        for T in (5, 8):  # 2 or 5 rollout steps: the same compiled graphs
            qs = tiny_qs(n_ahead=T, n_ahead_talk=2, n_thoughts=2)
            randomize_talk_head(qs)
            eager = qs(x, mask, generator=torch.Generator().manual_seed(0))
            torch._dynamo.reset()
            counters.clear()
            maybe_compile(qs.model, True)
            with torch.no_grad():
                qs.rollout(x, mask, generator=torch.Generator().manual_seed(0))
            graphs[T] = counters["stats"]["unique_graphs"]
            compiled = qs(x, mask, generator=torch.Generator().manual_seed(0))
            compiled.loss.backward()
            assert torch.equal(compiled.thoughts, eager.thoughts)
            assert compiled.nll.item() == pytest.approx(eager.nll.item(), rel=1e-5)
            assert compiled.policy_loss.item() == pytest.approx(eager.policy_loss.item(), rel=1e-3)  # x1e6 in the loss
    finally:
        torch._dynamo.reset()
    assert graphs[5] == graphs[8] > 0, graphs


@pytest.mark.parametrize("where", ["all", "entropy"])
def test_a_bf16_autocast_step_on_cpu_stays_near_the_fp32_step(where):
    """CPU training under bf16 autocast (CPUs with bf16 matmul units): the split backend's fused kernels, the
    subset grid and the fused LM head take bf16 projections and fp32 output gradients. On the same thoughts,
    the NLL and its gradients are the fp32 step's to bf16 precision, and the policy term is finite (its
    advantages are differences of nearly equal losses: bf16 moves them more)."""
    cfg = dict(policy_weight=0.0) if where == "all" else dict(policy_weight=0.0, where="entropy", think_fraction=0.5)
    qs = tiny_qs(**cfg)
    randomize_talk_head(qs)  # nonzero rewards: the policy rows are scored too
    x, mask = batch()
    with use_backend("split"):
        r = qs._rollout(x, mask, generator=torch.Generator().manual_seed(3))
        sel = None if where == "all" else r.selection

        def step(autocast):
            qs.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = qs(x, mask, thoughts=r.thoughts, selection=sel)
            out.loss.backward()
            return out, {n: p.grad.clone() for n, p in qs.named_parameters() if p.grad is not None}

        out32, g32 = step(False)
        out16, g16 = step(True)
    assert float(out32.policy_loss) != 0.0 and math.isfinite(float(out16.policy_loss))
    assert abs(float(out16.nll - out32.nll)) <= 1e-2 * abs(float(out32.nll))
    assert g16.keys() == g32.keys() and len(g32) > 10
    for name, g in g32.items():
        cos = F.cosine_similarity(g16[name].flatten().double(), g.flatten().double(), dim=0)
        assert torch.isfinite(g16[name]).all() and cos > 0.95, (name, float(cos))
