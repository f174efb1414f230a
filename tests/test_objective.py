"""The objective's stages without a model (objective.py), the plain-logits scoring path against the fused one,
a new objective as one function and one config value, and the semantic fixes: packed documents, BOS,
each quirk flag acting alone, and the sampler's exactness."""

import dataclasses
import json

import pytest
import torch

from quietstar.methods.quietstar import objective
from quietstar.config import DataConfig
from quietstar.data import build_stream
from quietstar.eval.nll import score_tokens
from quietstar.generate import encode_prompt, generate
from quietstar.masks import ThoughtGrid
from quietstar.model import ModelConfig, Transformer
from quietstar.tokenizer import ByteTokenizer
from quietstar.methods.quietstar.thinker import QuietStar
from quietstar.methods.quietstar.rollout import sample_categorical
from quietstar.methods.quietstar.config import ThoughtConfig


def tiny_qs(seed=0, tok=None, **cfg):
    torch.manual_seed(seed)
    defaults = dict(n_ahead=5, n_ahead_talk=2, n_thoughts=2)
    return QuietStar(Transformer(ModelConfig.from_preset("tiny")), tok, ThoughtConfig(**{**defaults, **cfg}))


def randomize_talk_head(qs, std=0.5, seed=7):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = qs.talk_head.net[4].weight
        w.copy_(torch.randn(w.shape, generator=g) * std)


# --------------------------------------------------------------------------------------------------
# the objective's pure functions


def test_scope_and_nll_coefficients_without_a_model():
    cfg = ThoughtConfig(n_ahead=5, n_ahead_talk=2, n_thoughts=2)
    grid = ThoughtGrid(5, 2, 2)
    lengths = torch.tensor([8, 5])
    sc = objective.scope(grid, 2, 8, lengths, None, cfg)
    for b, length in enumerate(lengths.tolist()):
        for k in range(2):
            assert sc.ok[k, b].tolist() == [i + k + 1 < length for i in range(8)]
        assert sc.scorable[b].tolist() == [i + 2 <= length - 1 for i in range(8)]
    assert sc.policy_count.item() == 2 * (6 + 3)  # n copies x scorable positions
    base, talk = objective.nll_coefficients(sc, 2, cfg, torch.float64)
    assert base.sum().item() == pytest.approx(cfg.base_loss_weight)
    assert talk.sum().item() == pytest.approx(1 - cfg.base_loss_weight)
    assert torch.all(base[~sc.ok[0]] == 0) and torch.all(talk[~sc.ok[:, :, None].expand_as(talk)] == 0)


def test_rewards_advantages_and_policy_coefficients_by_hand():
    cfg = ThoughtConfig(n_ahead=6, n_ahead_talk=3, n_thoughts=3)
    B, n, L, K = 2, 3, 9, 3
    g = torch.Generator().manual_seed(0)
    ce_base, ce_talk = torch.rand(B, L, generator=g, dtype=torch.float64), torch.rand(K, B, n, L, generator=g,
                                                                                      dtype=torch.float64)
    lengths = [9, 6]
    sc = objective.scope(ThoughtGrid(6, K, n), B, L, torch.tensor(lengths), None, cfg)
    reward = objective.rewards(ce_base, ce_talk, sc, cfg)
    adv = objective.advantages(reward, sc, cfg)
    coef = objective.policy_coefficients(adv, sc, cfg, 3)
    want = torch.zeros(B, n, L, dtype=torch.float64)
    for b in range(B):
        for p in range(n):
            for i in range(lengths[b] - K):  # all K targets real
                want[b, p, i] = sum(ce_base[b, i + k] - ce_talk[k, b, p, i] for k in range(K))
    torch.testing.assert_close(reward, want, rtol=0, atol=1e-12)
    want_adv = (want - want.mean(1, keepdim=True)).clamp_min(0)
    want_adv[0, :, 9 - K:] = 0
    want_adv[1, :, 6 - K:] = 0
    torch.testing.assert_close(adv, want_adv, rtol=0, atol=1e-12)
    count = n * ((9 - K) + (6 - K))
    torch.testing.assert_close(coef, (want_adv / (3 * count))[..., None].expand(B, n, L, 3), rtol=0, atol=1e-15)


