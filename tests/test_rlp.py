"""The RLP objective (thought.objective=rlp) by hand: the reward read from the thought row's own prediction,
the group-relative advantage with its G/(G-1) correction, the policy term's gradient, the EMA teacher's update
and counterfactual, and a run that resumes with its teacher bitwise."""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from quietstar.methods.quietstar import objective
from quietstar import train as train_script
from quietstar.ema import EMATeacher
from quietstar.masks import ThoughtGrid
from quietstar.model import ModelConfig, Transformer
from quietstar.methods.quietstar.thinker import QuietStar
from quietstar.methods.quietstar.config import ThoughtConfig
from tests.test_objective import randomize_talk_head
from tests.test_train import records, tiny_cfg

RLP = dict(objective="rlp", clamp_negative_advantage=False)


def tiny_qs(seed=0, **cfg):
    torch.manual_seed(seed)
    defaults = dict(n_ahead=5, n_ahead_talk=2, n_thoughts=4, policy_weight=2.0, policy_temperature=1.0)
    return QuietStar(Transformer(ModelConfig.from_preset("tiny")), None, ThoughtConfig(**{**defaults, **cfg}))


def test_group_relative_advantages_by_hand():
    cfg = ThoughtConfig(n_ahead=5, n_ahead_talk=1, n_thoughts=4, **RLP)
    B, G, L = 2, 4, 6
    reward = torch.randn(B, G, L, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sc = objective.scope(ThoughtGrid(5, 1, G), B, L, torch.tensor([6, 4]), None, cfg)
    adv = objective.group_relative_advantages(reward, sc, cfg)
    for b in range(B):
        for i in range(L):
            for g in range(G):
                others = [reward[b, h, i] for h in range(G) if h != g]  # leave-one-out: R minus the others' mean
                want = (reward[b, g, i] - sum(others) / (G - 1)) * sc.scorable[b, i]
                assert adv[b, g, i].item() == pytest.approx(want.item(), abs=1e-12)
    assert (adv < 0).any(), "unclamped"
    clamped = objective.group_relative_advantages(reward, sc, dataclasses.replace(cfg, clamp_negative_advantage=True))
    torch.testing.assert_close(clamped, adv.clamp_min(0), rtol=0, atol=0)
    one = objective.group_relative_advantages(reward[:, :1], sc, cfg)  # G = 1: the reward itself
    torch.testing.assert_close(one, reward[:, :1] * sc.scorable[:, None], rtol=0, atol=0)


def _ce(logits, targets):
    return -torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)


