"""SFT and the preference losses (DPO, RPO, IPO, SimPO) on completion tokens, through the fused LM head, and the
small loop that fits them.

Every loss reads only the completion's tokens: the prompt (with the <start> the sampler feeds) is context.
The position that predicts <end> has no LM-head row to score (the marker is not in the vocabulary); its
target is the rationale's stop token instead (`end_target`: the closing mark the sampler reads as the end
of the rationale), so a trained model ends its rationale the way the sampler will see it end.

SFT:  mean over completion tokens of -log p(y_t), one linear_logprob_sum (no (tokens, V) tensor is kept).
Preference losses (PreferenceLoss.kind), over P pairs, with s = sum_t log p(y_t) a completion's sequence
log-prob, n its token count, ref the frozen reference's s (computed once per dataset), h the log-ratio margin
(s_c - ref_c) - (s_r - ref_r); each is a mean over pairs:
  dpo    (Rafailov et al. 2023)  -log sigmoid(beta * h)
  rpo    (Pang et al. 2024, "Iterative Reasoning Preference Optimization")  dpo + nll_weight * (-s_c / n_c):
         DPO plus the chosen sequence's length-normalised NLL, which holds its likelihood up (DPO alone acts
         only where the two sides diverge, and can lower both)
  ipo    (Azar et al. 2023)  (h - 1 / (2 * beta))^2: a squared loss to a fixed margin, which does not push
         the margin without bound on pairs it already orders
  simpo  (Meng et al. 2024)  -log sigmoid(beta * (s_c / n_c - s_r / n_r) - gamma): no reference model; the
         margin is between mean per-token log-probs, and gamma is the target margin
A pair may carry a weight (PreferencePair.weight, 1 by default): its term is scaled by it before the mean over P
(Constitutional AI's soft labels, explicit/constitutional.py).
The loss is a function of the 2P sequence log-probs, so dL/ds is one number per sequence, known once s is:
a first LM-head sweep (no grad) gives s, autograd on those 2P numbers gives dL/ds, and a second sweep
applies the per-token weight -dL/ds with its gradient (linear_ce's contract: weights carry no gradient).
Two sweeps over the completion tokens, no full logits.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from quietstar.linear_ce import linear_logprob_sum
from quietstar.optim import build_optimizer, clip_grad_norm


class TokenBatch(NamedTuple):
    ids: torch.Tensor  # (B, L) right-padded prompt + completion (thought ids included)
    targets: torch.Tensor  # (B, L) the token each position predicts (<end> replaced by end_target)
    weight: torch.Tensor  # (B, L) 1.0 where the position predicts a completion token


def token_batch(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int, end_id: int,
                end_target: int, device=None) -> TokenBatch:
    """Right padding: causal attention never reads the pads after a row's last token, so no mask is needed."""
    seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    targets = torch.full_like(ids, pad_id)
    weight = torch.zeros(len(seqs), L)
    for b, (p, s) in enumerate(zip(prompts, seqs)):
        ids[b, :len(s)] = torch.tensor(s)
        nxt = torch.tensor(s[1:])
        targets[b, :len(s) - 1] = torch.where(nxt == end_id, end_target, nxt)
        weight[b, len(p) - 1:len(s) - 1] = 1.0  # positions len(p)-1 .. predict the completion's tokens
    return TokenBatch(ids.to(device), targets.to(device), weight.to(device))


def _hidden(qs, batch: TokenBatch):
    """Final-norm hidden states of the scored positions (N, d), their targets (N,) and rows (N,)."""
    h = qs.model(inputs_embeds=qs.embed(batch.ids), return_hidden=True)  # (B, L, d)
    sel = batch.weight > 0
    rows = torch.arange(batch.ids.shape[0], device=h.device)[:, None].expand_as(sel)[sel]
    return h[sel], batch.targets[sel], rows


def sft_loss(qs, batch: TokenBatch) -> torch.Tensor:
    """Mean -log p over the completion tokens of the batch."""
    h, tgt, _ = _hidden(qs, batch)
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32  # linear_ce's accumulation dtype
    coef = torch.full(tgt.shape, 1.0 / max(1, tgt.numel()), dtype=acc, device=h.device)
    weighted, _ = linear_logprob_sum(h, qs.model.lm_head_weight, tgt, coef)
    return -weighted


def _sequence_sums(logp: torch.Tensor, rows: torch.Tensor, B: int) -> torch.Tensor:
    return torch.zeros(B, dtype=logp.dtype, device=logp.device).index_add_(0, rows, logp)


