"""The supervised methods' rounds: what STaR, RFT and System-2 distillation collect from the model's samples
(SFT examples, and counts of what was kept and why not). The loop (loop.py) calls them; V-STaR's generator
(preference.py) is STaR's. Each takes the loop's `Context` (ctx: the config, tokenizer, sampler and answer
check)."""

from __future__ import annotations

from collections import defaultdict

from quietstar.methods.explicit.dataset import Skips, majority, make_sft, normalise_rationale
from quietstar.methods.explicit.tasks import normalise_answer
from quietstar.seeds import derive_seed


def _meta(method, r, q, j, s, **extra) -> dict:
    return {"method": method, "iteration": r, "question_id": q.id, "sample": j,
            "scores": {"answer": s.value, "reason": s.reason}, **extra}


def collect_star(ctx, qs, questions, r: int, seed: int, skips: Skips):
    ex, few = ctx.ex, ctx.ex.few_shot
    out, wrong, stats = [], [], defaultdict(int)
    comps = ctx.sample(qs, [q.prompt(few) for q in questions], 1, "cot", seed, desc=f"round {r}: star sample")
    for q, (c,) in zip(questions, comps):
        s = ctx.check.score(q, c)
        if s.value is None:
            skips.add(s.reason, q.id)
        elif s.value == 1:
            e = make_sft(qs, ctx.tok, q.prompt(), c, True, skips, _meta("star", r, q, 0, s, source="generated"))
            out += [e] if e else []
        else:
            wrong.append(q)
    stats["generated_correct"] = len(out)
    if ex.rationalize and wrong:
        comps = ctx.sample(qs, [q.prompt(few, hint=True) for q in wrong], 1, "cot", derive_seed(seed, "rationalise"),
                           desc=f"round {r}: star rationalise")
        for q, (c,) in zip(wrong, comps):
            s = ctx.check.score(q, c)
            if s.value == 1:  # trained on without the hint: the prompt is the plain question
                e = make_sft(qs, ctx.tok, q.prompt(), c, True, skips, _meta("star", r, q, 0, s, source="rationalised"))
                out += [e] if e else []
                stats["rationalised_correct"] += e is not None
        stats["rationalise_tried"] = len(wrong)
    return out, dict(stats)


def collect_rft(ctx, qs, questions, r: int, seed: int, skips: Skips):
    out, stats = [], defaultdict(int)
    comps = ctx.k_rationales(qs, questions, seed, f"round {r}: rft sample")
    for q, cs in zip(questions, comps):
        seen = set()
        for j, c in enumerate(cs):
            s = ctx.check.score(q, c)
            if s.value is None:
                skips.add(s.reason, q.id)
                continue
            stats["correct"] += s.value == 1
            key = normalise_rationale(c.rationale)
            if s.value != 1 or key in seen:
                stats["duplicates"] += s.value == 1
                continue
            seen.add(key)
            e = make_sft(qs, ctx.tok, q.prompt(), c, True, skips, _meta("rft", r, q, j, s))
            out += [e] if e else []
        stats["questions_with_a_path"] += bool(seen)
    return out, dict(stats)


def collect_system2(ctx, qs, questions, r: int, seed: int, skips: Skips):
    out, stats = [], defaultdict(int)
    comps = ctx.k_rationales(qs, questions, seed, f"round {r}: system2 sample")
    for q, cs in zip(questions, comps):
        answers = [normalise_answer(c.answer, q.kind) for c in cs]
        top, share = majority(answers)
        if top is None:
            skips.add("no answer in any sample", q.id)
            continue
        if share < ctx.ex.consistency:
            stats["inconsistent"] += 1
            continue
        j = answers.index(top)
        s = ctx.check.score(q, cs[j])  # recorded, never used to choose: System 2 distillation has no labels
        e = make_sft(qs, ctx.tok, q.prompt(), cs[j], False, skips,
                     _meta("system2", r, q, j, s, majority_share=share, votes=answers))
        if e:
            out.append(e)
            stats["kept_label_correct"] += s.value == 1
    return out, dict(stats)
