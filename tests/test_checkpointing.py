"""Activation checkpointing from a memory budget (memory.checkpoint_plan, Transformer.grad_checkpointing):
the plan's choice on given sizes, that checkpointing changes no value or gradient, and its config fields."""

import pytest
import torch

from quietstar.config import LoopConfig, ModelSpec
from quietstar.errors import ConfigError
from quietstar.memory import checkpoint_plan, saved_bytes_per_token
from quietstar.model import KVCache, ModelConfig, Transformer
from quietstar.methods.quietstar.thinker import QuietStar
from quietstar.methods.quietstar.config import ThoughtConfig

pytestmark = pytest.mark.usefixtures("one_thread")

GB = 2**30
BENCH = ModelConfig.from_preset("bench_small")  # 4 blocks, d 256, I 688
TOKENS = 2 * 29 * 256  # its learning pass at B=2, L=256, T=12, K=4, n=2 (bench/bench_train_step.py)


def plan(budget_gb, compute_bytes=4, fixed=GB // 4):
    return checkpoint_plan(BENCH, TOKENS, 4, compute_bytes, fixed, int(budget_gb * GB))


def test_the_plan_on_the_bench_sizes():
    """A block of the bench model keeps 9,624 bytes per token in fp32, 136 MiB for this grid; 4 of them and the
    rest make 0.84 GB. The plan checkpoints the fewest first blocks that fit, and never the last one."""
    assert saved_bytes_per_token(BENCH, 4, 4) == 9624
    assert [plan(b).layers for b in (8.0, 1.0, 0.9, 0.8, 0.7, 0.6, 0.1)] == [0, 0, 0, 1, 2, 3, 3]
    assert plan(0.8).message.startswith("activation checkpointing on 1 of 4 blocks (estimated peak 0.72 GB)")
    assert "over budget even so" in plan(0.1).message and "over budget" not in plan(0.6).message
    assert plan(8.0).message.startswith("no activation checkpointing: 14848 tokens x 9.4 KB per block; "
                                        "estimated peak 0.84 GB without, budget 8.00 GB")
    assert plan(0.8, compute_bytes=2).layers == 0  # activations in bf16 (autocast): they fit


def test_the_plan_is_the_fewest_blocks_whose_estimate_fits():
    A, C = TOKENS * saved_bytes_per_token(BENCH, 4, 4), TOKENS * BENCH.dim * 4
    peak = [GB // 4 + 4 * C + k * C + max(4 - k, int(k > 0)) * A for k in range(5)]
    assert peak[4] > peak[3]  # checkpointing the last block too would only add its input
    for k in range(4):
        assert checkpoint_plan(BENCH, TOKENS, 4, 4, GB // 4, peak[k]).layers == k
        assert checkpoint_plan(BENCH, TOKENS, 4, 4, GB // 4, peak[k]).peak_bytes == peak[k]
        assert checkpoint_plan(BENCH, TOKENS, 4, 4, GB // 4, peak[k] - 1).layers == min(k + 1, 3)
    one_block = ModelConfig.from_preset("bench_small", n_layers=1)
    assert checkpoint_plan(one_block, TOKENS, 4, 4, 0, 0).layers == 0  # where it can never pay


def tiny_thinker(seed=0):
    torch.manual_seed(seed)
    base = Transformer(ModelConfig.from_preset("tiny", n_layers=3))
    return QuietStar(base, None, ThoughtConfig(n_ahead=4, n_ahead_talk=2, n_thoughts=2, policy_weight=1.0))


def loss_and_grads(setting, budget_gb=None):
    qs = tiny_thinker()
    qs.model.grad_checkpointing, qs.model.memory_budget_gb = setting, budget_gb
    x = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    out = qs(x, generator=torch.Generator().manual_seed(2))
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in qs.named_parameters() if p.grad is not None}


def test_checkpointing_changes_no_value_or_gradient(capsys):
    """Every block, none, and "auto" with budgets that checkpoint 1 and 2 of the tiny model's 3 blocks: the same
    loss and gradients (the rollout, without gradients, is never checkpointed)."""
    model = tiny_thinker().model
    fixed, tokens = 4 * sum(p.numel() * 4 for p in model.parameters()), 2 * 9 * 10  # B R L, R = 1 + 2 (5 - 1)
    A, C = tokens * saved_bytes_per_token(model.cfg, 4, 4), tokens * model.cfg.dim * 4
    one_block = (fixed + 4 * C + C + 2 * A) / GB  # peak(1): the budget that checkpointing 1 block meets
    loss0, grads0 = loss_and_grads(False)
    assert capsys.readouterr().out == ""
    for setting, gb in ((True, None), ("auto", 1e-9), ("auto", one_block)):
        loss, grads = loss_and_grads(setting, gb)
        assert loss == loss0
        assert grads.keys() == grads0.keys()
        for name in grads0:
            torch.testing.assert_close(grads[name], grads0[name], rtol=1e-6, atol=1e-7, msg=name)
    printed = capsys.readouterr().out
    assert printed.count("activation checkpointing on 2 of 3 blocks") == 1  # the learning pass, said once
    assert printed.count("activation checkpointing on 1 of 3 blocks") == 1


def test_auto_decides_once_per_shape_and_never_through_a_kv_cache(capsys):
    model = Transformer(ModelConfig.from_preset("tiny"))
    model.memory_budget_gb = 1e-6  # nothing fits: the lowest peak, every block but the last
    x = torch.randn(2, 5, model.cfg.dim)
    assert model.checkpointed_layers(x, model.default_attn()) == 1
    assert model.checkpointed_layers(x, model.default_attn()) == 1
    with torch.no_grad():
        assert model.checkpointed_layers(x, model.default_attn()) == 0
    model.grad_checkpointing = True
    assert model.checkpointed_layers(x, model.default_attn()) == 2
    assert model.checkpointed_layers(x, KVCache(model.cfg, 2, 16)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("activation checkpointing on 1 of 2 blocks")
    model.grad_checkpointing = False
    assert model.checkpointed_layers(x, model.default_attn()) == 0


def test_config_fields():
    assert ModelSpec().grad_checkpointing == "auto" and LoopConfig().memory_budget_gb is None
    assert [ModelSpec(grad_checkpointing=v).grad_checkpointing for v in (True, False, "auto", "TRUE")] == \
        ["true", "false", "auto", "true"]
    with pytest.raises(ConfigError, match="model.grad_checkpointing"):
        ModelSpec(grad_checkpointing="sometimes")
    with pytest.raises(ConfigError, match="train.memory_budget_gb"):
        LoopConfig(memory_budget_gb=0)
