"""Constitutional AI on the explicit loop (Bai et al. 2022, "Constitutional AI: Harmlessness from AI Feedback";
docs/explicit_preference.md). Its two stages are rounds of `explicit=cai`:

  supervised   (rounds 1 .. cai_sl_rounds, `collect_revisions`) per question: the latest model writes a
               response; a principle is drawn (seeded) from the task's short written list; the model critiques
               its response against it from a few-shot prompt (worked critiques, each ending in a verdict,
               "follows" or "violates"), then revises it from the same prompt continued by its critique; the
               round's SFT data are (question, revision). A critique that is empty or has no verdict, a revision
               with no chain or no answer, is skipped and counted.
  AI feedback  (the later rounds, `collect_feedback`) per question: two of the latest model's k responses; a
               labeller (the base model, fixed; or the latest one) reads them as a multiple-choice question,
               "which response better follows <principle>? (A) ... (B) ...", and its next-token probabilities
               of A and B, normalised over the two, are a soft label p (with cai_swap, averaged with the label
               of the swapped order, which cancels a preference for a position). The preferred response is the
               chosen side; the pair's weight in the preference loss (explicit.loss) is its confidence |2p - 1|
               (cai_soft_label=weight) or 1 (hard), and pairs below cai_min_confidence are dropped (counted).

The principles and the worked examples are per task (`Constitution`). On the reasoning corpus they are about
the chain; its worked examples are written from the question's own document (its other worked queries whose
answer is their chain's last symbol, so a decoy chain of the corpus is never shown as a good one): the chain
as a flawed response (its first step repeated, or an answer other than its last symbol) with its critique
and the right chain as the revision, and the right chain as a response that follows the principle. On GSM8K
they are about the steps, and the worked examples are written out below (GSM8K_EXAMPLES).

The critic, reviser and labeller are the model itself, through the loop's sampler (ctx.sample, so a test can
script them) and `option_logits` (one forward pass, the last position's logits of the option tokens).
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from quietstar.errors import UserError
from quietstar.methods.explicit.dataset import PreferencePair, Skips, completion_ids, make_sft, prompt_ids
from quietstar.methods.explicit.sample import Completion
from quietstar.methods.explicit.tasks import GSM8K_MARK, Question, StopRule
from quietstar.generate import encode_prompt
from quietstar.seeds import derive_seed

VERDICT = re.compile(r"\b(follows|violates)\b")
OPTIONS = ("A", "B")

REASONING_PRINCIPLES = {
    "lookup": ("each step applies the map once", "the answer is the chain's last symbol"),
    "state": ("each step adds the next digit, mod 10", "the answer is the chain's last symbol"),
}
# how a critique names a step of each family, for the worked critiques of the first principle
STEP_WORDS = {"lookup": ("looking it up in the map", "is the map's image of the one before"),
              "state": ("adding the next digit", "adds the next digit to the one before")}

GSM8K_PRINCIPLES = ("each step's arithmetic is right",
                    "each step uses only numbers from the question or from an earlier step",
                    "the answer is the result of the last step")


@dataclass(frozen=True)
class Example:
    """One worked critique: a response, its critique against the prompt's principle, its revision."""
    question: str  # the line(s) before "Response:" ("" where the response carries its query, as a chain does)
    response: str
    critique: str  # ends with its verdict
    revision: str

    @property
    def violates(self) -> bool:
        return self.response != self.revision


_APPLES = "Q: Sam has 3 bags with 4 apples each. He eats 2 apples. How many apples are left?"
_BOOKS = "Q: A book costs 8 dollars. Ana buys 5 books and pays with 50 dollars. How much change does she get?"
_APPLES_RIGHT = "3 * 4 = 12 apples. 12 - 2 = 10 apples are left. #### 10"
_BOOKS_RIGHT = "5 * 8 = 40 dollars. 50 - 40 = 10 dollars of change. #### 10"
GSM8K_EXAMPLES = {  # per principle: a response that violates it (with its revision), one that follows it
    GSM8K_PRINCIPLES[0]: (
        (_APPLES, "3 * 4 = 12 apples. 12 - 2 = 11 apples are left. #### 11",
         "step 2 says 12 - 2 = 11, but 12 - 2 is 10: violates", _APPLES_RIGHT),
        (_BOOKS, _BOOKS_RIGHT, "5 * 8 = 40 and 50 - 40 = 10 are both right: follows", _BOOKS_RIGHT)),
    GSM8K_PRINCIPLES[1]: (
        (_BOOKS, "5 * 6 = 30 dollars. 50 - 30 = 20 dollars of change. #### 20",
         "step 1 uses 6, which is not in the question; a book costs 8: violates", _BOOKS_RIGHT),
        (_APPLES, _APPLES_RIGHT, "3, 4 and 2 are in the question and 12 comes from step 1: follows", _APPLES_RIGHT)),
    GSM8K_PRINCIPLES[2]: (
        (_APPLES, "3 * 4 = 12 apples. 12 - 2 = 10 apples are left. #### 12",
         "the last step gives 10, but the answer is 12: violates", _APPLES_RIGHT),
        (_BOOKS, _BOOKS_RIGHT, "the last step gives 10 and the answer is 10: follows", _BOOKS_RIGHT)),
}


