"""Scoring a completion: one interface, `score(question, completion) -> Score(value, reason)`.

  AnswerCheck   the answer against the question's gold (1.0 right, 0.0 wrong), normalised per the question's
                kind (tasks.normalise_answer: the stripped text, or GSM8K's first integer).
  ModelJudge    a model grades the completion: a scoring prompt with a short rubric is sent to a decoder (the
                same one the methods train), its output is read as a number in [lo, hi] and scaled to [0, 1].

A completion that cannot be scored (no gold answer; a judge output with no number in range) gets
Score(None, reason): the caller counts it and skips it (dataset.Skips); it never raises.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from quietstar.methods.explicit.sample import Completion, sample
from quietstar.methods.explicit.tasks import Question, StopRule, normalise_answer


@dataclass
class Score:
    value: Optional[float]  # None: not scorable, see reason
    reason: str


class AnswerCheck:
    def score(self, question: Question, completion: Completion) -> Score:
        if question.gold is None:
            return Score(None, "no gold answer")
        got = normalise_answer(completion.answer, question.kind)
        if got is None:
            return Score(0.0, "no answer")
        return Score(1.0, "correct") if got == question.gold else Score(0.0, f"wrong: {got!r}, gold {question.gold!r}")

    def score_many(self, questions: Sequence[Question], completions: Sequence[Completion]) -> List[Score]:
        return [self.score(q, c) for q, c in zip(questions, completions)]


JUDGE_TEMPLATE = ("Rate the answer from {lo} to {hi}. {hi}: the reasoning is correct and the answer follows from "
                  "it. {lo}: the answer is wrong.\nQuestion: {question}\nReasoning: {rationale}\nAnswer: {answer}\n"
                  "Score:")
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def parse_score(text: str, lo: float, hi: float) -> Score:
    """The first number in a judge's output, scaled from [lo, hi] to [0, 1]; Score(None, why) otherwise."""
    m = NUMBER.search(text)
    if m is None:
        return Score(None, f"judge output has no number: {text[:40]!r}")
    x = float(m.group())
    if not lo <= x <= hi:
        return Score(None, f"judge score {x:g} outside [{lo:g}, {hi:g}]")
    return Score((x - lo) / (hi - lo), f"judge: {x:g}")


class ModelJudge:
    """A decoder as the judge: greedy, up to max_tokens after the scoring prompt, up to a newline."""

    def __init__(self, qs, tokenizer, template: str = JUDGE_TEMPLATE, lo: float = 0, hi: float = 10,
                 max_tokens: int = 6, batch_rows: int = 64):
        self.qs, self.tok, self.template, self.lo, self.hi = qs, tokenizer, template, lo, hi
        nl = tokenizer.encode("\n", add_bos=False)
        self.rule = StopRule((), 0, nl, max_tokens)
        self.batch_rows = batch_rows

    def prompt(self, question: Question, completion: Completion) -> str:
        return self.template.format(lo=self.lo, hi=self.hi, question=question.prompt(), rationale=completion.rationale,
                                    answer=completion.answer)

    def score(self, question: Question, completion: Completion) -> Score:
        return self.score_many([question], [completion])[0]

    def score_many(self, questions: Sequence[Question], completions: Sequence[Completion]) -> List[Score]:
        prompts = [self.prompt(q, c) for q, c in zip(questions, completions)]
        outs = sample(self.qs, self.tok, prompts, 1, self.rule, temperature=0.0, generator=torch.Generator(),
                      batch_rows=self.batch_rows)
        return [parse_score(o[0].answer, self.lo, self.hi) for o in outs]
