"""What the explicit-thinking methods train on: SFT examples and preference pairs, with their provenance.

  SFTExample      (prompt ids, completion ids): the loss reads the completion only (losses.py)
  PreferencePair  (prompt ids, chosen ids, rejected ids), for DPO

A completion with a rationale is `rationale + <end> + answer + stop`, after a prompt that ends with <start>
(the sampler feeds it); a direct one is `answer + stop`. Every record carries its provenance (method,
iteration, question id, sample index, scores, seed) and is written as one jsonl line. Bad input (a question
with no gold answer, an empty generation, a pair whose sides are identical) is counted in `Skips` with its
reason and reported, never dropped silently.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, List, Optional

from quietstar.methods.explicit.sample import Completion
from quietstar.generate import encode_prompt


class Skips:
    """Skipped items by reason, with the first few details of each (for the logs and results)."""

    def __init__(self):
        self.count: Counter = Counter()
        self.examples: dict = {}

    def add(self, reason: str, detail: str = "") -> None:
        self.count[reason] += 1
        if detail and len(self.examples.setdefault(reason, [])) < 3:
            self.examples[reason].append(detail)

    @property
    def total(self) -> int:
        return sum(self.count.values())

    def as_dict(self) -> dict:
        return dict(sorted(self.count.items()))

    def __str__(self) -> str:
        return ", ".join(f"{k}: {v}" for k, v in sorted(self.count.items())) or "none"


@dataclass
class SFTExample:
    prompt_ids: List[int]
    completion_ids: List[int]
    meta: dict = field(default_factory=dict)  # provenance: method, iteration, question_id, sample, scores, seed


@dataclass
class PreferencePair:
    prompt_ids: List[int]
    chosen_ids: List[int]
    rejected_ids: List[int]
    meta: dict = field(default_factory=dict)
    weight: float = 1.0  # the pair's weight in the preference loss (a soft label's confidence; 1: a hard label)


def prompt_ids(qs, tokenizer, text: str, rationale: bool) -> List[int]:
    """The prompt as the sampler feeds it: BOS, the text, and <start> before a rationale."""
    return encode_prompt(tokenizer, text) + ([qs.start_token_id] if rationale else [])


def completion_ids(qs, c: Completion, rationale: bool) -> List[int]:
    """What the model writes after the prompt, as the sampler fed it."""
    head = c.rationale_ids + [qs.end_token_id] if rationale else []
    return head + c.answer_ids + ([] if c.stop_id is None else [c.stop_id])


def make_sft(qs, tokenizer, prompt_text: str, c: Completion, rationale: bool, skips: Skips,
             meta: dict) -> Optional[SFTExample]:
    """An SFT example of `c` after `prompt_text`; None (counted) when there is nothing to learn."""
    if not c.answer_ids or (rationale and not c.rationale_ids):
        skips.add("empty generation", meta.get("question_id", ""))
        return None
    return SFTExample(prompt_ids(qs, tokenizer, prompt_text, rationale), completion_ids(qs, c, rationale),
                      {**meta, "seed": c.seed, "rationale": c.rationale, "answer": c.answer})


def make_pair(qs, tokenizer, prompt_text: str, chosen: Completion, rejected: Completion, skips: Skips,
              meta: dict) -> Optional[PreferencePair]:
    """A preference pair of two rationale completions; None (counted) when its sides are identical."""
    a, b = completion_ids(qs, chosen, True), completion_ids(qs, rejected, True)
    if a == b:
        skips.add("identical pair", meta.get("question_id", ""))
        return None
    if not chosen.answer_ids or not rejected.answer_ids:
        skips.add("empty generation", meta.get("question_id", ""))
        return None
    return PreferencePair(prompt_ids(qs, tokenizer, prompt_text, True), a, b,
                          {**meta, "seeds": [chosen.seed, rejected.seed],
                           "chosen": [chosen.rationale, chosen.answer], "rejected": [rejected.rationale, rejected.answer]})


def normalise_rationale(text: str) -> str:
    """The form two reasoning paths are compared in (RFT's dedupe): lower case, whitespace collapsed."""
    return " ".join(text.lower().split())


def majority(answers: Iterable[Optional[str]]) -> tuple[Optional[str], float]:
    """(the most common non-None answer, its share of all answers, None counted); (None, 0) if none.
    A tie goes to the answer seen first (Counter.most_common)."""
    answers = list(answers)
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return None, 0.0
    top, n = votes.most_common(1)[0]
    return top, n / len(answers)


def write_jsonl(path, records: Iterable) -> Path:
    """Records (dataclasses or dicts) as jsonl, written to a temporary file and renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(asdict(r) if hasattr(r, "__dataclass_fields__") else r) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_sft_jsonl(path) -> List[SFTExample]:
    return [SFTExample(**json.loads(line)) for line in Path(path).read_text().splitlines() if line.strip()]