class Constitution:
    """A task's principles, its worked critiques, and how a response is written in a prompt."""

    def __init__(self, chain_open: str = "-", chain_close: str = "."):
        self.open, self.close = chain_open, chain_close

    @staticmethod
    def family(q: Question) -> str:
        if q.kind == "gsm8k":
            return "gsm8k"
        return "state" if q.query[:-1].isdigit() else "lookup"

    def principles(self, q: Question) -> Tuple[str, ...]:
        f = self.family(q)
        return GSM8K_PRINCIPLES if f == "gsm8k" else REASONING_PRINCIPLES[f]

    def draw(self, q: Question, seed: int) -> str:
        """The principle for `q`, drawn with `seed` (derived by the caller from the round's seed and the item)."""
        ps = self.principles(q)
        return ps[random.Random(seed).randrange(len(ps))]

    def render(self, q: Question, c: Completion) -> str:
        """A response as text: a chain as the corpus writes it (`a3=-afcd.d`), or GSM8K's steps, its final-answer
        marker and answer (`... 12 - 2 = 10 apples are left. #### 10`)."""
        if q.kind == "gsm8k":
            return f"{c.rationale.strip()}{GSM8K_MARK} {c.answer.strip()}"  # the task's marker, as it samples them
        return f"{q.query}{self.open}{c.rationale}{self.close}{c.answer.strip()}"

    def question_line(self, q: Question) -> str:
        return f"{q.query}\n" if q.kind == "gsm8k" else ""

    def revision_head(self, q: Question) -> str:
        """What the revision prompt ends with: a chain's query (the sampler then opens the chain), or nothing."""
        return "" if q.kind == "gsm8k" else q.query

    def examples(self, q: Question, principle: str, n: int) -> List[Example]:
        """Up to n worked critiques for `principle`, alternating one that violates it and one that follows it."""
        if q.kind == "gsm8k":
            from quietstar.eval.cot import COT_PROMPT

            shots = GSM8K_EXAMPLES[principle]
            return [Example(f"{pq}{COT_PROMPT}\n", resp, crit, rev) for pq, resp, crit, rev in shots][:n]
        out = []
        for query, chain, answer in self._clean_worked(q):
            if len(out) == n:
                break
            right = f"{query}{self.open}{chain}{self.close}{answer}"
            flawed = self._flawed(q, principle, query, chain, answer) if len(out) % 2 == 0 else None
            out.append(flawed if flawed is not None else Example("", right, self._follows(q, principle, chain), right))
        return out

    def _clean_worked(self, q: Question):
        """The document's other worked queries whose answer is their chain's last symbol: (query, chain, answer)."""
        for w in q.examples:
            query, _, rest = w.strip().partition("=")
            chain, sep, answer = rest.removeprefix(self.open).rpartition(self.close)
            if sep and chain and answer == chain[-1]:
                yield query + "=", chain, answer

    def _flawed(self, q, principle, query, chain, answer) -> Optional[Example]:
        right = f"{query}{self.open}{chain}{self.close}{answer}"
        first = self.principles(q)[0]
        if principle == first:
            bad = chain[0] * len(chain)
            if bad == chain:
                return None
            crit = f"the chain {bad} repeats {chain[0]} instead of {STEP_WORDS[self.family(q)][0]}: violates"
            return Example("", f"{query}{self.open}{bad}{self.close}{answer}", crit, right)
        other = next((s for s in chain if s != chain[-1]), None)
        if other is None:
            return None
        crit = f"the chain {chain} ends with {chain[-1]} but the answer is {other}: violates"
        return Example("", f"{query}{self.open}{chain}{self.close}{other}", crit, right)

    def _follows(self, q, principle, chain) -> str:
        if principle == self.principles(q)[0]:
            return f"each symbol of the chain {chain} {STEP_WORDS[self.family(q)][1]}: follows"
        return f"the chain {chain} ends with {chain[-1]} and the answer is {chain[-1]}: follows"