@torch.no_grad()
def sequence_logprobs(qs, batch: TokenBatch) -> torch.Tensor:
    """(B,) sum of log p over each row's completion tokens."""
    h, tgt, rows = _hidden(qs, batch)
    _, logp = linear_logprob_sum(h, qs.model.lm_head_weight, tgt, torch.zeros_like(tgt, dtype=h.dtype))
    return _sequence_sums(logp, rows, batch.ids.shape[0])


def pair_batch(pairs, pad_id: int, end_id: int, end_target: int, device=None) -> TokenBatch:
    """Chosen rows first, then rejected: rows i and P + i are pair i."""
    prompts = [p.prompt_ids for p in pairs] * 2
    return token_batch(prompts, [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs], pad_id, end_id,
                       end_target, device)


PREFERENCE_LOSSES = ("dpo", "rpo", "ipo", "simpo")


@dataclass(frozen=True)
class PreferenceLoss:
    """Which preference loss, and its settings (the module docstring has the formulas)."""
    kind: str = "dpo"  # dpo | rpo | ipo | simpo
    beta: float = 0.1  # dpo, rpo: the implicit reward's scale; ipo: tau (target margin 1 / (2 beta)); simpo: scale
    nll_weight: float = 1.0  # rpo: the weight of the chosen side's length-normalised NLL
    gamma: float = 0.5  # simpo: the target margin between mean per-token log-probs (times beta)

    def __post_init__(self):
        if self.kind not in PREFERENCE_LOSSES:
            raise ValueError(f"preference loss must be one of {PREFERENCE_LOSSES}, got {self.kind!r}")

    @property
    def needs_reference(self) -> bool:
        return self.kind != "simpo"

    def value(self, s: torch.Tensor, n: torch.Tensor, ref: Optional[torch.Tensor],
              weights: Optional[torch.Tensor] = None):
        """s (2P,) sequence log-probs, chosen rows then rejected; n (2P,) their token counts; ref (P, 2) the
        reference's (chosen, rejected) log-probs, or None for simpo; weights (P,) each pair's weight (None: 1
        each; a pair's whole term, RPO's NLL included, is scaled, and the mean is over P). -> (loss, metrics),
        differentiable in s."""
        P = s.shape[0] // 2
        sc, sr, nc, nr = s[:P], s[P:], n[:P], n[P:]
        mean = (lambda x: x.mean()) if weights is None else (lambda x: (x * weights.to(x)).mean())  # noqa: E731
        metrics = {}
        if self.kind == "simpo":
            margin = sc / nc - sr / nr
            loss = mean(-F.logsigmoid(self.beta * margin - self.gamma))
        else:
            margin = (sc - ref[:, 0].to(s)) - (sr - ref[:, 1].to(s))
            if self.kind == "ipo":
                loss = mean((margin - 1 / (2 * self.beta)) ** 2)
            else:
                loss = mean(-F.logsigmoid(self.beta * margin))
            if self.kind == "rpo":
                nll = mean(-(sc / nc))
                loss = loss + self.nll_weight * nll
                metrics[f"{self.kind}/chosen_nll"] = float(nll.detach())
        metrics[f"{self.kind}/margin"] = float(margin.detach().mean())
        metrics[f"{self.kind}/accuracy"] = float((margin.detach() > 0).float().mean())
        return loss, metrics


def preference_loss(qs, batch: TokenBatch, ref_logps: Optional[torch.Tensor], spec: PreferenceLoss,
                    weights: Optional[torch.Tensor] = None):
    """`spec`'s loss over P pairs in a pair_batch; ref_logps (P, 2): the reference's (chosen, rejected) sequence
    log-probs (None for a reference-free loss); weights (P,): each pair's weight (None: 1 each). -> (loss with
    its gradient, metrics). The value is the loss;
    its gradient is applied through a second fused sweep with the per-token weights -dL/ds (see the module
    docstring)."""
    h, tgt, rows = _hidden(qs, batch)
    B, W = batch.ids.shape[0], qs.model.lm_head_weight
    with torch.no_grad():
        _, logp = linear_logprob_sum(h.detach(), W.detach(), tgt, torch.zeros_like(tgt, dtype=h.dtype))
        s = _sequence_sums(logp, rows, B)
        n = batch.weight.sum(1).to(s)  # completion tokens per row (pads carry no weight)
    s = s.requires_grad_()
    with torch.enable_grad():
        loss, metrics = spec.value(s, n, ref_logps, weights)
        (dl_ds,) = torch.autograd.grad(loss, s)  # (2P,): one number per sequence
    coef = (-dl_ds)[rows].to(h.dtype)  # -dL/ds of each token's row
    weighted, _ = linear_logprob_sum(h, W, tgt, coef)
    surrogate = -weighted  # its gradient is dL/dtheta
    return loss.detach() + (surrogate - surrogate.detach()), metrics


