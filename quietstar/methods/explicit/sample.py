"""k rationale + answer completions per question, batched (questions x k rows) and KV-cached.

One row is: the prompt, <start> (fed as the prompt's last token), the rationale sampled token by token until
its stop rule fires (a sampled closing mark, which is replaced by <end>, or the length cap, which forces
<end>), then the answer sampled until its own stop rule. <start> and <end> are QuietStar's thought markers
(thinker.py): the LM head has no rows for them, so the model never writes them; the sampler inserts them.
With StopRule.max_rationale = 0 a row is a direct answer: no markers, no rationale.

The decoding loop is generate.generate_stream (think=False: plain KV-cached decoding); `_Rows.__call__` is
its `pick` rule. Each row draws its random numbers from its own torch.Generator, seeded from the caller's
generator, so a row samples the same completion in any batch, with any left padding (tests/test_explicit.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from quietstar.errors import UserError
from quietstar.methods.explicit.tasks import StopRule
from quietstar.generate import encode_prompt, generate_stream, left_pad, sample_token


@dataclass
class Completion:
    rationale_ids: List[int]  # between <start> and <end> (empty for a direct answer)
    answer_ids: List[int]  # after <end>, without the stop token
    stop_id: Optional[int]  # the token that ended the answer; None: it reached max_answer (or the budget)
    rationale: str
    answer: str
    n_generated: int  # tokens after the question: <start>, rationale, <end>, answer, stop token
    seed: int  # the row's generator seed: the completion is a function of (model, prompt, seed)
    closed: bool  # the rationale ended at its stop rule, not at its length cap


class _Rows:
    """Per-row state of a batch being sampled: generate_stream's `pick` rule."""

    def __init__(self, rule: StopRule, seeds: Sequence[int], temperature: float, top_p: float, end_id: int,
                 pad_id: int):
        n = len(seeds)
        self.rule, self.temperature, self.top_p, self.end_id, self.pad_id = rule, temperature, top_p, end_id, pad_id
        self.in_rationale = [rule.max_rationale > 0] * n
        self.rationale, self.answer = [[] for _ in range(n)], [[] for _ in range(n)]
        self.stop: List[Optional[int]] = [None] * n
        self.closed, self.done, self.steps = [False] * n, [False] * n, [0] * n
        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds] if temperature > 0 else None

    def __call__(self, logits: torch.Tensor):
        rule, B = self.rule, logits.shape[0]
        logits = logits.float()
        first = [b for b in range(B) if not (self.in_rationale[b] or self.answer[b] or self.done[b])]
        if rule.answer_banned and first:  # an answer's first token
            logits = logits.clone()
            logits[torch.tensor(first)[:, None], torch.tensor(list(rule.answer_banned))[None]] = float("-inf")
        u = None
        if self.gens is not None:  # one draw per live row, from its own generator
            u = torch.stack([torch.zeros(1, dtype=torch.float64) if d else torch.rand(1, generator=g, dtype=torch.float64)
                             for g, d in zip(self.gens, self.done)]).to(logits.device)
        sampled = sample_token(logits, self.temperature, self.top_p, u=u).tolist()
        out = []
        for b, t in enumerate(sampled):
            if self.done[b]:
                out.append(self.pad_id)
                continue
            self.steps[b] += 1
            if self.in_rationale[b]:
                if t in rule.rationale_stop or len(self.rationale[b]) >= rule.max_rationale:
                    self.closed[b] = t in rule.rationale_stop
                    self.in_rationale[b], t = False, self.end_id
                else:
                    self.rationale[b].append(t)
            elif t in rule.answer_stop:
                self.stop[b], self.done[b] = t, True
            else:
                self.answer[b].append(t)
                self.done[b] = len(self.answer[b]) >= rule.max_answer
            out.append(t)
        return torch.tensor(out, device=logits.device), torch.tensor(self.done, device=logits.device)


@torch.no_grad()
def sample_rows(qs, tokenizer, prompts: Sequence[Sequence[int]], seeds: Sequence[int], rule: StopRule,
                temperature: float = 1.0, top_p: float = 1.0, started: bool = False,
                implicit: bool = False) -> List[Completion]:
    """One completion per prompt (token ids, BOS first; <start> is appended here), each row sampled with
    its own seed. temperature 0 = greedy. started: the prompts already end inside a rationale (<start> and
    its first steps, as a tree search feeds them): the rationale is continued, for rule.max_rationale more
    tokens at most. implicit: every generated token is preceded by a Quiet-STaR thought (generate_stream's
    think=True, n_ahead - 1 hidden forwards a token): the implicit counterpart of a rationale, for a thinking
    model. Its thoughts come from one generator per batch, seeded by the first row's seed, so unlike the
    tokens they depend on the batch."""
    dev = qs.model.tok_embeddings.weight.device
    think = rule.max_rationale > 0
    opens = think and not started
    rows = [list(p) + [qs.start_token_id] if opens else list(p) for p in prompts]
    budget = (rule.max_rationale + 1 if think else 0) + rule.max_answer + 1  # the stop token may be sampled last
    longest = max(len(r) for r in rows)
    if longest + budget > qs.model.cfg.max_seq_len:
        raise UserError(f"explicit: a prompt of {longest} tokens and {budget} to generate exceed the model's "
                        f"max_seq_len={qs.model.cfg.max_seq_len}")
    ids, mask = left_pad(rows, tokenizer.pad_id, dev)
    state = _Rows(rule, seeds, temperature, top_p, qs.end_token_id, tokenizer.pad_id)
    thoughts = torch.Generator(dev).manual_seed(int(seeds[0])) if implicit else None
    for _ in generate_stream(qs, ids, mask, budget, think=implicit, generator=thoughts, pad_id=tokenizer.pad_id,
                             pick=state):
        pass
    return [Completion(state.rationale[b], state.answer[b], state.stop[b], tokenizer.decode(state.rationale[b]),
                       tokenizer.decode(state.answer[b]), state.steps[b] + opens, int(seeds[b]), state.closed[b])
            for b in range(len(rows))]


def sample(qs, tokenizer, prompts: Sequence[str], k: int, rule: StopRule, temperature: float = 1.0,
           top_p: float = 1.0, generator: Optional[torch.Generator] = None, batch_rows: int = 256,
           progress=None, implicit: bool = False) -> List[List[Completion]]:
    """k completions of each text prompt (questions x k rows, batch_rows at a time). -> per prompt, its k
    completions. The row seeds are drawn from `generator`; progress(n_rows_done) is called after each batch."""
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    seeds = torch.randint(0, 2**62, (len(prompts) * k,), generator=generator).tolist()
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    rows = [encoded[i] for i in range(len(prompts)) for _ in range(k)]
    out: List[Completion] = []
    for r0 in range(0, len(rows), batch_rows):
        out += sample_rows(qs, tokenizer, rows[r0:r0 + batch_rows], seeds[r0:r0 + batch_rows], rule, temperature,
                           top_p, implicit=implicit)
        if progress is not None:
            progress(len(out))
    return [out[i * k:(i + 1) * k] for i in range(len(prompts))]