@pytest.mark.parametrize("nll_weight", [1.0, 0.0])
def test_rlp_reward_advantage_and_policy_gradient_against_a_hand_computation(nll_weight):
    """Reward from the thought rows' own logits (not the mix), A = G/(G-1)(R - mean), and the gradient of
    nll_weight * NLL - policy_weight * mean A * mean_m log pi written out from the grid's raw logits."""
    qs = tiny_qs(**RLP, nll_weight=nll_weight).double()
    randomize_talk_head(qs)  # w != 0: the mixed and the unmixed rewards differ
    g = torch.Generator().manual_seed(1)
    B, L, G, K = 2, 9, 4, 2
    x = torch.randint(3, 256, (B, L), generator=g)
    mask = (torch.arange(L)[None] < torch.tensor([L, 6])[:, None]).long()
    thoughts = qs.rollout(x, mask, generator=torch.Generator().manual_seed(3))
    out = qs(x, mask, thoughts=thoughts)
    qs.zero_grad()
    out.loss.backward()
    got = {k: p.grad.clone() for k, p in qs.named_parameters() if p.grad is not None}

    grid = qs.grid()
    logits = qs.grid_logits(x, thoughts, mask)  # (B, G, S, L, V): every grid cell's own prediction
    base_ce = _ce(logits[:, 0, 0], grid.target(x, 0))  # the text row
    own = torch.stack([_ce(logits[:, :, grid.talk_step(k)], grid.target(x, k)[:, None].expand(B, G, L))
                       for k in range(K)])  # (K, B, G, L)
    lengths = mask.sum(-1)
    scorable = torch.stack([torch.arange(L) + K < n for n in lengths.tolist()])  # all K targets real
    reward = sum(torch.stack([ThoughtGrid.ahead(base_ce, k) for k in range(K)])[:, :, None] - own).detach()
    reward = reward * scorable[:, None]
    torch.testing.assert_close(out.rewards, reward, rtol=1e-10, atol=1e-12)
    adv = (reward - reward.mean(1, keepdim=True)) * G / (G - 1) * scorable[:, None]
    torch.testing.assert_close(out.advantages, adv, rtol=1e-10, atol=1e-12)

    # the loss by hand: the NLL of the mixed predictions (as the official objective) and the policy term
    qs.zero_grad()
    logits = qs.grid_logits(x, thoughts, mask)
    h = qs.grid_hidden(x, thoughts, mask)  # (B, R, L, d)
    ok = torch.stack([torch.stack([torch.arange(L) + k + 1 < n for n in lengths.tolist()]) for k in range(K)])  # (K, B, L)
    nll_base = (_ce(logits[:, 0, 0], grid.target(x, 0)) * ok[0]).sum() / ok[0].sum()
    talk = 0
    for k in range(K):
        h_base = ThoughtGrid.ahead(h[:, 0], k)[:, None].expand(B, G, L, -1)
        h_mix, _ = qs.mix(h_base, grid.at_step(h, grid.talk_step(k)))
        ce = _ce(qs.model.head(h_mix), grid.target(x, k)[:, None].expand(B, G, L))
        talk = talk + (ce * ok[k][:, None]).sum() / (ok[k].sum() * G) / K
    nll = 0.5 * nll_base + 0.5 * talk
    m = thoughts.shape[-1]
    logpi = torch.stack([torch.log_softmax(logits[:, :, j + 1], -1).gather(-1, thoughts[..., j:j + 1]).squeeze(-1)
                         for j in range(m)], -1)  # step j + 1 predicts sampled token j
    count = (scorable & ok[0]).sum() * G
    policy = -(adv[..., None] * logpi).sum() / (m * count)
    (nll_weight * nll + qs.cfg.policy_weight * policy).backward()
    want = {k: p.grad for k, p in qs.named_parameters() if p.grad is not None}
    assert out.policy_loss.item() == pytest.approx(policy.item(), rel=1e-10)
    assert set(got) == set(want) if nll_weight else set(got) <= set(want)
    for k in got:  # fp64; the grid's attention runs another backend than grid_logits' (~1e-10 apart)
        torch.testing.assert_close(got[k], want[k], rtol=1e-7, atol=1e-9, msg=k)
    if not nll_weight:
        assert "talk_head.net.0.weight" not in got or got["talk_head.net.0.weight"].abs().max() == 0


def test_reward_from_unmixed_is_the_official_objective_with_rlp_reward():
    """thought.reward_from=unmixed changes the official objective's reward and nothing else: its advantages
    stay the clamped mean baseline, its NLL is the official one."""
    qs = tiny_qs(n_thoughts=2).double()
    randomize_talk_head(qs)
    x = torch.randint(3, 256, (2, 8), generator=torch.Generator().manual_seed(2))
    thoughts = qs.rollout(x, generator=torch.Generator().manual_seed(4))
    official = qs(x, thoughts=thoughts)
    qs.configure(dataclasses.replace(qs.cfg, reward_from="unmixed"))
    ablation = qs(x, thoughts=thoughts)
    qs.configure(dataclasses.replace(qs.cfg, objective="rlp", clamp_negative_advantage=True))
    rlp = qs(x, thoughts=thoughts)
    assert ablation.nll.item() == official.nll.item()
    assert not torch.allclose(ablation.rewards, official.rewards)
    torch.testing.assert_close(ablation.rewards, rlp.rewards, rtol=0, atol=0)
    r = ablation.rewards
    torch.testing.assert_close(ablation.advantages, (r - r.mean(1, keepdim=True)).clamp_min(0), rtol=0, atol=0)
    torch.testing.assert_close(rlp.advantages, ablation.advantages * 2, rtol=1e-12, atol=1e-14)  # G/(G-1) = 2


def test_ema_update_reset_and_fp32_storage_of_16_bit_weights():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny")).to(torch.bfloat16)
    ema = EMATeacher(model, 0.9)
    start = {k: v.clone() for k, v in ema.state_dict().items()}
    assert all(v.dtype == torch.float32 for v in start.values())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for name, p in model.named_parameters():
        key = name.replace(".", "__")
        want = 0.9 * start[key] + 0.1 * p.float()
        torch.testing.assert_close(ema.state_dict()[key], want, rtol=1e-6, atol=1e-6)
    assert not any(b.requires_grad for b in ema.buffers())
    assert all(w.dtype == torch.bfloat16 for w in ema.weights(model).values())
    ema.reset(model)
    for name, p in model.named_parameters():
        assert torch.equal(ema.state_dict()[name.replace(".", "__")], p.float())