def test_unknown_objective_is_refused():
    with pytest.raises(ValueError, match="objective"):
        ThoughtConfig(objective="nope")
    with pytest.raises(ValueError, match="scoring"):
        ThoughtConfig(scoring="dense")


# --------------------------------------------------------------------------------------------------
# the plain-logits reference path


def _loss_and_grads(qs, x, mask, thoughts, doc_ids=None):
    qs.zero_grad()
    out = qs(x, mask, thoughts=thoughts, doc_ids=doc_ids)
    out.loss.backward()
    return out, {k: p.grad.clone() for k, p in qs.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("quirks", [{}, dict(reward_drop_last_position=True, policy_mean_over_padding=True)],
                         ids=["default", "official-quirks"])
def test_plain_scoring_equals_fused_in_values_and_gradients(quirks):
    qs = tiny_qs(n_ahead=6, n_ahead_talk=3, policy_weight=3.0, **quirks).double()
    randomize_talk_head(qs)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(3, 256, (2, 10), generator=g)
    mask = (torch.arange(10)[None] < torch.tensor([10, 7])[:, None]).long()
    thoughts = qs.rollout(x, mask, generator=torch.Generator().manual_seed(3))
    fused, gf = _loss_and_grads(qs, x, mask, thoughts)
    qs.cfg.scoring = "plain"
    plain, gp = _loss_and_grads(qs, x, mask, thoughts)
    assert fused.policy_loss.item() > 0, "the policy term should be active"
    for name in ("loss", "nll", "policy_loss"):
        assert getattr(plain, name).item() == pytest.approx(getattr(fused, name).item(), rel=1e-12), name
    torch.testing.assert_close(plain.rewards, fused.rewards, rtol=1e-12, atol=1e-14)
    assert gf.keys() == gp.keys()
    for name in gf:
        torch.testing.assert_close(gp[name], gf[name], rtol=1e-9, atol=1e-12, msg=name)


def test_a_new_objective_is_one_function_and_one_config_value():
    def normalised_advantages(reward, scope, cfg):  # the advantage divided by the copies' spread
        adv = (reward - reward.mean(1, keepdim=True)) / (reward.std(1, keepdim=True) + 1e-6)
        return adv.clamp_min(0) * scope.scorable[:, None]

    objective.register_objective("normalised", dataclasses.replace(objective.OFFICIAL,
                                                                   advantages=normalised_advantages))
    try:
        qs = tiny_qs(n_ahead=5, n_ahead_talk=2, policy_weight=1.0)
        randomize_talk_head(qs)
        x = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(2))
        th = qs.rollout(x, generator=torch.Generator().manual_seed(0))
        official = qs(x, thoughts=th)
        qs.configure(dataclasses.replace(qs.cfg, objective="normalised"))
        new = qs(x, thoughts=th)
        assert new.nll.item() == official.nll.item()
        assert new.policy_loss.item() != pytest.approx(official.policy_loss.item(), rel=1e-3)
        scorable = new.rewards != 0
        want = normalised_advantages(new.rewards, objective.Scope(None, scorable.any(1), None), None)
        torch.testing.assert_close(new.advantages, want)
    finally:
        objective.OBJECTIVES.pop("normalised")


# --------------------------------------------------------------------------------------------------
# semantic fixes


def test_packed_documents_stop_talk_targets_rewards_and_policy_at_the_document_end():
    """A row [doc A | doc B] with doc_ids scores doc A exactly as the row [doc A | padding] does."""
    qs = tiny_qs(n_ahead=5, n_ahead_talk=3, policy_weight=1.0)
    randomize_talk_head(qs)
    L, la = 14, 7
    x = torch.randint(3, 256, (1, L), generator=torch.Generator().manual_seed(4))
    doc_ids = (torch.arange(L) >= la).long()[None]
    thoughts = qs.rollout(x, generator=torch.Generator().manual_seed(5), doc_ids=doc_ids)
    packed = qs(x, thoughts=thoughts, doc_ids=doc_ids)
    padded = qs(x, (torch.arange(L) < la).long()[None], thoughts=thoughts)
    K = 3
    assert (padded.rewards[..., :la] != 0).any(), "the test needs non-zero rewards in doc A"
    torch.testing.assert_close(packed.rewards[..., :la], padded.rewards[..., :la], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed.advantages[..., :la], padded.advantages[..., :la], rtol=1e-5, atol=1e-6)
    assert torch.all(packed.rewards[..., la - K:la] == 0)  # positions whose targets run into doc B
    for k in range(K):  # talk CE of doc A's real targets agree; the doc-B targets are not scored
        i = torch.arange(la - k - 1)
        torch.testing.assert_close(packed.ce_talk[0, :, k, i], padded.ce_talk[0, :, k, i], rtol=1e-5, atol=1e-6)


