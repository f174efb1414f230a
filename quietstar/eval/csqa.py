"""CommonsenseQA (Talmor et al. 2019): the paper's teacher-forced soft accuracy and a zero-shot-CoT
letter exact match.

Two layouts load:
  HF (tau/commonsense_qa, ../shared/data/commonsenseqa/dev_rand_split.jsonl):
      {"question": "...", "choices": {"label": ["A", ..], "text": [..]}, "answerKey": "A"}
  original (dev_rand_split.jsonl from the CommonsenseQA site):
      {"question": {"stem": "...", "choices": [{"label": "A", "text": ".."}, ..]}, "answerKey": "A"}
Soft accuracy prompt (the official one; docs/official.md): "Q: " + q + "\\n" + "(A) c1\\n(B) c2 ...\\n(E) c5" + "\\nA: " + key + "\\n".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from quietstar.eval.common import DataError, field, read_jsonl
from quietstar.eval.cot import CSQA_FINAL, first_letter, zero_shot_cot
from quietstar.eval.soft import SoftExample, soft_accuracy
from quietstar.methods.quietstar.thinker import QuietStar

DEFAULT_PATH = "commonsenseqa/dev_rand_split.jsonl"


@dataclass
class Question:
    question: str
    labels: list
    choices: list
    answer: str  # the answer key, "A".."E"
    line: int

    def with_choices(self) -> str:
        opts = "\n".join(f"({lab}) {txt}" for lab, txt in zip(self.labels, self.choices))
        return f"{self.question}\n{opts}"


def parse_csqa(path, lineno: int, rec: dict) -> Question:
    q = field(path, lineno, rec, "question", (str, dict))
    if isinstance(q, dict):  # original layout
        stem = field(path, lineno, q, "stem")
        raw = field(path, lineno, q, "choices", list)
        labels, texts = [], []
        for c in raw:
            if not isinstance(c, dict) or "label" not in c or "text" not in c:
                raise DataError(f"{path}:{lineno}: each of question.choices needs 'label' and 'text', got {c!r}")
            labels.append(c["label"])
            texts.append(c["text"])
    else:  # HF layout
        stem = q
        ch = field(path, lineno, rec, "choices", dict)
        labels = field(path, lineno, ch, "label", list)
        texts = field(path, lineno, ch, "text", list)
    if len(labels) != len(texts) or not labels:
        raise DataError(f"{path}:{lineno}: {len(labels)} choice labels but {len(texts)} choice texts")
    if not all(isinstance(x, str) for x in labels + texts):
        raise DataError(f"{path}:{lineno}: choice labels and texts must be strings")
    key = field(path, lineno, rec, "answerKey")
    if key not in labels:
        raise DataError(f"{path}:{lineno}: answerKey {key!r} is not one of the labels {labels}")
    if not set(labels) <= set("ABCDE"):
        raise DataError(f"{path}:{lineno}: labels must be A-E, got {labels}")
    return Question(stem, list(labels), list(texts), key, lineno)


def load_csqa(path, start: int = 0, limit: Optional[int] = None) -> list[Question]:
    path = Path(path)
    return [parse_csqa(path, lineno, rec) for lineno, rec in read_jsonl(path, start, limit)]


def soft_example(q: Question) -> SoftExample:
    return SoftExample(text=f"Q: {q.with_choices()}\nA: {q.answer}\n", answer=q.answer, numeric=False)


def evaluate_soft(qs: QuietStar, tok, questions, think: bool, **kw) -> dict:
    res = soft_accuracy(qs, tok, [soft_example(q) for q in questions], think=think, desc="csqa soft", **kw)
    for it, q in zip(res["items"], questions):
        it["line"] = q.line
    return res


def evaluate_em(qs: QuietStar, tok, questions, think: bool, k: int = 1,
                generator: Optional[torch.Generator] = None, **kw) -> dict:
    res = zero_shot_cot(qs, tok, [q.with_choices() for q in questions], [q.answer for q in questions], k=k,
                        think=think, final_text=CSQA_FINAL, extract=first_letter, generator=generator,
                        desc="csqa cot", **kw)
    for it, q in zip(res["items"], questions):
        it["line"] = q.line
    return res
