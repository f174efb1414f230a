"""Thoughts that end where the model closes them (thought.close_token): the step each thought is read at, the
reward, NLL and policy gradient against a hand computation from the grid's raw logits, tokens after the close
that change nothing, and the sequential (KV-cached) inference path that reads the same step as the grid."""

import dataclasses

import pytest
import torch

from quietstar.eval.common import next_token_logits_at
from quietstar.masks import ThoughtGrid
from quietstar.model import ModelConfig, Transformer
from quietstar.methods.quietstar.config import ThoughtConfig
from quietstar.methods.quietstar.thinker import QuietStar
from tests.test_eval import ByteTokenizer
from tests.test_objective import randomize_talk_head

pytestmark = pytest.mark.usefixtures("one_thread")

CLOSE = 7  # the bare model's close id is 0 (no tokenizer); the byte tokenizer's "\a" is 7


def test_read_steps_by_hand():
    grid = ThoughtGrid(7, 1, 2)  # 4 sampled tokens, <end> at step 6
    th = torch.tensor([[[[1, 7, 2, 7]], [[1, 2, 3, 4]]],
                       [[[7, 1, 1, 1]], [[1, 2, 3, 7]]]])  # (B=2, n=2, P=1, 4)
    steps, kept = grid.read_steps(th, CLOSE)
    # t_m is fed at step m + 1: a close at t_2 is read at step 3; none: the <end> step
    assert steps[..., 0].tolist() == [[3, 6], [2, 5]]
    assert kept[:, :, 0].tolist() == [[[True, True, False, False], [True] * 4],
                                      [[True, False, False, False], [True] * 4]]
    same, all_kept = grid.read_steps(th, None)
    assert (same == grid.end_step).all() and all_kept.all()


def test_close_token_needs_one_talk_step():
    with pytest.raises(ValueError, match="close_token"):
        ThoughtConfig(n_ahead=6, n_ahead_talk=2, close_token=".")
    with pytest.raises(ValueError, match="close_token"):
        ThoughtConfig(n_ahead=6, n_ahead_talk=1, close_token=".",
                      curriculum=[{"n_ahead": 6, "n_ahead_talk": 2, "steps": 1}])


def _ce(logits, targets):
    return -torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)


def closing_setup(seed=0):
    torch.manual_seed(seed)
    cfg = ThoughtConfig(n_ahead=7, n_ahead_talk=1, n_thoughts=4, policy_weight=2.0, policy_temperature=1.0,
                        objective="rlp", clamp_negative_advantage=False, close_token="\a")
    qs = QuietStar(Transformer(ModelConfig.from_preset("tiny", tie_embeddings=False)), ByteTokenizer(), cfg).double()
    randomize_talk_head(qs)
    g = torch.Generator().manual_seed(seed + 1)
    B, L = 2, 9
    x = torch.randint(8, 256, (B, L), generator=g)
    mask = (torch.arange(L)[None] < torch.tensor([L, 6])[:, None]).long()
    thoughts = qs.rollout(x, mask, generator=torch.Generator().manual_seed(seed + 2))
    # closes at every place, and none: t_1 .. t_4 closing, by copy and position
    for c in range(4):
        thoughts[:, c, c::3, c] = CLOSE
    return qs, x, mask, thoughts


