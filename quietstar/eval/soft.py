"""The paper's teacher-forced "soft accuracy" (the official eval_helpers.compute_metrics; docs/official.md).

Each example is one string, question + "\\nA:" + answer + "\\n". The model reads it teacher-forced; for
every answer token (the tokens after the last "\\nA:") that lies in a restricted set, the probability of
the true token is renormalised over that set, and the example's score is the product of those
probabilities. The metric is the mean score: the expected exact-match probability under the restricted,
renormalised distribution, not an argmax accuracy.

Restricted sets, worked out from the tokenizer instead of Mistral's ids:
  numeric answers: the ten digit tokens and the newline token, as in the official code; for a negative
    answer also the minus-sign tokens ("-" and " -", whichever exist as single tokens);
  letter answers: the tokens of " A" .. " E" (the last token of each when the space is separate), and
    the newline token.
Answer tokens outside the set (the space before a number, a thousands comma) are skipped, as in the
official code. With a byte-level BPE whose digits are single tokens (SmolLM2) " 72\\n" is " ", "7", "2",
"\\n" and " A\\n" is " A", "\\n"; the first token after the marker is skipped because it is not in the set.

Departure from the official code (a fix): it calls an answer numeric only when the character after
"\\nA: " is a digit, so a negative GSM8K answer ("-5") is scored as a letter answer, on the newline token
alone. Here an answer is numeric when it starts with an optional "-" and a digit, and the minus tokens
are in the numeric set. Also, a prompt longer than max_len keeps its last max_len tokens (the official
code crops a random window, which can cut the answer off).

Predictions: `base` is the no-thought prediction of each answer token, `thought` the paper's eval
prediction (K = 1, n = 1: the talk-head-mixed logits at the <end> step after a thought sampled at that
position). method="grid" runs `QuietStar.next_token_logits` over every position of the padded batch,
exactly as the official evaluation does; method="cached" (default) thinks only at the positions that
predict answer tokens (common.next_token_logits_at): the same distribution, a fraction of the cost.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from quietstar.eval.common import Progress, base_logits_at, next_token_logits_at
from quietstar.generate import encode_prompt
from quietstar.methods.quietstar.thinker import QuietStar

ANSWER_MARKER = "\nA:"
NUMERIC = re.compile(r"\s*-?\d")


@dataclass
class SoftExample:
    text: str  # the whole teacher-forced string: ... + "\nA:" + " " + answer + "\n"
    answer: str  # the answer text (stripped), for the coverage check
    numeric: bool  # score over the numeric set (else the letter set)

    @property
    def negative(self) -> bool:
        return self.numeric and self.answer.lstrip().startswith("-")


@dataclass
class TokenSets:
    numeric: list  # digit tokens + newline (the official set)
    letter: list  # " A" .. " E" tokens + newline
    newline: int
    minus: list

    @property
    def negative(self) -> list:
        """The set of a negative numeric answer: the official numeric set + the minus tokens."""
        return self.numeric + self.minus

    def for_example(self, ex: "SoftExample") -> list:
        return self.negative if ex.negative else self.numeric if ex.numeric else self.letter


def _single(tok, text: str) -> Optional[int]:
    ids = tok.encode(text, add_bos=False)
    return ids[0] if len(ids) == 1 else None


def answer_token_sets(tok) -> TokenSets:
    """The restricted sets for this tokenizer (see the module docstring)."""
    digits = [_single(tok, str(d)) for d in range(10)]
    if any(d is None for d in digits):
        raise ValueError("soft accuracy needs every digit 0-9 to be a single token; this tokenizer splits "
                         f"some: {[str(d) for d, i in zip(range(10), digits) if i is None]}")
    newline = _single(tok, "\n")
    if newline is None:
        raise ValueError("soft accuracy needs '\\n' to be a single token")
    minus = sorted({i for i in (_single(tok, "-"), _single(tok, " -")) if i is not None})
    letters = []
    for c in "ABCDE":
        ids = tok.encode(" " + c, add_bos=False)
        if not ids or tok.decode(ids[-1:]).strip() != c:
            raise ValueError(f"cannot find the answer-letter token for ' {c}' (encodes to {ids})")
        letters.append(ids[-1])
    return TokenSets(numeric=digits + [newline], letter=letters + [newline], newline=newline, minus=minus)


def answer_start(tok, ids: Sequence[int], marker: str = ANSWER_MARKER) -> int:
    """Index of the first token after the last `marker`, found as the official code does: drop tokens
    from the end until the decoded prefix holds one marker fewer."""
    count = tok.decode(list(ids)).count(marker)
    if count == 0:
        raise ValueError(f"no {marker!r} in the example")
    for i in range(len(ids) - 1, 0, -1):
        if tok.decode(list(ids[:i])).count(marker) < count:
            return i + 1  # ids[i] completes the marker
    return 1


def scored_targets(tok, ids: Sequence[int], valid: set, marker: str = ANSWER_MARKER) -> list[int]:
    """Indices t of the answer tokens that count: after the marker and in the restricted set."""
    return [t for t in range(answer_start(tok, ids, marker), len(ids)) if ids[t] in valid]


def restricted_probs(logits: torch.Tensor, targets: torch.Tensor, valid: Sequence[int]) -> torch.Tensor:
    """logits (P, V), targets (P,) -> probability (P,) of each target renormalised over the `valid` ids."""
    valid_t = torch.tensor(list(valid), device=logits.device)
    p = torch.softmax(logits.float()[:, valid_t], dim=-1)  # (P, |valid|)
    col = (targets[:, None] == valid_t[None, :]).float().argmax(-1)
    return p.gather(-1, col[:, None]).squeeze(-1)


def covered(tok, ids: Sequence[int], targets: Sequence[int], answer: str, newline: int) -> bool:
    """Do the scored tokens spell the whole answer (ignoring spaces and commas)? If not, part of the
    answer sits in tokens outside the set and the score is not what the metric means."""
    spelled = tok.decode([ids[t] for t in targets if ids[t] != newline])
    clean = lambda s: re.sub(r"[\s,]", "", s)
    return clean(spelled) == clean(answer)


@torch.no_grad()
def soft_accuracy(qs: QuietStar, tok, examples: Sequence[SoftExample], think: bool = True,
                  method: str = "cached", batch_size: int = 8, max_len: int = 256,
                  generator: Optional[torch.Generator] = None, desc: str = "soft") -> dict:
    """-> {"soft_acc_base", "soft_acc_thought", "items": [...]} (see the module docstring).

    think=False scores the base prediction only (soft_acc_thought is then None). Each example is read as
    training reads a document: BOS first (generate.encode_prompt), then its last max_len - 1 tokens."""
    if method not in ("cached", "grid"):
        raise ValueError(f"method must be 'cached' or 'grid', got {method!r}")
    sets = answer_token_sets(tok)
    items = []
    bar = Progress(len(examples), desc)
    for b0 in range(0, len(examples), batch_size):
        batch = examples[b0:b0 + batch_size]
        seqs, scored = _scored_batch(tok, batch, sets, max_len, items)
        base, mixed = _predictions(qs, tok, seqs, scored, think, method, generator)
        tgt = torch.tensor([t for _, _, t, _, _ in scored], dtype=torch.long, device=base.device)
        valids = [v for _, _, _, _, v in scored]
        p_base = _restricted_by_set(base, tgt, valids)
        p_thought = None if mixed is None else _restricted_by_set(mixed, tgt, valids)
        for it in items[-len(batch):]:
            it["p_base"], it["p_thought"] = 1.0, (1.0 if think else None)
        for k, (_, _, _, owner, _) in enumerate(scored):
            items[owner]["p_base"] *= float(p_base[k])
            if p_thought is not None:
                items[owner]["p_thought"] *= float(p_thought[k])
        acc = sum(i["p_base"] for i in items) / len(items)
        bar.update(len(batch), f"base {acc:.4f}" + (f" thought {sum(i['p_thought'] for i in items) / len(items):.4f}"
                                                     if think else ""))
    bar.close()
    return _summary(tok, items, sets, think, method)


def _scored_batch(tok, batch: Sequence[SoftExample], sets: TokenSets, max_len: int, items: list):
    """Encode a batch; append one item per example to `items`. -> (token lists, scored answer tokens as
    (row, predicting position, target id, item index, restricted set))."""
    seqs, scored = [], []
    for r, ex in enumerate(batch):
        ids = encode_prompt(tok, ex.text, max_len)
        valid = sets.for_example(ex)
        tg = scored_targets(tok, ids, set(valid))
        seqs.append(ids)
        items.append({"n_scored": len(tg), "numeric": ex.numeric, "answer": ex.answer,
                      "covered": covered(tok, ids, tg, ex.answer, sets.newline)})
        scored += [(r, t - 1, ids[t], len(items) - 1, valid) for t in tg]  # position t-1 predicts token t
    return seqs, scored


def _predictions(qs: QuietStar, tok, seqs, scored, think: bool, method: str, generator):
    """(base logits (P, V), mixed logits (P, V) or None) at the scored positions of a right-padded batch."""
    dev = qs.model.tok_embeddings.weight.device
    L = max(len(s) for s in seqs)
    x = torch.tensor([s + [tok.pad_id] * (L - len(s)) for s in seqs], device=dev)
    rows, positions = [r for r, *_ in scored], [p for _, p, *_ in scored]
    if think and method == "cached":
        out = next_token_logits_at(qs, x, rows, positions, generator)
        return out.base, out.mixed
    if think:  # the official way: every position thinks
        mask = (torch.arange(L)[None, :] < torch.tensor([len(s) for s in seqs])[:, None]).long().to(dev)
        out = qs.next_token_logits(x, mask, generator, n_thoughts=1).full()
        return out.base[rows, positions], out.mixed[rows, 0, positions]
    return base_logits_at(qs, x, rows, positions), None


def _summary(tok, items: list, sets: TokenSets, think: bool, method: str) -> dict:
    n = len(items)
    return {"soft_acc_base": sum(i["p_base"] for i in items) / n,
            "soft_acc_thought": sum(i["p_thought"] for i in items) / n if think else None,
            "n": n, "n_uncovered": sum(not i["covered"] for i in items),
            "n_numeric": sum(i["numeric"] for i in items), "method": method if think else "base only",
            "token_sets": {"numeric": sets.numeric, "negative": sets.negative, "letter": sets.letter,
                           "numeric_text": [tok.decode([i]) for i in sets.numeric],
                           "letter_text": [tok.decode([i]) for i in sets.letter]},
            "items": items}


def _restricted_by_set(logits: torch.Tensor, targets: torch.Tensor, valids: list) -> torch.Tensor:
    out = torch.empty(len(valids), device=logits.device)
    for valid in {tuple(v) for v in valids}:
        idx = torch.tensor([k for k, v in enumerate(valids) if tuple(v) == valid], device=logits.device)
        out[idx] = restricted_probs(logits[idx], targets[idx], valid)
    return out