# ---------------------------------------------------------------------------------------------- prompts


def critique_prompt(q: Question, principle: str, examples: Sequence[Example], response: str,
                    constitution: Constitution) -> str:
    shots = "".join(f"{e.question}Response: {e.response}\nCritique: {e.critique}\nRevision: {e.revision}\n"
                    for e in examples)
    return f"{q.context}Principle: {principle}\n{shots}{constitution.question_line(q)}Response: {response}\nCritique:"


def revision_prompt(critique_text: str, critique: str, q: Question, constitution: Constitution) -> str:
    return f"{critique_text} {critique}\nRevision: {constitution.revision_head(q)}"


def label_prompt(q: Question, principle: str, examples: Sequence[Example], a: str, b: str,
                 constitution: Constitution) -> str:
    """The multiple-choice question: which of (A) and (B) better follows `principle`; worked ones first (each
    violating example against its revision, the better one alternately (A) and (B))."""
    shots = ""
    for i, e in enumerate(e for e in examples if e.violates):
        first, second, better = (e.revision, e.response, "A") if i % 2 == 0 else (e.response, e.revision, "B")
        shots += f"{e.question}(A) {first}\n(B) {second}\nBetter: ({better})\n"
    return (f"{q.context}Which response better follows the principle: {principle}?\n{shots}"
            f"{constitution.question_line(q)}(A) {a}\n(B) {b}\nBetter: (")


def parse_critique(text: str) -> Tuple[Optional[str], str]:
    """(verdict, reason): the first "follows" or "violates" in the critique; (None, why) when there is none."""
    text = text.strip()
    if not text:
        return None, "empty critique"
    m = VERDICT.search(text)
    return (m.group(1), "") if m else (None, "critique has no verdict")


# ---------------------------------------------------------------------------------------------- the label


def option_ids(tokenizer, options: Sequence[str] = OPTIONS) -> List[int]:
    """The token each option's letter starts with; they must differ."""
    ids = [tokenizer.encode(o, add_bos=False)[0] for o in options]
    if len(set(ids)) != len(ids):
        raise UserError(f"explicit.method=cai: the options {list(options)} start with the same token")
    return ids


@torch.no_grad()
def option_logits(qs, tokenizer, prompts: Sequence[str], options: Sequence[int], batch_rows: int = 64) -> torch.Tensor:
    """(N, len(options)) the logits of the option tokens at the position after each prompt (BOS + text, as
    the sampler encodes it), right-padded batches (causal attention never reads the pads after a row)."""
    dev, W = qs.model.tok_embeddings.weight.device, qs.model.lm_head_weight
    rows = [encode_prompt(tokenizer, p) for p in prompts]
    if rows and max(len(r) for r in rows) > qs.model.cfg.max_seq_len:
        raise UserError(f"explicit.method=cai: a label prompt of {max(len(r) for r in rows)} tokens exceeds the "
                        f"model's max_seq_len={qs.model.cfg.max_seq_len}; lower explicit.cai_shots")
    out = []
    for i in range(0, len(rows), batch_rows):
        chunk = rows[i:i + batch_rows]
        L = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), L), tokenizer.pad_id, dtype=torch.long)
        for b, r in enumerate(chunk):
            ids[b, :len(r)] = torch.tensor(r)
        h = qs.model(inputs_embeds=qs.embed(ids.to(dev)), return_hidden=True)  # (B, L, d)
        last = h[torch.arange(len(chunk), device=dev), torch.tensor([len(r) - 1 for r in chunk], device=dev)]  # (B, d)
        out.append((last.float() @ W[list(options)].float().T).cpu())  # (B, n_options)
    return torch.cat(out) if out else torch.zeros(0, len(options))


def soft_label(logits: torch.Tensor) -> torch.Tensor:
    """(N, 2) option logits -> (N,) p(A), the softmax over the two options only."""
    return torch.softmax(logits.double(), -1)[:, 0]