def test_reward_nll_and_policy_gradient_read_at_the_close():
    qs, x, mask, thoughts = closing_setup()
    assert qs.close_id == CLOSE
    out = qs(x, mask, thoughts=thoughts)
    qs.zero_grad()
    out.loss.backward()
    got = {k: p.grad.clone() for k, p in qs.named_parameters() if p.grad is not None}

    B, G, L = thoughts.shape[:3]
    grid = qs.grid()
    steps, kept = grid.read_steps(thoughts, CLOSE)
    assert (steps < grid.end_step).any() and (steps == grid.end_step).any()
    qs.zero_grad()
    logits = qs.grid_logits(x, thoughts, mask)  # (B, G, S, L, V)
    h = qs.grid_hidden(x, thoughts, mask)  # (B, R, L, d)
    target = grid.target(x, 0)
    read_logits = logits.gather(2, steps[:, :, None, :, None].expand(-1, -1, 1, -1, logits.shape[-1])).squeeze(2)
    base_ce = _ce(logits[:, 0, 0], target)
    lengths = mask.sum(-1)
    ok = torch.stack([torch.arange(L) + 1 < n for n in lengths.tolist()])  # (B, L)
    reward = (base_ce[:, None] - _ce(read_logits, target[:, None].expand(B, G, L))).detach() * ok[:, None]
    torch.testing.assert_close(out.rewards, reward, rtol=1e-10, atol=1e-12)
    adv = (reward - reward.mean(1, keepdim=True)) * G / (G - 1)
    h_read = torch.stack([torch.stack([h[b, grid.row(int(steps[b, c, i]), c), i] for i in range(L)])
                          for b in range(B) for c in range(G)]).view(B, G, L, -1)
    h_mix, _ = qs.mix(h[:, 0][:, None].expand(B, G, L, -1), h_read)
    talk = (_ce(qs.model.head(h_mix), target[:, None].expand(B, G, L)) * ok[:, None]).sum() / (ok.sum() * G)
    nll = 0.5 * (base_ce * ok).sum() / ok.sum() + 0.5 * talk
    m = thoughts.shape[-1]
    logpi = torch.stack([torch.log_softmax(logits[:, :, j + 1], -1).gather(-1, thoughts[..., j:j + 1]).squeeze(-1)
                         for j in range(m)], -1)
    policy = -(adv[..., None] * logpi * kept).sum() / (m * ok.sum() * G)  # nothing after a close
    (nll + qs.cfg.policy_weight * policy).backward()
    want = {k: p.grad for k, p in qs.named_parameters() if p.grad is not None}
    assert out.nll.item() == pytest.approx(nll.item(), rel=1e-10)
    assert out.policy_loss.item() == pytest.approx(policy.item(), rel=1e-10)
    assert set(got) == set(want)
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=1e-7, atol=1e-9, msg=k)
    assert torch.isnan(out.thought_logprobs[~kept.expand_as(out.thought_logprobs)]).all()
    assert out.metrics["thought/length_mean"].item() == pytest.approx(
        (kept.sum(-1).double() * ok[:, None]).sum().item() / (ok.sum().item() * G))


def test_tokens_after_the_close_change_nothing():
    qs, x, mask, thoughts = closing_setup(seed=3)
    _, kept = qs.read_steps(thoughts)

    def run(th):
        qs.zero_grad()
        out = qs(x, mask, thoughts=th)
        out.loss.backward()
        return out.loss.detach(), {k: p.grad.clone() for k, p in qs.named_parameters() if p.grad is not None}

    loss, grads = run(thoughts)
    after = thoughts.clone()
    after[~kept] = (after[~kept] + 11) % 200 + 8  # other tokens after every close
    loss2, grads2 = run(after)
    assert loss2.item() == loss.item()
    for k in grads:
        torch.testing.assert_close(grads2[k], grads[k], rtol=0, atol=0, msg=k)
    before = thoughts.clone()  # a token before a close does change it
    b, c, i = [int(v) for v in kept[..., 1].nonzero()[0]]  # a thought that does not close at t_1
    before[b, c, i, 0] = (before[b, c, i, 0] + 1) % 200 + 8
    assert run(before)[0].item() != loss.item()
    off = dataclasses.replace(qs.cfg, close_token=None)  # and without a close token everything counts
    qs.configure(off)
    assert run(after)[0].item() != run(thoughts)[0].item()


def test_sequential_inference_reads_the_same_step_as_the_grid():
    """next_token_logits_at (one thought at a time on a KV cache, as generation and evaluation think) and the
    grid's next_token_logits agree on thoughts that close early, late and never."""
    qs, x, mask, thoughts = closing_setup(seed=5)
    qs.eval()
    rows, positions = [0, 0, 1, 0, 1, 0], [0, 1, 2, 3, 4, 7]
    th = thoughts[:, :1].clone()
    got = next_token_logits_at(qs, x, rows, positions, thoughts=th[rows, 0, positions])
    full = qs.next_token_logits(x, mask, thoughts=th)
    steps, _ = qs.read_steps(th)
    assert len(set(steps[rows, 0, positions].tolist())) > 1
    torch.testing.assert_close(got.mixed, full.mixed[rows, 0, positions], rtol=1e-9, atol=1e-9)
    qs.configure(dataclasses.replace(qs.cfg, close_token=None))
    other = qs.next_token_logits(x, mask, thoughts=th)
    assert not torch.allclose(other.mixed[rows, 0, positions], got.mixed)
