"""Distillation of a thinking model into a plain one: the fused chunked KL against an explicit KL on full
logits (values and gradients), the train.py entry point end to end on the tiny model, the student's HF
export without thought parameters, and bad teachers."""

import math

import pytest
import torch
from safetensors.torch import load_file

from quietstar import train as train_script
from quietstar.checkpoint import find_checkpoint, read_model_state, read_train_config, save_checkpoint
from quietstar.methods.registry import TrainConfig
from quietstar.methods.distill.distill import Distiller, build_student
from quietstar.errors import UserError, run_main
from quietstar.export import export
from quietstar.linear_ce import linear_kl_sum
from quietstar.optim import build_optimizer
from tests.test_train import tiny_cfg


# ---------------------------------------------------------------------------------------------- the fused KL


def explicit(h, W, ht, Wt, y, a, b):
    """sum_t a_t KL(p_t || q_t) - b_t log q_t[y_t] on full (N, V) logits, by autograd."""
    logq, logp = torch.log_softmax(h @ W.T, -1), torch.log_softmax(ht @ Wt.T, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    return (a * kl).sum() - (b * logq.gather(-1, y[:, None]).squeeze(-1)).sum(), kl


@pytest.mark.parametrize("chunk", [None, 1, 5, 64])  # 13 rows: 5 leaves a short last chunk
@pytest.mark.parametrize("shared_head", [False, True])
def test_linear_kl_sum_equals_explicit_kl_and_its_gradients(chunk, shared_head):
    g = torch.Generator().manual_seed(0)
    N, d, d_t, V = 13, 6, 9, 37
    h = torch.randn(N, d, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(V, d, dtype=torch.float64, generator=g, requires_grad=True)
    ht, Wt = (torch.randn(N, d, dtype=torch.float64, generator=g), W.detach()) if shared_head else \
        (torch.randn(N, d_t, dtype=torch.float64, generator=g), torch.randn(V, d_t, dtype=torch.float64, generator=g))
    y = torch.randint(V, (N,), generator=g)
    a, b = torch.rand(N, dtype=torch.float64, generator=g), torch.rand(N, dtype=torch.float64, generator=g)
    loss, rows = linear_kl_sum(h, W, ht, Wt, y, a, b, chunk=chunk)
    ref, kl = explicit(h, W, ht, Wt, y, a, b)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rows.kl, kl.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rows.teacher_logp, torch.log_softmax(ht @ Wt.T, -1).gather(-1, y[:, None]).squeeze(-1))
    grads = torch.autograd.grad(2.5 * loss, (h, W))  # an upstream gradient other than 1 is applied too
    want = torch.autograd.grad(2.5 * ref, (h, W))
    for name, got, exp in zip(("dh", "dW"), grads, want):
        torch.testing.assert_close(got, exp, rtol=1e-11, atol=1e-12, msg=lambda m: f"{name}: {m}")
    assert bool((rows.kl >= 0).all()) and float(rows.kl.max()) > 0.1  # a real KL, not a trivial case


def test_linear_kl_sum_keeps_leading_dims_and_is_zero_for_the_same_distribution():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 3, 4, 8, generator=g, requires_grad=True)
    W = torch.randn(50, 8, generator=g, requires_grad=True)
    y = torch.randint(50, (2, 3, 4), generator=g)
    loss, rows = linear_kl_sum(h, W, h.detach(), W.detach(), y, torch.ones(2, 3, 4))
    assert rows.kl.shape == (2, 3, 4) and float(rows.kl.abs().max()) < 1e-5
    dh, dW = torch.autograd.grad(loss, (h, W))
    assert float(dh.abs().max()) < 1e-5 and float(dW.abs().max()) < 1e-5  # KL is at its minimum
    with pytest.raises(ValueError, match="leading dims"):
        linear_kl_sum(h, W, h.detach()[:1], W.detach(), y, torch.ones(2, 3, 4))


# ---------------------------------------------------------------------------------------------- end to end