def test_ema_teacher_is_the_rewards_counterfactual():
    """With thought.ema_decay the no-thought CE comes from the averaged weights: the reward shifts by the
    teacher's CE minus the model's, the same at every thought of a position, so the advantages do not move."""
    qs = tiny_qs(**RLP).double()
    x = torch.randint(3, 256, (2, 8), generator=torch.Generator().manual_seed(5))
    thoughts = qs.rollout(x, generator=torch.Generator().manual_seed(6))
    plain = qs(x, thoughts=thoughts)
    qs.configure(dataclasses.replace(qs.cfg, ema_decay=0.5))
    qs.ema = EMATeacher(qs.model, 0.5).double()
    with torch.no_grad():  # a teacher that differs from the model
        for b in qs.ema.buffers():
            b.add_(0.05 * torch.randn(b.shape, generator=torch.Generator().manual_seed(b.numel()), dtype=b.dtype))
    teacher = qs(x, thoughts=thoughts)
    copy = Transformer(qs.model.cfg).double()
    copy.load_state_dict({k: v for k, v in qs.ema.weights(qs.model).items()}, strict=False)
    ce_t = _ce(copy(x), ThoughtGrid.target(x, 0))
    K = qs.grid().K
    shift = sum(ThoughtGrid.ahead(ce_t - plain.ce_base, k) for k in range(K))  # (B, L)
    sc = plain.rewards.ne(0).any(1)
    torch.testing.assert_close(teacher.rewards, (plain.rewards + shift[:, None]) * sc[:, None], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(teacher.advantages, plain.advantages, rtol=1e-8, atol=1e-10)


def test_ema_teacher_is_saved_and_a_resumed_run_continues_it_bitwise(tmp_path):
    args = ["thought.objective=rlp", "thought.n_thoughts=3", "thought.ema_decay=0.9",
            "thought.clamp_negative_advantage=false", "checkpoint.every=2", "train.threads=1"]
    full = train_script.train(tiny_cfg(tmp_path / "full", *args, "train.max_steps=4"))
    train_script.train(tiny_cfg(tmp_path / "half", *args, "train.max_steps=2"))
    resumed_cfg = tiny_cfg(tmp_path / "resumed", *args, "train.max_steps=4")
    resumed_cfg.resume = str(tmp_path / "half")
    resumed = train_script.train(resumed_cfg)
    a = load_file(str(full.checkpoint / "model.safetensors"))
    b = load_file(str(resumed.checkpoint / "model.safetensors"))
    ema = [k for k in a if k.startswith("ema.")]
    assert ema and a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    start = load_file(str(tmp_path / "half" / "checkpoints" / "step_0000002" / "model.safetensors"))
    assert not torch.equal(start[ema[0]], a[ema[0]]), "the teacher moved after step 2"
    rewards = lambda d: [r["thought/reward_mean"] for r in records(d)]
    assert rewards(tmp_path / "half") + rewards(tmp_path / "resumed") == rewards(tmp_path / "full")


@pytest.mark.parametrize("where", [[], ["thought.where=entropy", "thought.think_fraction=0.25"]],
                         ids=["every_position", "entropy"])
def test_a_run_with_the_policy_term_alone_trains_no_nll_and_is_not_taken_for_a_frozen_one(tmp_path, where):
    """thought.nll_weight=0 trains no NLL, also at the positions that do not think (where=entropy scores them
    in a pass of their own), so train/nll is 0 on every step: the divergence watch follows the NLL without a
    thought instead, and the run goes to its last step."""
    result = train_script.train(tiny_cfg(tmp_path, "thought.objective=rlp", "thought.nll_weight=0",
                                         "thought.clamp_negative_advantage=false", "train.max_steps=5",
                                         "train.log_every=1", "train.threads=1", *where))
    rows = records(tmp_path)
    assert result.status != "diverged" and result.step == 5
    assert all(r["train/nll"] == 0.0 for r in rows) and len({r["train/nll_base"] for r in rows}) > 1


def test_the_ema_teacher_is_counted_in_the_memory_budget():
    x = torch.randint(3, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    peaks = []
    for ema in (None, 0.99):
        qs = tiny_qs(ema_decay=ema)
        qs.model.memory_budget_gb = 100.0  # no checkpointing either way: the estimates differ by the fixed bytes
        qs(x, generator=torch.Generator().manual_seed(0))
        (plan,) = qs.model._plans.values()
        assert plan.layers == 0
        peaks.append(plan.peak_bytes)
    assert peaks[1] - peaks[0] == qs.ema.nbytes() == sum(p.numel() * 4 for p in qs.model.parameters())