def preference_probs(ctx, labeller, questions: Sequence[Question], principles: Sequence[str],
                     pairs: Sequence[Tuple[str, str]],
                     examples: Sequence[Sequence[Example]]) -> List[Tuple[float, Optional[float]]]:
    """Per pair (a, b): (p that a is better asked with a as (A), the same asked with b as (A)), the second None
    without cai_swap."""
    con = ctx.constitution
    ids = option_ids(ctx.tok)
    ab = [label_prompt(q, p, e, a, b, con) for q, p, e, (a, b) in zip(questions, principles, examples, pairs)]
    first = soft_label(option_logits(labeller, ctx.tok, ab, ids)).tolist()
    if not ctx.ex.cai_swap:
        return [(x, None) for x in first]
    ba = [label_prompt(q, p, e, b, a, con) for q, p, e, (a, b) in zip(questions, principles, examples, pairs)]
    second = (1 - soft_label(option_logits(labeller, ctx.tok, ba, ids))).tolist()
    return list(zip(first, second))


# ---------------------------------------------------------------------------------------------- the stages


def _constitution(ctx) -> Constitution:
    if getattr(ctx, "constitution", None) is None:
        rc = ctx.cfg.data.reasoning
        ctx.constitution = Constitution(rc.chain_open, rc.chain_close)
    if "critique" not in ctx.rules:  # a critique is a line of text: a "direct answer" up to a newline
        ctx.rules["critique"] = StopRule((), 0, ctx.tok.encode("\n", add_bos=False), ctx.ex.cai_critique_tokens)
    return ctx.constitution


def _meta(stage, r, q, principle, **extra) -> dict:
    return {"method": "cai", "stage": stage, "iteration": r, "question_id": q.id, "principle": principle, **extra}


def collect_revisions(ctx, qs, questions, r: int, seed: int, skips: Skips):
    """The supervised stage: response, critique, revision; SFT examples (question, revision)."""
    con, ex, stats = _constitution(ctx), ctx.ex, defaultdict(int)
    responses = ctx.sample(qs, [q.prompt(ex.few_shot) for q in questions], 1, "cot", seed,
                           desc=f"round {r}: cai responses")
    principles = [con.draw(q, derive_seed(seed, "cai principle", i)) for i, q in enumerate(questions)]
    shots = [con.examples(q, p, ex.cai_shots) for q, p in zip(questions, principles)]
    texts = [con.render(q, c) for q, (c,) in zip(questions, responses)]
    cprompts = [critique_prompt(q, p, e, t, con) for q, p, e, t in zip(questions, principles, shots, texts)]
    critiques = ctx.sample(qs, cprompts, 1, "critique", derive_seed(seed, "cai critique"),
                           desc=f"round {r}: cai critiques")
    keep, unparsed = [], []  # (index, critique text, verdict); critiques without one
    for i, (q, (c,)) in enumerate(zip(questions, critiques)):
        verdict, why = parse_critique(c.answer)
        if verdict is None:
            skips.add(why, q.id)
            unparsed.append(c.answer)
            continue
        stats[f"critiques_{verdict}"] += 1
        keep.append((i, c.answer.strip(), verdict))
    if unparsed:  # what the model wrote instead, so that a round with nothing to train on can be diagnosed
        print(f"[cai] round {r}: {len(unparsed)} of {len(questions)} critiques have no verdict; the first: "
              f"{unparsed[0][:200]!r}", flush=True)
    rprompts = [revision_prompt(cprompts[i], crit, questions[i], con) for i, crit, _ in keep]
    revisions = ctx.sample(qs, rprompts, 1, "cot", derive_seed(seed, "cai revision"),
                           desc=f"round {r}: cai revisions") if keep else []
    out = []
    for (i, crit, verdict), (rev,) in zip(keep, revisions):
        q, (resp,) = questions[i], responses[i]
        if not rev.rationale_ids or not rev.answer_ids:
            skips.add("revision has no chain" if not rev.rationale_ids else "revision has no answer", q.id)
            continue
        before, after = ctx.check.score(q, resp), ctx.check.score(q, rev)  # recorded, never used to choose
        meta = _meta("supervised", r, q, principles[i], response=[resp.rationale, resp.answer], critique=crit,
                     verdict=verdict, scores={"response": before.value, "revision": after.value})
        e = make_sft(qs, ctx.tok, q.prompt(), rev, True, skips, meta)
        if e is None:
            continue
        out.append(e)
        stats["revisions_changed"] += con.render(q, rev) != texts[i]
        stats["revisions_correct"] += after.value == 1
        stats["revisions_fixed"] += before.value == 0 and after.value == 1
        stats["revisions_broke"] += before.value == 1 and after.value == 0
    stats["responses_correct"] = sum(ctx.check.score(q, c).value == 1 for q, (c,) in zip(questions, responses))
    stats["revisions"] = len(out)
    return out, dict(stats)


