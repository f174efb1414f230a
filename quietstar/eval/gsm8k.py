"""GSM8K (Cobbe et al. 2021): the paper's teacher-forced soft accuracy and zero-shot-CoT exact match.

Data: jsonl with "question" and "answer", the answer ending in "#### <number>" (../shared/data/gsm8k).
Soft accuracy prompt (the official one; docs/official.md): "Q: " + question + "\\nA:" + answer.split("####")[-1] + "\\n",
i.e. "Q: ...\\nA: 72\\n"; scored by soft.py. Exact match: cot.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from quietstar.eval.common import DataError, field, read_jsonl
from quietstar.eval.cot import GSM8K_FINAL, first_integer, zero_shot_cot
from quietstar.eval.soft import NUMERIC, SoftExample, soft_accuracy
from quietstar.methods.quietstar.thinker import QuietStar

DEFAULT_PATH = "gsm8k/test.jsonl"


@dataclass
class Problem:
    question: str
    answer: str  # the full worked answer
    final: str  # the text after "####", e.g. " 72"
    line: int


def load_gsm8k(path, start: int = 0, limit: Optional[int] = None) -> list[Problem]:
    path = Path(path)
    out = []
    for lineno, rec in read_jsonl(path, start, limit):
        q = field(path, lineno, rec, "question")
        a = field(path, lineno, rec, "answer")
        if "####" not in a:
            raise DataError(f"{path}:{lineno}: field 'answer' has no '#### <number>' final answer")
        out.append(Problem(q, a, a.split("####")[-1], lineno))
    return out


def soft_example(p: Problem) -> SoftExample:
    final = p.final.strip()
    return SoftExample(text=f"Q: {p.question}\nA:{p.final}\n", answer=final, numeric=bool(NUMERIC.match(final)))


def gold_integer(p: Problem) -> Optional[int]:
    """The official gold: the first integer after "#### " (so "-5" -> 5; the prediction side drops the
    sign too)."""
    return first_integer(p.answer.split("#### ")[-1])


def evaluate_soft(qs: QuietStar, tok, problems, think: bool, **kw) -> dict:
    res = soft_accuracy(qs, tok, [soft_example(p) for p in problems], think=think, desc="gsm8k soft", **kw)
    for it, p in zip(res["items"], problems):
        it["line"] = p.line
    res["n_negative"] = sum(p.final.strip().startswith("-") for p in problems)
    res["negative_answers"] = ("scored as numbers (leading '-' counts as numeric and the minus tokens are in "
                               "the numeric set); the official code scored them on the newline token only")
    return res


def evaluate_em(qs: QuietStar, tok, problems, think: bool, k: int = 1, generator: Optional[torch.Generator] = None,
                **kw) -> dict:
    res = zero_shot_cot(qs, tok, [p.question for p in problems], [gold_integer(p) for p in problems], k=k,
                        think=think, final_text=GSM8K_FINAL, extract=first_integer, generator=generator,
                        desc="gsm8k cot", **kw)
    for it, p in zip(res["items"], problems):
        it["line"] = p.line
    return res