def test_reward_drop_last_position_leaves_policy_mean_over_padding_its_effect():
    """With the official reward window, the policy mean over padding (or not) still changes the mean."""
    x = torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(6))
    mask = (torch.arange(10)[None] < torch.tensor([10, 6])[:, None]).long()
    outs = []
    for over_padding in (True, False):
        qs = tiny_qs(n_ahead=4, n_ahead_talk=2, reward_drop_last_position=True, policy_mean_over_padding=over_padding)
        randomize_talk_head(qs)
        th = qs.rollout(x, mask, generator=torch.Generator().manual_seed(0))
        outs.append(qs(x, mask, thoughts=th))
    a, b = outs
    assert a.policy_loss.item() > 0
    torch.testing.assert_close(a.advantages, b.advantages)
    L, K, n = 10, 2, 2
    window = 2 * n * (L - 1 - K)  # every (row, copy, position) of the official window
    real = n * ((L - 1 - K) + (6 - 1))  # window positions with a real target (row 1: i < 5)
    assert b.policy_loss.item() == pytest.approx(a.policy_loss.item() * window / real, rel=1e-5)


def test_inverse_cdf_sampling_is_exact_to_float64_at_a_large_vocabulary():
    """u at the middle of a token's float64 probability interval must draw that token, for unlikely tokens
    late in the vocabulary (p in 1e-8..1e-7, cumulative mass > 0.5): a float32 cumulative sum, whose
    spacing there is ~6e-8, draws only ~12% of them right."""
    V, m = 32000, 256
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(0)) * 2
    p = torch.softmax(logits.double(), -1)[0]
    cdf = p.cumsum(0)
    small = torch.nonzero((p > 1e-8) & (p < 1e-7) & (cdf > 0.5)).flatten()
    assert len(small) >= m
    tokens = small[torch.randperm(len(small), generator=torch.Generator().manual_seed(1))[:m]]
    u = (cdf[tokens] - p[tokens] / 2)[:, None]
    got = sample_categorical(logits.expand(m, V), u=u)
    assert torch.equal(got, tokens)


def test_sampled_distribution_total_variation_is_below_1e7():
    """The distribution sample_categorical inverts (block mass x share in the block), against the float64
    softmax; a float32 cumulative sum over the vocabulary is far off."""
    from quietstar.methods.quietstar.rollout import categorical_blocks

    for V in (32000, 49152, 1000):
        logits = torch.randn(8, V, generator=torch.Generator().manual_seed(V)) * 3
        w, block_cdf = categorical_blocks(logits)
        mass = torch.diff(block_cdf, dim=-1, prepend=torch.zeros(8, 1, dtype=torch.float64))
        wd = w.double()
        implied = (wd / wd.sum(-1, keepdim=True) * (mass / block_cdf[:, -1:])[..., None]).view(8, -1)[:, :V]
        exact = torch.softmax(logits.double(), -1)
        tv = 0.5 * (implied - exact).abs().sum(-1).max().item()
        assert tv < 1e-7, (V, tv)
        c32 = w.view(8, -1)[:, :V].cumsum(-1).double()
        f32 = torch.diff(c32, dim=-1, prepend=torch.zeros(8, 1, dtype=torch.float64)) / c32[:, -1:]
        if V > 10000:
            assert 0.5 * (f32 - exact).abs().sum(-1).max().item() > 1e-5  # the float32 cumulative sum


def test_sampling_frequencies_follow_the_distribution():
    logits = torch.tensor([[2.0, 0.0, -1.0] + [-30.0] * 500 + [1.0]])
    draws = sample_categorical(logits.expand(200_000, -1), generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=logits.shape[1]).double() / draws.numel()
    p = torch.softmax(logits.double(), -1)[0]
    assert (freq - p).abs().max().item() < 5 * (p * (1 - p) / draws.numel()).sqrt().max().item()
    assert draws.max().item() < logits.shape[1]