def collect_feedback(ctx, qs, questions, r: int, seed: int, skips: Skips):
    """The AI-feedback stage: two of the latest model's k responses per question, labelled by the labeller
    against a drawn principle; preference pairs weighted by the label's confidence."""
    con, ex, stats = _constitution(ctx), ctx.ex, defaultdict(int)
    comps = ctx.k_rationales(qs, questions, seed, f"round {r}: cai responses")
    items = []  # (question, principle, (a, b) completions, sample indices)
    for i, (q, cs) in enumerate(zip(questions, comps)):
        seen, two = set(), []
        for j, c in enumerate(cs):
            if not c.answer_ids:
                skips.add("empty generation", q.id)
                continue
            t = con.render(q, c)
            if t not in seen:
                seen.add(t)
                two.append(j)
            if len(two) == 2:
                break
        if len(two) < 2:
            skips.add("fewer than two distinct responses", q.id)
            continue
        items.append((q, con.draw(q, derive_seed(seed, "cai principle", i)), [cs[j] for j in two], two))
    labeller = ctx.base if ex.cai_labeller == "base" and ctx.base is not None else qs
    probs = preference_probs(ctx, labeller, [q for q, *_ in items], [p for _, p, *_ in items],
                             [(con.render(q, a), con.render(q, b)) for q, _, (a, b), _ in items],
                             [con.examples(q, p, ex.cai_shots) for q, p, *_ in items]) if items else []
    out = []
    for (q, principle, (a, b), js), (p1, p2) in zip(items, probs):
        p = p1 if p2 is None else (p1 + p2) / 2  # p: the label's probability that `a` is better
        confidence = abs(2 * p - 1)
        stats["label_confidence_sum"] += confidence
        if p2 is not None:
            stats["orders_agree"] += (p1 >= 0.5) == (p2 >= 0.5)
        chosen, rejected = (a, b) if p >= 0.5 else (b, a)
        sa, sb = ctx.check.score(q, a).value, ctx.check.score(q, b).value  # recorded, never used to choose
        if sa is not None and sb is not None and sa != sb:  # exactly one is right: does the label agree?
            stats["checkable_pairs"] += 1
            stats["label_agrees_with_answer_check"] += (sa > sb) == (p >= 0.5)
        if confidence < ex.cai_min_confidence:
            stats["low_confidence"] += 1
            continue
        # p_chosen: the label's probability that the chosen side is better; p_orders: that the first-drawn
        # sample is, asked with it as (A) and as (B)
        meta = _meta("feedback", r, q, principle, samples=js if p >= 0.5 else js[::-1], p_chosen=max(p, 1 - p),
                     p_orders=[p1, p2], scores=[sa, sb] if p >= 0.5 else [sb, sa], seeds=[chosen.seed, rejected.seed],
                     chosen=[chosen.rationale, chosen.answer], rejected=[rejected.rationale, rejected.answer])
        out.append(PreferencePair(prompt_ids(qs, ctx.tok, q.prompt(), True), completion_ids(qs, chosen, True),
                                  completion_ids(qs, rejected, True), meta,
                                  confidence if ex.cai_soft_label == "weight" else 1.0))
    n = len(items)
    stats["labelled"] = n
    stats["label_confidence_mean"] = stats.pop("label_confidence_sum", 0.0) / max(1, n)
    stats["pairs"] = len(out)
    return out, dict(stats)


def preference_round(ex, r: int) -> bool:
    """Whether round r of `explicit=cai` is the AI-feedback stage (preference pairs), not the supervised one."""
    return r > ex.cai_sl_rounds


def collect_cai(ctx, qs, questions, r: int, seed: int, skips: Skips):
    stage = collect_feedback if preference_round(ctx.ex, r) else collect_revisions
    return stage(ctx, qs, questions, r, seed, skips)