def dpo_loss(qs, batch: TokenBatch, ref_logps: torch.Tensor, beta: float):
    """DPO over P pairs in a pair_batch (preference_loss with kind dpo)."""
    return preference_loss(qs, batch, ref_logps, PreferenceLoss("dpo", beta))


@torch.no_grad()
def reference_logprobs(ref_qs, pairs, pad_id: int, end_id: int, end_target: int, batch_size: int = 64):
    """(P, 2) the frozen reference's (chosen, rejected) sequence log-probs: once per dataset."""
    dev = ref_qs.model.tok_embeddings.weight.device
    out = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        s = sequence_logprobs(ref_qs, pair_batch(chunk, pad_id, end_id, end_target, dev))
        out.append(torch.stack([s[:len(chunk)], s[len(chunk):]], -1))
    return torch.cat(out) if out else torch.zeros(0, 2)


def fit(qs, n_items: int, loss_fn: Callable[[List[int]], tuple], steps: int, batch_size: int, optim_cfg,
        seed: int, progress: Optional[Callable[[int, float], None]] = None) -> List[float]:
    """`steps` AdamW steps (the project's parameter groups and schedule, optim_cfg an OptimConfig) over
    shuffled epochs of n_items; loss_fn(indices) -> (loss, metrics). -> the loss of every step."""
    if n_items == 0 or steps == 0:
        return []
    opt, sched = build_optimizer(qs, optim_cfg, steps)
    params = [p for g in opt.param_groups for p in g["params"]]
    g = torch.Generator().manual_seed(seed)
    order: List[int] = []
    losses = []
    qs.train()
    for step in range(1, steps + 1):
        if len(order) < batch_size:
            order += torch.randperm(n_items, generator=g).tolist() * math.ceil(batch_size / n_items)
        idx, order = order[:batch_size], order[batch_size:]
        loss, _ = loss_fn(idx)
        loss.backward()
        clip_grad_norm(params, optim_cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step, losses[-1])
    qs.eval()
    return losses


def fit_sft(qs, examples, steps: int, batch_size: int, optim_cfg, seed: int, end_target: int, pad_id: int,
            progress=None, replay: Sequence[Sequence[int]] = (), replay_weight: float = 0.0) -> List[float]:
    """SFT on the examples' completions. With `replay` (token ids of whole documents, BOS first) and
    replay_weight > 0, each step adds replay_weight times the mean NLL of every token of the next batch_size
    replay documents (taken in order, cycling)."""
    dev = qs.model.tok_embeddings.weight.device
    replayed = itertools.cycle(replay)

    def replay_loss():
        docs = [next(replayed) for _ in range(batch_size)]
        return sft_loss(qs, token_batch([d[:1] for d in docs], [d[1:] for d in docs], pad_id, qs.end_token_id,
                                        end_target, dev))

    def loss_fn(idx):
        ex = [examples[i] for i in idx]
        batch = token_batch([e.prompt_ids for e in ex], [e.completion_ids for e in ex], pad_id, qs.end_token_id,
                            end_target, dev)
        loss = sft_loss(qs, batch)
        return (loss + replay_weight * replay_loss() if replay_weight > 0 and replay else loss), {}
    return fit(qs, len(examples), loss_fn, steps, batch_size, optim_cfg, seed, progress)


def fit_dpo(qs, ref_qs, pairs, beta: float, steps: int, batch_size: int, optim_cfg, seed: int, end_target: int,
            pad_id: int, progress=None, loss: Optional[PreferenceLoss] = None) -> List[float]:
    """A preference loss (`loss`; None: DPO with `beta`) against `ref_qs` (frozen); its log-probs are computed
    here, once, before the first step (not at all for a reference-free loss). Each pair's term is scaled by its
    `weight` (a soft label's confidence, explicit/constitutional.py) where any weight is not 1."""
    spec = loss if loss is not None else PreferenceLoss("dpo", beta)
    dev = qs.model.tok_embeddings.weight.device
    ref = reference_logprobs(ref_qs, pairs, pad_id, qs.end_token_id, end_target) if spec.needs_reference else None
    weights = torch.tensor([p.weight for p in pairs]) if any(p.weight != 1.0 for p in pairs) else None

    def loss_fn(idx):
        batch = pair_batch([pairs[i] for i in idx], pad_id, qs.end_token_id, end_target, dev)
        return preference_loss(qs, batch, ref[idx] if ref is not None else None, spec,
                               weights[idx] if weights is not None else None)
    return fit(qs, len(pairs), loss_fn, steps, batch_size, optim_cfg, seed, progress)