def test_training_evaluation_and_generation_all_start_with_bos(tmp_path):
    tok = ByteTokenizer()
    text = "Q: What is 2 + 3?\nA: 5\n"
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": text}) + "\n")
    stream = build_stream(DataConfig(source="jsonl", path=str(path), seq_len=40, batch_size=1), tok, 0)
    row = stream.next_batch().input_ids[0].tolist()
    want = encode_prompt(tok, text)
    assert want[0] == tok.bos_id and row[:len(want)] == want  # training reads BOS + the text
    qs = tiny_qs(tok=tok, n_ahead=4, n_ahead_talk=1, n_thoughts=1).eval()
    scores = score_tokens(qs, tok, [text], seq_len=64, think=False, desc="t")
    assert scores.ids[0] == want  # held-out NLL (and soft accuracy, through the same encode_prompt)
    seen = []
    import quietstar.generate as gen_mod

    real = gen_mod.generate_stream

    def spy(qs_, ids, *a, **kw):
        seen.append(ids)
        return real(qs_, ids, *a, **kw)

    gen_mod.generate_stream = spy
    try:
        generate(qs, tok, [text], max_new_tokens=2, generator=torch.Generator().manual_seed(0))
    finally:
        gen_mod.generate_stream = real
    assert seen[0][0].tolist() == want


def test_soft_accuracy_of_a_non_negative_answer_is_the_official_metric():
    """Renormalised over the digits and the newline only; the minus tokens join the set only for a
    negative answer."""
    from quietstar.eval.soft import SoftExample, answer_token_sets, restricted_probs, scored_targets, soft_accuracy

    tok = ByteTokenizer()
    qs = tiny_qs(tok=tok, n_ahead=4, n_ahead_talk=1, n_thoughts=1).eval()
    sets = answer_token_sets(tok)
    res = soft_accuracy(qs, tok, [SoftExample("Q: 3 + 4?\nA: 7\n", "7", True),
                                  SoftExample("Q: 3 - 4?\nA: -1\n", "-1", True)], think=False, desc="t")
    for item, text, negative in zip(res["items"], ["Q: 3 + 4?\nA: 7\n", "Q: 3 - 4?\nA: -1\n"], [False, True]):
        ids = encode_prompt(tok, text)
        with torch.no_grad():
            logits = qs.model(torch.tensor([ids]))[0]
        want = {}
        for name, valid in (("official", sets.numeric), ("with_minus", sets.numeric + sets.minus)):
            tg = scored_targets(tok, ids, set(valid))
            want[name] = restricted_probs(logits[[t - 1 for t in tg]], torch.tensor([ids[t] for t in tg]),
                                          valid).prod().item()
        assert want["official"] != pytest.approx(want["with_minus"], rel=1e-4)
        assert item["p_base"] == pytest.approx(want["with_minus" if negative else "official"], rel=1e-5)


def test_triton_training_step_with_packed_documents_matches_the_dense_backend():
    """The Triton kernel takes doc_ids (no fallback): loss and every gradient equal the dense backend's."""
    pytest.importorskip("triton")
    import os

    from quietstar.attention import use_backend

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the kernel in the Triton interpreter on CPU tensors (TRITON_INTERPRET=1, set on CPU by conftest); the gpu-marked kernel tests cover CUDA")
    qs = tiny_qs(n_ahead=4, n_ahead_talk=2, policy_weight=3.0)
    randomize_talk_head(qs)
    x = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(8))
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2], [0, 1, 1, 1, 1, 1, 2, 2, 2]])
    thoughts = qs.rollout(x, generator=torch.Generator().manual_seed(0), doc_ids=doc_ids)
    results = {}
    for backend in ("dense", "triton"):
        with use_backend(backend):
            results[backend] = _loss_and_grads(qs, x, None, thoughts, doc_ids)
    (a, ga), (b, gb) = results["dense"], results["triton"]
    assert b.loss.item() == pytest.approx(a.loss.item(), abs=1e-5) and a.policy_loss.item() > 0
    for name in ga:
        scale = ga[name].abs().max().item() + 1e-8
        assert (ga[name] - gb[name]).abs().max().item() <= 1e-4 * scale + 1e-7, name
