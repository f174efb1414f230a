"""Questions with checkable answers, for the explicit-thinking methods (docs/explicit.md).

A `Question` is the text a model continues (context, optional worked examples, optional hint, query) and its
gold answer. Two sources:

  the reasoning corpus (quietstar/reasoning.py): every query `q=` of a document is a question; its context is
      the document's header (the lookup map), so the prompt reads exactly like the start of a training
      document (`<map>\\na3=`). The document's other worked queries (`f2=-fjb.b`) are its few-shot examples;
      the hint for STaR's rationalisation is the query answered directly (`a3=d `), written before the question.
  GSM8K (quietstar/eval/gsm8k.py; explicit.task=gsm8k): "Q: <question>\\nA: Let's think step by step." as the
      zero-shot-CoT evaluation writes it; the gold is the integer after "####". A rationale ends at GSM8K's own
      final-answer marker, " ####" (gsm8k_stop_rule), and the answer after it is read as its first integer.
      Splits (gsm8k_splits): training and validation from train.jsonl, the held-out split test.jsonl's first
      problems; worked examples (gsm8k_worked) from train.jsonl's last problems, never asked.

`StopRule` says where a sampled rationale and answer end (explicit/sample.py).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from typing import FrozenSet, List, Optional, Sequence, Tuple

from quietstar.eval.cot import COT_PROMPT, first_integer


@dataclass
class Question:
    id: str  # stable: "<split>/<document>/<query>" for the reasoning corpus, "gsm8k/<line>" for GSM8K
    query: str  # the text that asks, last in the prompt ("a3=")
    gold: Optional[str]  # the normalised gold answer (normalise_answer); None = not known
    context: str = ""  # what comes first (the document's map line)
    examples: List[str] = field(default_factory=list)  # worked examples, each with its separator ("f2=-fjb.b ")
    hint: str = ""  # text that gives the answer away, for STaR's rationalisation ("a3=d ")
    difficulty: int = 0  # hops / digits (reasoning corpus); 0 = not graded
    kind: str = "reasoning"  # how an answer is normalised: reasoning | gsm8k
    chain: str = ""  # the reasoning corpus: the chain a worked query writes ("afcd" for a3=); "" = not known
    decoy: str = ""  # its decoy, the first step repeated ("aaaa"; reasoning.thought_kind tells them apart)

    def prompt(self, few_shot: int = 0, hint: bool = False) -> str:
        """The prompt text: context, the first `few_shot` worked examples, the hint (if asked), the query."""
        return self.context + "".join(self.examples[:few_shot]) + (self.hint if hint else "") + self.query


def normalise_answer(text: str, kind: str) -> Optional[str]:
    """The comparable form of an answer: the stripped text (reasoning corpus), or the first integer (GSM8K,
    as the official exact match reads it); None when there is none."""
    if kind == "gsm8k":
        n = first_integer(text)
        return None if n is None else str(n)
    text = text.strip()
    return text or None


def query_chain(doc, query: str, hops: int, corpus) -> Tuple[str, str]:
    """(the chain a worked `query` of `doc` writes, its decoy) as text, as the corpus `corpus` writes them:
    `afcd` and `aaaa` for lookup's `a3=`, the running sums `6891` and `6666` for state's `6321=`."""
    if doc.family == "lookup":
        from quietstar.reasoning import lookup_chain

        return lookup_chain(doc, query[0], hops, corpus)
    running, total = [], 0
    for ch in query[:-1]:
        total = (total + int(ch)) % 10
        running.append(str(total))
    return "".join(running), running[0] * len(running)


def reasoning_questions(docs, split: str, chain_close: str, first_doc: int = 0, corpus=None) -> List[Question]:
    """Every query of the reasoning-corpus documents `docs` (document i has index first_doc + i in its
    split) as a Question, in document order. With `corpus` (the documents' ReasoningConfig) each carries the
    chain its query writes and that chain's decoy (query_chain)."""
    out = []
    for i, doc in enumerate(docs, first_doc):
        segs, header, queries = doc.segments, "", []
        for j, seg in enumerate(segs):
            if "=" not in seg.text:
                if not queries and seg.difficulty == 0 and j + 1 < len(segs):
                    header += seg.text  # the map line, before the first query
                continue
            text = seg.text.lstrip(" ")
            query, rest = text.split("=", 1)
            if rest:  # worked: q=<open><chain><close><answer>
                queries.append((query + "=", rest.rsplit(chain_close, 1)[1], text))
            else:  # direct: the answer is the next segment
                queries.append((query + "=", segs[j + 1].text, None))
        for q, (query, answer, worked) in enumerate(queries):
            examples = [w + " " for k, (_, _, w) in enumerate(queries) if w is not None and k != q]
            hard = int(query[1:-1]) if doc.family == "lookup" else len(query) - 1
            chain, decoy = query_chain(doc, query, hard, corpus) if corpus is not None else ("", "")
            out.append(Question(f"{split}/{i}/{q}", query, normalise_answer(answer, "reasoning"), header, examples,
                                f"{query}{answer} ", hard, chain=chain, decoy=decoy))
    return out


GSM8K_MARK = " ####"  # GSM8K's final-answer marker (its answers end "#### 72"): closes a rationale
GSM8K_START = "\n"  # <start>'s embedding starts from this token's on GSM8K (a new line of reasoning)
GSM8K_SHOTS = 8  # the last problems of train.jsonl: the worked examples, never asked
CALCULATION = re.compile(r"<<[^>]*>>")


def gsm8k_worked(p) -> str:
    """A problem as a worked example: its question, the zero-shot-CoT cue, its steps on one line (the
    calculator annotations `<<48/2=24>>` removed) and its marked answer: "Q: ...\nA: Let's think step by step.
    Natalia sold 48/2 = 24 clips in May. ... #### 72\n\n"."""
    steps, _, final = p.answer.rpartition("####")
    steps = " ".join(CALCULATION.sub("", steps).split())
    return f"Q: {p.question}{COT_PROMPT} {steps}{GSM8K_MARK} {final.strip()}\n\n"


def gsm8k_questions(problems, examples: Sequence[str] = ()) -> List[Question]:
    """GSM8K problems (eval/gsm8k.load_gsm8k) as zero-shot-CoT questions with their integer gold; `examples`
    (gsm8k_worked texts) are their few-shot examples."""
    from quietstar.eval.gsm8k import gold_integer

    out = []
    for p in problems:
        gold = gold_integer(p)
        out.append(Question(f"gsm8k/{p.line}", f"Q: {p.question}{COT_PROMPT}", None if gold is None else str(gold),
                            examples=list(examples), hint=f"(The answer is {gold}.)\n" if gold is not None else "",
                            kind="gsm8k"))
    return out


def gsm8k_splits(train_path, test_path, n_train: int, n_val: int, n_eval: int):
    """(train, validation, held-out) GSM8K questions: the training questions are train.jsonl's first n_train
    problems, the validation ones the n_val before its last GSM8K_SHOTS (the worked examples of every prompt,
    never asked), the held-out ones test.jsonl's first n_eval. Never a test problem outside the held-out split."""
    from quietstar.errors import UserError
    from quietstar.eval.gsm8k import load_gsm8k

    problems = load_gsm8k(train_path)
    need = n_train + n_val + GSM8K_SHOTS
    if len(problems) < need:
        raise UserError(f"{train_path}: {len(problems)} problems, the GSM8K task needs {need} (explicit.train_questions"
                        f"={n_train} + explicit.val_questions={n_val} + {GSM8K_SHOTS} worked examples)")
    shots = [gsm8k_worked(p) for p in problems[-GSM8K_SHOTS:]]
    val = problems[-GSM8K_SHOTS - n_val:-GSM8K_SHOTS]
    held = load_gsm8k(test_path, limit=n_eval)
    return (gsm8k_questions(problems[:n_train], shots), gsm8k_questions(val, shots), gsm8k_questions(held, shots))


@dataclass
class StopRule:
    """Where a sampled completion's two parts end (ids of the tokenizer)."""

    rationale_stop: Sequence[int]  # a sampled one ends the rationale; <end> is fed in its place
    max_rationale: int  # rationale tokens at most, then <end> is forced; 0 = no rationale (a direct answer)
    answer_stop: Sequence[int]  # a sampled one ends the answer (kept as the completion's stop token)
    max_answer: int  # answer tokens at most
    answer_banned: Sequence[int] = ()  # ids the answer's first token may not be


def reasoning_stop_rule(rcfg, tokenizer, rationale: bool = True) -> StopRule:
    """The corpus's own marks: a rationale is a chain (it ends where the chain's closing mark is sampled,
    or after max_hops + 2 tokens: a chain that starts with the query holds hops + 1), an answer ends at a
    space or newline (the next query, the document's end). A direct answer may not open a chain: its
    first token cannot be the opening mark (as reasoning.AnswerScores scores direct answers)."""
    enc = lambda s: tokenizer.encode(s, add_bos=False)  # noqa: E731
    longest = rcfg.max_hops + 2 if "lookup" in rcfg.families else rcfg.max_digits + 1
    return StopRule(enc(rcfg.chain_close), longest if rationale else 0, enc(" \n"), 2, enc(rcfg.chain_open))


def gsm8k_stop_rule(tokenizer, max_rationale: int, rationale: bool = True, max_answer: int = 10) -> StopRule:
    """GSM8K's marks: a rationale is the reasoning up to the final-answer marker (GSM8K_MARK, or the marker
    without its space: whichever is one token; with a tokenizer that splits it, its first token), or
    max_rationale tokens; the answer, after <end>, runs to the end of its line (or EOS). The answer's integer is
    read by normalise_answer (cot.first_integer), as the official exact match reads it."""
    enc = lambda s: tokenizer.encode(s, add_bos=False)  # noqa: E731
    marks = [enc(m)[0] for m in (GSM8K_MARK, GSM8K_MARK.strip()) if tokenizer.decode(enc(m)[:1]).strip()]
    lines = {enc("\n")[0], *enc("\n\n")[:1]} | ({tokenizer.eos_id} if tokenizer.eos_id is not None else set())
    return StopRule(list(dict.fromkeys(marks)), max_rationale if rationale else 0, sorted(lines), max_answer)


def step_alphabet(rcfg, tokenizer) -> FrozenSet[int]:
    """The token ids a well-formed chain step and answer of the reasoning corpus are made of: the map's letters
    (lookup) and the digits (state), each a single token. A sampled step with any other token (a control byte,
    half of a UTF-8 character, a space) is not a step of the corpus's chains."""
    chars = (string.ascii_lowercase[:rcfg.n_symbols] if "lookup" in rcfg.families else "") + \
        (string.digits if "state" in rcfg.families else "")
    ids = (tokenizer.encode(ch, add_bos=False) for ch in chars)
    return frozenset(t[0] for t in ids if len(t) == 1)
