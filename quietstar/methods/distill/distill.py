"""Distil a thinking model into one that does not think (System 2 -> System 1).

    python train.py distill.teacher=<thinking checkpoint or run dir> [distill.objective=kl|ntp_rl] ...
    python train.py experiment=distill_reasoning distill.teacher=<learn_to_think run>/quietstar   # + evaluation

The student is the plain base model (no thought tokens, no talk head: a `PlainLM`, the same parameters and
checkpoints), initialised from the teacher's weights unless `init_from` names another checkpoint. The
teacher is a frozen `QuietStar`; at every step it samples a thought at every position (`teacher_thoughts`
of them) and gives its talk-head-mixed next-token prediction there, as the paper evaluates it (K = 1: the
`<end>` step's hidden state mixed with the text's). The student sees only the text.

Objectives (`distill.objective`):

  kl       sum_i KL(p_teacher(.|i) || q_student(.|i)) over the scorable positions, averaged, plus
           `nll_weight` x the student's NLL. The teacher's p is the mixed prediction after one sampled thought,
           so a step's gradient is an unbiased estimate of the gradient of KL(E_thought p || q): the
           student is pulled towards the teacher's prediction averaged over its thoughts, which is what a
           model without thoughts can at best represent. Computed by `linear_kl_sum` (linear_ce.py): the
           teacher's mixed hidden states (N, d) and the student's (N, d) go through their LM heads chunk by
           chunk, with the KL's gradient in the same pass; no (tokens, V) logits exist at any time.
  ntp_rl   the NTP stage of Fast Quiet-STaR (Huang et al. 2025, arXiv 2505.17746), `ntp_variant`:
           official  as the authors' code (`modeling_*_last.py`, mode `last_rl`): per position i the reward
                         r_i = max(0, CE_teacher(x_{i+1}) - CE_student(x_{i+1}))      (detached),
                     positive where the student already predicts the true token better than the teacher,
                     and the REINFORCE term -r_i log q_tau(a_i), a_i drawn from the student's own prediction
                     at temperature 1, its log-probability tempered by `policy_temperature` (official 3),
                     averaged over the scorable positions (the official mean also counts padding), times
                     `policy_weight` (official 1e6), plus `nll_weight` x NLL (official: none; the code
                     computes its NLL and overwrites it).
                     NOTE: r_i does not depend on a_i, so at tau = 1 the expected gradient is exactly 0
                     (E_a grad log q(a) = 0) and only noise is left; at tau != 1 it is r_i (q_tau - q) / tau
                     in the logits (the expected gradient of the loss), which sharpens the student's
                     prediction towards its own top token (tau > 1) wherever r_i > 0. The teacher enters only
                     through the size of r_i, never through what it predicts.
           teacher_gain  the reading that can transfer something: the reward where the teacher is better,
                         r_i = max(0, CE_student(x_{i+1}) - CE_teacher(x_{i+1})),
                     and the true next token as the action (a_i = x_{i+1}): the student's NLL weighted by how
                     much the thought helped at each position, which stops where the student has caught up.
           docs/distillation.md has the measurements of these and of kl.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from quietstar.errors import ConfigError, UserError
from quietstar.linear_ce import linear_kl_sum, linear_logprob_sum, lm_head_chunks
from quietstar.masks import ThoughtGrid
from quietstar.methods.plain.model import PlainLM, _in_document
from quietstar.methods.quietstar.config import ThoughtConfig
from quietstar.methods.quietstar.thinker import QuietStar
from quietstar.methods.quietstar.scoring import ThoughtOutput
from quietstar.methods.quietstar.rollout import sample_categorical

STUDENT_OBJECTIVES = ("kl", "ntp_rl")


@dataclass
class DistillConfig:
    """Distillation of a thinking teacher into the plain model (`teacher` set: train.py trains a student)."""

    teacher: Optional[str] = None
    """A thinking (thought.enabled=true) training checkpoint: a step dir, checkpoints/ dir or run dir. None = no
    distillation. The student starts from its weights unless `init_from` is given."""
    objective: str = "kl"  # kl (KL(teacher || student) at every position) | ntp_rl (Fast Quiet-STaR's NTP stage)
    nll_weight: float = 0.0  # the student's plain next-token NLL, added with this weight
    teacher_thoughts: int = 1  # thoughts the teacher samples per position per step (the KL averages over them)
    policy_weight: float = 1.0  # ntp_rl: weight of the REINFORCE term (official 1e6)
    policy_temperature: float = 3.0  # ntp_rl: temperature of the action's log-probability (official 3)
    ntp_variant: str = "official"
    """ntp_rl: official (reward max(0, CE_teacher - CE_student) on a token drawn from the student: the authors'
    code) | teacher_gain (reward max(0, CE_student - CE_teacher) on the true next token)."""
    base: Optional[str] = None
    """experiment=distill_reasoning: the no-thought reference scored beside teacher and student (default: the
    checkpoint the teacher's run started from, its pretrain stage)."""

    def __post_init__(self):
        if self.objective not in STUDENT_OBJECTIVES:
            raise ConfigError(f"distill.objective must be one of {STUDENT_OBJECTIVES}, got {self.objective!r}")
        if self.ntp_variant not in ("official", "teacher_gain"):
            raise ConfigError(f"distill.ntp_variant must be official or teacher_gain, got {self.ntp_variant!r}")
        if self.teacher_thoughts < 1:
            raise ConfigError(f"distill.teacher_thoughts must be >= 1, got {self.teacher_thoughts}")
        for name in ("nll_weight", "policy_weight"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"distill.{name} must be >= 0, got {getattr(self, name)}")
        if not self.policy_temperature > 0:
            raise ConfigError(f"distill.policy_temperature must be > 0, got {self.policy_temperature}")
        if self.teacher is not None and not self.teacher:
            raise ConfigError("distill.teacher must be a checkpoint path or null")


def teacher_checkpoint(path) -> Path:
    """The step dir of the teacher `path` names. A missing path, a damaged checkpoint or a plain-LM checkpoint
    is a UserError naming distill.teacher and the file."""
    from quietstar.checkpoint import CheckpointError, find_checkpoint, read_config_section

    try:
        ckpt = find_checkpoint(path)
        if not read_config_section(ckpt, "thought", ThoughtConfig).enabled:
            raise UserError(f"distill.teacher={str(path)!r}: {ckpt} is a plain-LM checkpoint (thought.enabled="
                            "false), not a thinking model")
    except CheckpointError as e:
        raise UserError(f"distill.teacher={str(path)!r}: {e}") from e
    return ckpt


def load_teacher(path, device=None) -> QuietStar:
    """The frozen thinking teacher (see teacher_checkpoint for the errors)."""
    from quietstar.checkpoint import CheckpointError
    from quietstar.methods.quietstar.load import load_thinker_checkpoint

    ckpt = teacher_checkpoint(path)
    try:
        teacher = load_thinker_checkpoint(ckpt, device=device)
    except CheckpointError as e:
        raise UserError(f"distill.teacher={str(path)!r}: {e}") from e
    teacher.eval().requires_grad_(False)
    return teacher


def build_student(cfg, base, tok, device) -> "Distiller":
    """The student for train.py: `base` (the run's model) as a plain LM beside the loaded teacher, with the
    teacher's weights (or init_from's)."""
    from quietstar.checkpoint import init_weights

    teacher = load_teacher(cfg.distill.teacher, device)
    V, Vt = base.cfg.vocab_size, teacher.model.cfg.vocab_size
    if V != Vt:
        raise UserError(f"distill.teacher={cfg.distill.teacher!r}: its vocabulary ({Vt}) differs from the student's "
                        f"model ({V}); the KL needs the same tokens")
    student = Distiller(base, tok, cfg.thought, teacher, cfg.distill)
    init_weights(student, cfg.init_from or cfg.distill.teacher)
    return student.to(device)


def check(cfg) -> None:
    """A run with distill.teacher trains a student that never thinks: its thought section (and so its saved
    config) says so."""
    if cfg.distill.teacher and cfg.thought.enabled:
        cfg.thought = dataclasses.replace(cfg.thought, enabled=False)


class Distiller(PlainLM):
    """A PlainLM trained towards a thinking teacher. The teacher is held outside the module's parameters and
    state dict: checkpoints, the optimizer and export see only the student, which is a plain LM."""

    def __init__(self, model, tokenizer, cfg, teacher: QuietStar, distill: DistillConfig):
        super().__init__(model, tokenizer, cfg)
        object.__setattr__(self, "teacher", teacher)  # not registered: never saved, moved or trained
        self.distill = distill

    def forward(self, input_ids, attention_mask=None, generator=None, doc_ids=None, thoughts=None) -> ThoughtOutput:
        lengths = self._check_input(input_ids, attention_mask)
        B, L = input_ids.shape
        n = self.distill.teacher_thoughts
        attn = None if doc_ids is None else _in_document(L, lengths, doc_ids, input_ids.device)
        h = self.model(input_ids, attention_mask=attention_mask, attn=attn, return_hidden=True)  # (B, L, d)
        _, h_teacher, w, _ = self.teacher.next_token_hidden(input_ids, attention_mask, generator, n, doc_ids=doc_ids)
        # x_{i+1} is a real token of position i's document (the last token of a document predicts nothing)
        ok = ThoughtGrid.target_ok(L, 0, lengths, doc_ids, input_ids.device).expand(B, L)
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        ok = ok.to(acc)[:, None].expand(B, n, L)  # (B, n, L): each of the n teacher thoughts is one row
        coef = ok / ok.sum().clamp_min(1)  # a mean over positions and thoughts
        tgt = ThoughtGrid.target(input_ids, 0)[:, None].expand(B, n, L)
        h_rows = h[:, None].expand(B, n, L, h.shape[-1])
        W, Wt = self.model.lm_head_weight, self.teacher.model.lm_head_weight
        d = self.distill
        if d.objective == "kl":
            loss, rows = linear_kl_sum(h_rows, W, h_teacher, Wt, tgt, coef, d.nll_weight * coef)
            metrics = {"distill/kl": (coef * rows.kl).sum().detach()}
        else:
            with torch.no_grad():
                _, rows = linear_kl_sum(h_rows, W, h_teacher, Wt, tgt, coef)
            gap = rows.student_logp - rows.teacher_logp  # CE_teacher - CE_student
            if d.ntp_variant == "official":
                reward, action = gap.clamp_min(0) * ok, self._sample_actions(h_rows, generator)
            else:
                reward, action = (-gap).clamp_min(0) * ok, tgt
            weighted, _ = linear_logprob_sum(h_rows, W, action, reward * coef, d.policy_temperature, skip_zero=True)
            loss = -d.policy_weight * weighted
            if d.nll_weight > 0:
                loss = loss - d.nll_weight * linear_logprob_sum(h_rows, W, tgt, coef)[0]
            metrics = {"distill/kl": (coef * rows.kl).sum().detach(), "distill/reward_mean": (coef * reward).sum(),
                       "distill/reward_pos_frac": (coef * (reward > 0)).sum()}
        nll = -(coef * rows.student_logp).sum()
        metrics.update({"train/loss": loss.detach(), "train/nll": nll, "train/nll_base": nll,
                        "distill/teacher_nll": -(coef * rows.teacher_logp).sum(),
                        "distill/teacher_mix_weight": (coef * w).sum()})
        zero = nll.new_zeros(())
        empty = torch.zeros(B, 1, L, 0, dtype=torch.long, device=input_ids.device)
        return ThoughtOutput(loss=loss, nll=nll, policy_loss=zero, reward=zero, mix_weight=zero, thoughts=empty,
                             metrics=metrics)

    @torch.no_grad()
    def _sample_actions(self, h_rows: torch.Tensor, generator) -> torch.Tensor:
        """One token per row from the student's prediction at temperature 1 (..., d) -> (...,), the LM head
        in chunks (the official code's hard Gumbel-softmax draws from the same distribution)."""
        flat = h_rows.reshape(-1, h_rows.shape[-1])
        out = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
        for c0, c1, logits in lm_head_chunks(flat, self.model.lm_head_weight):
            out[c0:c1] = sample_categorical(logits, 1.0, generator, overwrite=True)
        return out.view(h_rows.shape[:-1])

