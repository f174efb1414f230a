"""The objective's inputs and the loss of a Quiet-STaR step, in three named stages: score (the fused LM-head sums
of the base, talk and thought predictions), objective (objective.py: NLL weights, rewards, advantages, policy
weights) and metrics (0-dim tensors); and the learned gate's loss (thought.where=gate)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from quietstar.linear_ce import LogitsBuffer, WeightGradSum, linear_logprob_sum
from quietstar.masks import GridStates, ThoughtGrid, at_positions
from quietstar.methods.quietstar.objective import get_objective, masked_mean
from quietstar.methods.quietstar.objective import metrics as objective_metrics
from quietstar.methods.quietstar.rollout import TextAttention
from quietstar.methods.quietstar.where import Selection

@dataclass
class ThoughtOutput:
    loss: torch.Tensor  # scalar: nll + policy_weight * policy_loss (with grad)
    nll: torch.Tensor  # scalar: base_loss_weight * CE_base + (1 - base_loss_weight) * mean_k CE_talk_k
    policy_loss: torch.Tensor  # scalar: the REINFORCE term before its weight
    reward: torch.Tensor  # scalar: mean over scorable positions of R = sum_k (CE_base - CE_talk_k)
    mix_weight: torch.Tensor  # scalar: mean w over scorable talk predictions
    thoughts: torch.Tensor  # (B, n, L, T-3) the sampled thought tokens
    metrics: dict = field(default_factory=dict)  # diagnostics, 0-dim tensors (numbers only in train.py, per log_every)
    # per-position detail (detached), for tests and analysis
    ce_base: Optional[torch.Tensor] = None  # (B, L) CE of x_{i+1} without a thought
    ce_talk: Optional[torch.Tensor] = None  # (B, n, K, L) CE of x_{i+k+1} from the mixed talk prediction
    mix_weights: Optional[torch.Tensor] = None  # (B, n, K, L) w of each talk prediction
    rewards: Optional[torch.Tensor] = None  # (B, n, L) R(i) (0 where not scorable)
    advantages: Optional[torch.Tensor] = None  # (B, n, L) A(i) as used by the policy loss
    # (B, n, L, T-3) tempered log pi of each sampled token where its policy weight is nonzero; NaN elsewhere
    # (clamped advantages, padding: those rows are not computed)
    thought_logprobs: Optional[torch.Tensor] = None
    selection: Optional[Selection] = None  # thought.where's thinking positions: the L above is then P of them


class TalkScores(NamedTuple):
    nll: torch.Tensor  # 0-dim, with grad
    ce_base: torch.Tensor  # (B, L) CE of x_{i+1} without a thought, detached
    ce_talk: torch.Tensor  # (K, B, n, L) CE of x_{i+k+1} after the thought, detached
    mix_weight: torch.Tensor  # (K, B, n, L) w of each talk prediction
    ce_thought: Optional[torch.Tensor] = None  # (K, B, n, L) the same from the thought row alone (unmixed)


class BaseScore(NamedTuple):
    """The no-thought term scored before the thinking positions are known (thought.where = entropy: its pass
    gives the selector's entropies). The objective's base weights may then change at the thinking positions
    only; `score_talk` adds the difference there."""

    weighted: torch.Tensor  # 0-dim, with grad: sum coef * log p(x_{i+1})
    ce: torch.Tensor  # (B, L) CE of x_{i+1} without a thought, detached
    coef: torch.Tensor  # (B, L) the weights it was scored with
    entropy: torch.Tensor  # (B, L) next-token entropy of the base prediction (NaN where coef is 0)
    head_grad: WeightGradSum  # the LM head's weight gradient, which the other scoring calls continue


class PassResult(NamedTuple):
    """What a learning pass (thought.impl) hands to the scoring."""

    hidden: torch.Tensor  # (B, R, L, d) final-norm hidden states in the grid layout, or GridStates
    thoughts: torch.Tensor  # (B, n, P, T-3)
    extra_loss: Optional[torch.Tensor]  # added to the loss (None: nothing)
    metrics: dict  # 0-dim tensors
    selection: Optional[Selection] = None  # the thinking positions (None: every position)
    base: Optional[BaseScore] = None  # the no-thought term, when scored already (None: score_talk scores it)
    buf: Optional[LogitsBuffer] = None  # the forward's logits scratch, for the scoring calls to reuse


class Scoring:
    """QuietStar's scoring and losses (a base class of QuietStar: `self` is the module)."""

    def losses(self, hidden, input_ids, thoughts, attention_mask=None, doc_ids=None,
               selection: Optional[Selection] = None, base: Optional[BaseScore] = None,
               buf: Optional[LogitsBuffer] = None) -> ThoughtOutput:
        """NLL + REINFORCE from the grid's hidden states (B, R, L, d), or GridStates (of the subset grid of
        `selection`'s thinking positions). The objective's pure functions (objective.py, chosen by
        cfg.objective) give the weights; `score_*` apply them (cfg.scoring). `base`: the no-thought term,
        already scored (`score_base`); `buf`, the logits scratch to reuse."""
        cfg, obj = self.cfg, get_objective(self.cfg.objective)
        states = hidden if isinstance(hidden, GridStates) else GridStates(hidden[:, 0], hidden[:, 1:], None)
        positions = states.positions
        B, L, d = states.text.shape
        grid = self.grid(thoughts.shape[1])
        lengths = None if attention_mask is None else attention_mask.long().sum(-1)
        acc = torch.float64 if states.text.dtype == torch.float64 else torch.float32
        device = states.text.device
        scope = obj.scope(grid, B, L, lengths, doc_ids, cfg, device) if positions is None else \
            obj.scope(grid, B, L, lengths, doc_ids, cfg, device, positions, selection.valid)
        coef_base, coef_talk = self.nll_coefficients(scope, grid.n, acc)
        buf = LogitsBuffer() if buf is None else buf  # the logits scratch of both scoring calls
        head_grad = WeightGradSum() if base is None else base.head_grad  # one LM-head weight gradient (-nll, policy)
        unmixed = (cfg.reward_from or obj.reward_from) == "unmixed"
        read, kept = self.read_steps(thoughts, grid) if self.close_id is not None else (None, None)  # close_token
        talk = self.score_talk(states, input_ids, grid, coef_base, coef_talk, buf, base, head_grad, unmixed, read)
        ce_none = talk.ce_base if self.ema is None else self.teacher_ce(input_ids, lengths, doc_ids, buf)
        reward = obj.rewards(ce_none, talk.ce_thought if unmixed else talk.ce_talk, scope, cfg)
        adv = obj.advantages(reward, scope, cfg)
        if grid.n_sampled > 0:
            coef = obj.policy_coefficients(adv, scope, cfg, grid.n_sampled)
            if kept is not None:  # the tokens after a thought's close are not part of it
                coef = coef * kept
            policy_loss, logp = self.score_thoughts(states, thoughts, grid, coef, buf, head_grad)
        else:
            policy_loss, logp = states.text.new_zeros(()), None
        loss = talk.nll + cfg.policy_weight * policy_loss + head_grad.attach(self.model.lm_head_weight)
        thought_ok = at_positions(grid.target_ok(L, -1, lengths, None, device).expand(B, L), positions)  # real positions
        if positions is not None:
            thought_ok = thought_ok & selection.valid
        m = objective_metrics(loss, talk.nll, policy_loss, talk.ce_base, talk.ce_talk, reward, adv, talk.mix_weight,
                              scope, cfg, thoughts, thought_ok[:, None].expand(B, grid.n, -1), self.model.cfg.vocab_size)
        if kept is not None:
            m["thought/length_mean"] = masked_mean(kept.sum(-1).to(acc), scope.scorable[:, None].expand_as(reward))
        if self.gate is not None and positions is not None:  # the gate learns the reward it predicts
            gate_mse = self.gate_loss(states.text, positions, reward, scope.scorable)
            loss = loss + cfg.gate_loss_weight * gate_mse
            m["thought/gate_mse"] = gate_mse.detach()
        return ThoughtOutput(loss=loss, nll=talk.nll.detach(), policy_loss=policy_loss.detach(),
                             reward=m["thought/reward_mean"], mix_weight=m["thought/mix_weight_mean"],
                             thoughts=thoughts, metrics=m, ce_base=talk.ce_base,
                             ce_talk=talk.ce_talk.permute(1, 2, 0, 3), mix_weights=talk.mix_weight.permute(1, 2, 0, 3),
                             rewards=reward, advantages=adv, thought_logprobs=logp, selection=selection)

    def gate_loss(self, h_text, positions, reward, scorable) -> torch.Tensor:
        """Squared error of the gate's prediction at the thinking positions against the mean reward of the n
        thoughts there, over the scorable ones. h_text (B, L, d) (detached: the gate does not train the
        model), positions (B, P), reward (B, n, P), scorable (B, P)."""
        pred = self.gate(at_positions(h_text.detach(), positions))  # (B, P)
        err = (pred - reward.detach().mean(1).float()) ** 2
        return (err * scorable).sum() / scorable.sum().clamp_min(1)

    def prescore_base(self, selection: Optional[Selection] = None) -> bool:
        """Whether the learning pass scores the base term before choosing the positions (where = entropy, none
        given): its LM-head pass then gives the entropies, and the talk call rescores the thinking positions'
        base rows for their change of weight. That costs three vocabulary matmuls per thinking position
        against the one per position of a separate entropy pass, so it is taken below a third of them (and
        with a threshold, whose share is not known in advance)."""
        cfg = self.cfg
        return cfg.where == "entropy" and selection is None and (cfg.think_threshold is not None
                                                                  or 3 * cfg.think_fraction < 1)

    def nll_coefficients(self, scope, n: int, acc: torch.dtype):
        """The objective's NLL weights (base (B, L), talk (K, B, n, P)) times thought.nll_weight."""
        coef_base, coef_talk = get_objective(self.cfg.objective).nll_coefficients(scope, n, self.cfg, acc)
        w = self.cfg.nll_weight
        return (coef_base, coef_talk) if w == 1.0 else (w * coef_base, w * coef_talk)

    def score_base(self, h_text, input_ids, lengths=None, doc_ids=None,
                   buf: Optional[LogitsBuffer] = None) -> BaseScore:
        """The no-thought term before any position is chosen, with the base next-token entropies from the same
        LM-head pass (thought.where = entropy's scores): weighted by the objective's base weights for a step
        in which no position thinks. h_text (B, L, d)."""
        cfg, obj = self.cfg, get_objective(self.cfg.objective)
        B, L = input_ids.shape
        grid = self.grid()
        acc = torch.float64 if h_text.dtype == torch.float64 else torch.float32
        none = input_ids.new_zeros(B, 0)
        scope = obj.scope(grid, B, L, lengths, doc_ids, cfg, input_ids.device, none, none.bool())
        coef, _ = self.nll_coefficients(scope, grid.n, acc)
        head_grad = WeightGradSum()  # -weighted enters the loss (through the NLL), and losses() attaches it
        weighted, logp, entropy = self._logprob_sum(h_text.reshape(B * L, -1), grid.target(input_ids, 0).flatten(),
                                                    coef.flatten(), buf=buf, entropy=True, head_grad=head_grad,
                                                    scale=-1.0)
        return BaseScore(weighted, -logp.view(B, L), coef, entropy.view(B, L), head_grad)

    def score_talk(self, hidden, input_ids, grid: ThoughtGrid, coef_base, coef_talk,
                   buf: Optional[LogitsBuffer] = None, base: Optional[BaseScore] = None,
                   head_grad: Optional[WeightGradSum] = None, unmixed: bool = False,
                   read: Optional[torch.Tensor] = None) -> "TalkScores":
        """The no-thought prediction of x_{i+1} at every position and the K mixed talk predictions of x_{i+k+1}
        (talk step k) at the thinking positions, all in one LM-head pass: -nll = sum coef * log p.
        hidden: GridStates; coef_base (B, L), coef_talk (K, B, n, P). With `base` scored already, the pass
        takes only the change of its weights, at the thinking positions (coef_base - base.coef). With
        `unmixed`, the same pass also scores the talk rows' own predictions (weight 0: for the reward only).
        `read` (B, n, P): the step each thought is read at, in place of the <end> step (thought.close_token)."""
        h0, positions = hidden.text, hidden.positions  # (B, L, d)
        B, L, d = h0.shape
        K, n, P = grid.K, grid.n, hidden.rows.shape[2]
        h_mix, ws, h_own = [], [], []
        for k in range(K):
            h_base = at_positions(grid.ahead(h0, k), positions)[:, None].expand(B, n, P, d)
            h_own.append(grid.at_step(hidden, grid.talk_step(k)) if read is None else grid.at_steps(hidden, read))
            hm, w = self.mix(h_base, h_own[-1])
            h_mix.append(hm)
            ws.append(w)
        targets = torch.stack([at_positions(grid.target(input_ids, k), positions) for k in range(K)])  # (K, B, P)
        if base is None:
            h_first, t_first, c_first = h0, grid.target(input_ids, 0), coef_base
        else:
            h_first, t_first = at_positions(h0, positions), targets[0]
            c_first = at_positions(coef_base - base.coef, positions)
        t_talk = targets[:, :, None].expand(K, B, n, P).flatten()
        tgt = [t_first.flatten(), t_talk]
        h_all = [h_first.reshape(-1, d), torch.stack(h_mix).view(-1, d)]
        coef = [c_first.flatten(), coef_talk.flatten()]
        if unmixed:
            tgt.append(t_talk)
            h_all.append(torch.stack(h_own).reshape(-1, d))
            coef.append(torch.zeros_like(coef[1]))
        weighted, logp = self._logprob_sum(torch.cat(h_all), torch.cat(tgt), torch.cat(coef), buf=buf,
                                           head_grad=head_grad, scale=-1.0)
        first, talk = t_first.numel(), t_talk.numel()
        ce_talk = -logp[first:first + talk].view(K, B, n, P)
        ce_own = -logp[first + talk:].view(K, B, n, P) if unmixed else None
        if base is None:
            return TalkScores(-weighted, -logp[:first].view(B, L), ce_talk, torch.stack(ws), ce_own)
        return TalkScores(-(base.weighted + weighted), base.ce, ce_talk, torch.stack(ws), ce_own)

    @torch.no_grad()
    def teacher_ce(self, input_ids, lengths=None, doc_ids=None, buf: Optional[LogitsBuffer] = None) -> torch.Tensor:
        """The EMA teacher's CE of x_{i+1} at every position (B, L): the RLP reward's no-thought counterfactual."""
        B, L = input_ids.shape
        attn = TextAttention(self.model.cfg.n_layers, lengths, doc_ids)
        pos = torch.arange(L, device=input_ids.device).expand(B, L)
        weights = self.ema.weights(self.model)  # cast once (16-bit models): the forward and the head share it
        h = torch.func.functional_call(self.model, weights, (input_ids,), dict(position_ids=pos, attn=attn,
                                                                                return_hidden=True), tie_weights=True)
        head = weights["output.weight" if self.model.output is not None else "tok_embeddings.weight"]
        targets = ThoughtGrid.target(input_ids, 0)
        _, logp = linear_logprob_sum(h.reshape(B * L, -1), head, targets.flatten(),
                                     torch.zeros(B * L, device=h.device, dtype=torch.float32), buf=buf)
        return -logp.view(B, L)

    def score_thoughts(self, hidden, thoughts, grid: ThoughtGrid, coef, buf: Optional[LogitsBuffer] = None,
                       head_grad: Optional[WeightGradSum] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-policy = sum coef * tempered log pi(t_m), t_m predicted at step m. -> (policy loss, log pi
        (B, n, P, T-3), detached, NaN where coef is 0: a row without weight is not computed)."""
        weighted, logp = self._logprob_sum(grid.sampled_rows(hidden), thoughts, coef, self.cfg.policy_temperature,
                                           skip_zero=True, buf=buf, head_grad=head_grad, scale=-self.cfg.policy_weight)
        return -weighted, logp

    def _logprob_sum(self, h, targets, coef, temperature: float = 1.0, skip_zero: bool = False,
                     buf: Optional[LogitsBuffer] = None, entropy: bool = False,
                     head_grad: Optional[WeightGradSum] = None, scale: float = 1.0):
        """(sum coef * log softmax(h W^T / temperature)[targets], log-probs detached (NaN where coef is 0 with
        skip_zero)[, with `entropy` the rows' entropies (NaN where coef is 0)]): the fused kernel (its logits in
        `buf`; the LM head's weight gradient of `scale` x the sum added to `head_grad`, which the caller attaches
        to the loss), or (cfg.scoring = "plain") full logits and autograd, to prototype against."""
        W = self.model.lm_head_weight
        if self.cfg.scoring == "fused":
            return linear_logprob_sum(h, W, targets, coef, temperature, skip_zero=skip_zero, buf=buf, entropy=entropy,
                                      dw_into=head_grad, dw_scale=scale)
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        z = torch.log_softmax(F.linear(h, W).to(acc) / temperature, -1)
        logp = z.gather(-1, targets[..., None]).squeeze(-1)
        weighted = (coef.to(acc) * logp).sum()
        logp = logp.detach()
        out = (weighted, logp.masked_fill(coef == 0, float("nan")) if skip_zero else logp)
        if entropy:
            out += (-(z.exp() * z).sum(-1).detach().masked_fill(coef == 0, float("nan")),)
        return out