def checkpoint_of(cfg, root, thinking_head: bool):
    """A training checkpoint of the tiny model built from `cfg` (with its full config). thinking_head: a
    talk head far from zero, so that the teacher's mixed prediction differs from its base one."""
    qs, tok = train_script.build_thinker(cfg, torch.device("cpu"))
    if thinking_head:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for layer in qs.talk_head.net[::2]:  # w of order 0.1-1 (the fresh head gives exactly 0)
                layer.weight.normal_(std=0.1, generator=g)
    opt, sched = build_optimizer(qs, cfg.optim, max_steps=1)
    return save_checkpoint(root / "checkpoints", 1, qs, opt, sched, data_state={}, generator=None,
                           config_yaml=train_script.config_yaml(cfg), tokenizer=tok, save_optimizer=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny thinking teacher and a tiny plain-LM checkpoint."""
    root = tmp_path_factory.mktemp("distill")
    teacher = checkpoint_of(tiny_cfg(root / "teacher"), root / "teacher", thinking_head=True)
    plain = checkpoint_of(tiny_cfg(root / "plain", "thought.enabled=false"), root / "plain", thinking_head=False)
    return root, teacher, plain


def test_student_starts_from_the_teachers_weights_and_holds_no_teacher_state(runs):
    root, teacher, _ = runs
    cfg = tiny_cfg(root / "unused", f"distill.teacher={teacher}")
    assert not cfg.thought.enabled  # the student's config says it does not think
    qs, _ = train_script.build_thinker(cfg, torch.device("cpu"))
    assert isinstance(qs, Distiller) and not any(p.requires_grad for p in qs.teacher.parameters())
    saved = read_model_state(teacher)
    assert set(qs.state_dict()) == set(saved)  # nothing of the teacher in the student's state dict
    for k, v in qs.state_dict().items():
        assert torch.equal(v, saved[k]), k


@pytest.mark.parametrize("objective", ["kl", "ntp_rl"])
def test_entry_point_trains_a_plain_student_that_exports_as_a_plain_hf_model(runs, objective, tmp_path):
    root, teacher, _ = runs
    out = tmp_path / "student"
    result = train_script.train(tiny_cfg(out, "train.max_steps=2", f"distill.teacher={teacher}",
                                         f"distill.objective={objective}", "distill.nll_weight=0.5", "optim.lr=1e-3"))
    assert result.status == "done" and result.step == 2 and result.checkpoint is not None
    m = result.metrics
    assert m["distill/kl"] > 1e-3 and m["distill/teacher_nll"] > 0 and all(map(math.isfinite, result.losses))
    if objective == "ntp_rl":
        assert m["distill/reward_mean"] >= 0 and 0 <= m["distill/reward_pos_frac"] <= 1
    assert not read_train_config(result.checkpoint, TrainConfig).thought.enabled
    changed = [k for k, v in read_model_state(result.checkpoint).items() if k.startswith("model.") and
               not torch.equal(v, read_model_state(teacher)[k])]
    assert changed  # the student's base weights moved

    transformers = pytest.importorskip("transformers")
    hf_dir = export(find_checkpoint(out), tmp_path / "hf")
    for f in ("quietstar.safetensors", "quietstar.json"):  # a plain model: nothing of Quiet-STaR is needed
        (hf_dir / f).unlink()
    assert not any(k.startswith(("start_", "end_", "talk_")) for k in load_file(hf_dir / "model.safetensors"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    from quietstar.methods.quietstar.load import load_thinker_checkpoint

    student = load_thinker_checkpoint(result.checkpoint).model
    x = torch.randint(3, 250, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, student(x), rtol=0, atol=1e-5)


def test_ntp_rl_teacher_gain_is_the_nll_weighted_by_the_teachers_advantage(runs):
    """ntp_variant=teacher_gain: the policy term's gradient is that of -mean r log q(x_{i+1}) with
    r = max(0, CE_student - CE_teacher), recomputed here from full logits."""
    root, teacher, _ = runs
    cfg = tiny_cfg(root / "unused", f"distill.teacher={teacher}", "distill.objective=ntp_rl",
                   "distill.ntp_variant=teacher_gain", "distill.policy_temperature=1")
    qs, _ = train_script.build_thinker(cfg, torch.device("cpu"))
    x = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(2))
    out = qs(x, generator=torch.Generator().manual_seed(3))
    W = qs.model.lm_head_weight
    got = torch.autograd.grad(out.loss, W)[0]
    logq = torch.log_softmax(qs.model(x), -1)[:, :-1].gather(-1, x[:, 1:, None]).squeeze(-1)  # (B, L-1)
    with torch.no_grad():
        h0, h_mix, _, _ = qs.teacher.next_token_hidden(x, generator=torch.Generator().manual_seed(3))
        logp = torch.log_softmax(qs.teacher.model.head(h_mix[:, 0]), -1)[:, :-1].gather(-1, x[:, 1:, None]).squeeze(-1)
    r = (logp - logq.detach()).clamp_min(0)
    want = torch.autograd.grad(-(r * logq).sum() / r.numel(), W)[0]
    assert float(r.max()) > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_a_missing_or_plain_teacher_is_one_clear_error(runs, tmp_path, capsys):
    root, _, plain = runs
    with pytest.raises(UserError, match=r"distill.teacher=.*plain-LM checkpoint \(thought.enabled=false\)"):
        build_student(tiny_cfg(root / "unused", f"distill.teacher={plain}"), None, None, "cpu")
    missing = tmp_path / "no_such_run"
    with pytest.raises(SystemExit) as exit_info:  # what train.py prints: one line, exit status 2
        run_main(train_script.train, tiny_cfg(tmp_path / "out", f"distill.teacher={missing}"))
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1
    assert lines[0].startswith("error: distill.teacher=") and str(missing) in lines[0] and "does not exist" in lines[0]
