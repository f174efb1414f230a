"""The preference-based explicit-thinking methods on the loop of explicit/loop.py (docs/explicit_preference.md).

Each is a `collect_*` like the SFT methods' (loop.COLLECT): it samples with the latest model, scores, and
returns the round's data, here preference pairs for DPO (losses.fit_dpo: a frozen reference, its log-probs
computed once, beta) except V-STaR's generator, which is STaR's SFT data.

  vstar  V-STaR (Hosseini et al. 2024, "V-STaR: Training Verifiers for Self-Taught Reasoners"). The generator
         is STaR's (collect_star). Each round also samples k solutions per question and keeps, per question,
         up to pairs_per_question (correct, incorrect) pairs for the verifier; after the last round a verifier
         is trained with DPO on the pairs of every round, starting from (and referenced to) the base model,
         and held-out questions are answered best-of-k by its score (`verify`).
  tpo    Thought Preference Optimisation (Wu et al. 2024, "Thinking LLMs: General Instruction Following with
         Thought Generation"). k samples of thought + response per question; the judge scores the response
         only (AnswerCheck on this task; or a judge model, never reading the thought: ModelJudge's rubric
         score, or ChoiceJudge's multiple-choice comparisons of the responses); the best and the worst of the
         k form a pair over thought + response; DPO; iterate. Each round records the judge's agreement with
         the answer check and, on the reasoning corpus, how many pairs choose (and reject) the query's chain.
  cpo    Chain of Preference Optimisation (Zhang et al. 2024). Per question, tree.search over chain steps: the
         model proposes next steps (`StepSearch.propose`, the real sampler), rates each partial chain itself
         (`StepSearch.evaluate`), keeps the best `beam`; the winning chain's per-step pairs
         (tree.preference_pairs) are DPO pairs whose prompt is the question, <start> and the steps before.

Bad input is counted in `Skips` with its reason, never raised: a score that cannot be read (a judge output
with no number in range, a question with no gold answer), an empty generation, a pair whose sides are the
same, and for TPO a question whose best and worst samples score the same.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import defaultdict
from itertools import product
from typing import List, Optional

import torch

from quietstar.methods.explicit import tree
from quietstar.methods.explicit.bestofk import accuracy_vs_k
from quietstar.methods.explicit.collect import collect_star
from quietstar.methods.explicit.dataset import PreferencePair, Skips, completion_ids, majority, make_pair, prompt_ids
from quietstar.methods.explicit.judge import ModelJudge, Score
from quietstar.methods.explicit.losses import fit_dpo, sequence_logprobs, token_batch
from quietstar.methods.explicit.sample import Completion, sample_rows
from quietstar.methods.explicit.tasks import normalise_answer
from quietstar.seeds import derive_seed

# TPO's judge sees the response, not the thought (the paper's point: thoughts are optimised only through the
# responses they lead to).
RESPONSE_JUDGE_TEMPLATE = ("Rate the answer from {lo} to {hi}. {hi}: the answer is correct. {lo}: the answer is "
                           "wrong.\nQuestion: {question}\nAnswer: {answer}\nScore:")


def _meta(method, r, q, **extra) -> dict:
    return {"method": method, "iteration": r, "question_id": q.id, **extra}


# ---------------------------------------------------------------------------------------------- V-STaR


def verifier_pairs(ctx, qs, q, comps, scores, r: int, skips: Skips, stats) -> List[PreferencePair]:
    """Up to pairs_per_question (correct, incorrect) pairs of one question's solutions, taken from all C x W
    combinations in an order that uses every solution before any is paired twice."""
    right, wrong = [], []
    for j, (c, s) in enumerate(zip(comps, scores)):
        if s.value is None:
            skips.add(s.reason, q.id)
        else:
            (right if s.value == 1 else wrong).append(j)
    stats["verifier_correct"] += len(right)
    stats["verifier_incorrect"] += len(wrong)
    if not right or not wrong:
        stats["verifier_one_sided"] += 1  # every sample right (or every one wrong): nothing to contrast
        return []
    out = []
    combos = sorted(product(range(len(right)), range(len(wrong))), key=lambda ij: (max(ij), ij))
    for i, w in combos[:ctx.ex.pairs_per_question]:
        a, b = right[i], wrong[w]
        p = make_pair(qs, ctx.tok, q.prompt(), comps[a], comps[b], skips,
                      _meta("vstar", r, q, samples=[a, b], scores=[scores[a].value, scores[b].value]))
        out += [p] if p else []
    return out


def collect_vstar(ctx, qs, questions, r: int, seed: int, skips: Skips):
    """STaR's SFT examples for the generator; the round's verifier pairs go to ctx.verifier_pairs."""
    examples, stats = collect_star(ctx, qs, questions, r, seed, skips)
    comps = ctx.k_rationales(qs, questions, derive_seed(seed, "vstar verifier samples"),
                             f"round {r}: vstar verifier samples")
    stats = defaultdict(int, stats)
    n0 = len(ctx.verifier_pairs)
    for q, cs in zip(questions, comps):
        ctx.verifier_pairs += verifier_pairs(ctx, qs, q, cs, ctx.check.score_many([q] * len(cs), cs), r, skips, stats)
    stats["verifier_pairs"] = len(ctx.verifier_pairs) - n0
    return examples, dict(stats)


@torch.no_grad()
def verifier_scores(ctx, verifier, ref, qs_ids, comps: List[Completion]) -> dict:
    """{"ratio": beta * (log pi_v - log pi_ref), "likelihood": log pi_v} of each completion (sequence sums over
    its tokens), batched."""
    out = {"ratio": [], "likelihood": []}
    dev = verifier.model.tok_embeddings.weight.device
    for i in range(0, len(comps), 256):
        chunk = comps[i:i + 256]
        b = token_batch(qs_ids[i:i + 256], [completion_ids(verifier, c, True) for c in chunk], ctx.tok.pad_id,
                        verifier.end_token_id, ctx.end_target, dev)
        v, r = sequence_logprobs(verifier, b), sequence_logprobs(ref, b)
        out["ratio"] += (ctx.ex.beta * (v - r)).tolist()
        out["likelihood"] += v.tolist()
    return out


def verify(ctx, base, generator, questions, seed: int, log=print) -> dict:
    """V-STaR's inference: train the verifier on every round's pairs, sample best_of_n solutions per question
    with `generator`, and report accuracy vs k for best-of-k by each verifier score, majority vote and pass@k."""
    ex, pairs = ctx.ex, ctx.verifier_pairs
    verifier = copy.deepcopy(base)
    losses = fit_dpo(verifier, base, pairs, ex.beta, ex.verifier_steps if pairs else 0, ex.batch_size,
                     ctx.cfg.optim, derive_seed(seed, "vstar verifier fit"), ctx.end_target, ctx.tok.pad_id)
    log(f"[explicit] vstar verifier: {len(pairs)} pairs, {len(losses)} DPO steps"
        + (f", loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else " (no pairs: the verifier is the base)"))
    n = ex.best_of_n
    comps = ctx.sample(generator, [q.prompt() for q in questions], n, "cot", derive_seed(seed, "vstar best-of-n"),
                       desc="vstar: best-of-n samples")
    flat = [c for cs in comps for c in cs]
    ids = [prompt_ids(generator, ctx.tok, q.prompt(), True) for q in questions for _ in range(n)]
    scores = verifier_scores(ctx, verifier, base, ids, flat)
    checks = [ctx.check.score(q, c) for q, cs in zip(questions, comps) for c in cs]
    correct = [[s.value == 1 for s in checks[i * n:(i + 1) * n]] for i in range(len(questions))]
    answers = [[normalise_answer(c.answer, q.kind) for c in cs] for q, cs in zip(questions, comps)]
    res = {"pairs": len(pairs), "loss_first": losses[0] if losses else None,
           "loss_last": losses[-1] if losses else None, "n": n, "score": ex.verifier_score,
           "unscorable": sum(s.value is None for s in checks),
           "tokens_per_solution": sum(c.n_generated for c in flat) / len(flat)}
    for name, vals in scores.items():
        per_q = [vals[i * n:(i + 1) * n] for i in range(len(questions))]
        curves = accuracy_vs_k(correct, per_q, answers)
        res[f"best_of_k_{name}"] = curves["best_of_k"]
        res["majority_vote"], res["pass_at_k"] = curves["majority_vote"], curves["pass_at_k"]
    res["best_of_k"] = res[f"best_of_k_{ex.verifier_score}"]
    return res


# ---------------------------------------------------------------------------------------------- TPO


def judge_model(ctx, qs):
    """The model behind TPO's model judges (explicit.judge_model): the run's base model (ctx.base, fixed across
    rounds), the latest one (`qs`), or a checkpoint, loaded once and kept on ctx."""
    how = ctx.ex.judge_model
    if how == "latest" or (how == "base" and ctx.base is None):
        return qs
    if how == "base":
        return ctx.base
    if getattr(ctx, "judge_checkpoint", None) is None:
        ctx.judge_checkpoint = load_judge(how, ctx.tok, qs.model.tok_embeddings.weight.device)
    return ctx.judge_checkpoint


def load_judge(path, tokenizer, device):
    """A judge model from a checkpoint; UserError when its tokenizer writes text otherwise than the run's."""
    from quietstar.methods.quietstar.load import load_thinker_checkpoint
    from quietstar.errors import UserError

    judge = load_thinker_checkpoint(path, device=device).eval()
    probe = "Which answer is correct? (A) a3=d\n(B) 12\nBetter: ("
    if judge.tokenizer.encode(probe, add_bos=False) != tokenizer.encode(probe, add_bos=False):
        raise UserError(f"explicit.judge_model={path}: its tokenizer is not the run's (a judge reads the run's "
                        f"token ids)")
    return judge


def response_judge(ctx, qs):
    """TPO's judge: the answer check, ModelJudge's rubric score, or ChoiceJudge's pairwise ranking."""
    if ctx.ex.judge == "answer":
        return ctx.check
    if ctx.ex.judge == "choice":
        return ChoiceJudge(ctx, judge_model(ctx, qs))
    return ModelJudge(judge_model(ctx, qs), ctx.tok, template=RESPONSE_JUDGE_TEMPLATE)


CHOICE_PRINCIPLE = "the answer is correct"


class ChoiceJudge:
    """The judge model ranks a question's responses by multiple-choice questions (Constitutional AI's label,
    constitutional.label_prompt and option_logits): for every pair of distinct responses, "which better follows
    the principle: the answer is correct? (A) ... (B) ... Better: (", asked in both orders; p = the mean of the
    two orders' probability (over A and B only) that the first is better. A response's score is its mean p
    against each other distinct response: 1 if it wins every comparison, 0 if it loses every one; responses
    with the same text share a score, and a question with one distinct response scores 0.5 throughout (no
    contrast). The judge reads the response, never the thought: a chain's query and answer (`a3=d`), or
    GSM8K's final answer. Worked questions come first (judge_shots): the document's other worked queries, the
    right answer against another symbol of its chain (the reasoning corpus), or two written-out GSM8K
    problems."""

    def __init__(self, ctx, model):
        from quietstar.methods.explicit.constitutional import _constitution

        self.ctx, self.model, self.con = ctx, model, _constitution(ctx)

    @staticmethod
    def response(q, c: Completion) -> str:
        return f"The answer is {c.answer.strip()}." if q.kind == "gsm8k" else f"{q.query}{c.answer.strip()}"

    def examples(self, q) -> list:
        """Worked multiple-choice questions for `q` (constitutional.Example: response = the wrong answer,
        revision = the right one)."""
        from quietstar.methods.explicit.constitutional import Example, GSM8K_EXAMPLES, GSM8K_PRINCIPLES
        from quietstar.eval.cot import COT_PROMPT

        n = self.ctx.ex.judge_shots
        if q.kind == "gsm8k":  # the flawed responses of two of Constitutional AI's worked critiques, answers only
            final = lambda t: t.rsplit(" ", 1)[1]  # noqa: E731  ("... #### 11" -> "11")
            shots = [GSM8K_EXAMPLES[p][0] for p in GSM8K_PRINCIPLES[:2]]
            return [Example(f"{pq}{COT_PROMPT}\n", f"The answer is {final(wrong)}.", "",
                            f"The answer is {final(right)}.") for pq, wrong, _, right in shots][:n]
        out = []
        for w in q.examples:
            query, _, rest = w.strip().partition("=")
            chain, sep, answer = rest.rpartition(self.con.close)
            other = next((s for s in chain.removeprefix(self.con.open) if s != answer), None)
            if sep and answer and other is not None:
                out.append(Example("", f"{query}={other}", "", f"{query}={answer}"))
            if len(out) == n:
                break
        return out

    def score_groups(self, questions, groups) -> List[List[Score]]:
        """Per question, the Scores of its responses (a list of Completions)."""
        from quietstar.methods.explicit.constitutional import label_prompt, option_ids, option_logits, soft_label

        prompts, where = [], []  # where: (question index, i, j) of each distinct pair, asked (i, j) then (j, i)
        texts = []
        for g, (q, cs) in enumerate(zip(questions, groups)):
            distinct = list(dict.fromkeys(self.response(q, c) for c in cs if c.answer_ids))
            texts.append(distinct)
            shots = self.examples(q)
            for i in range(len(distinct)):
                for j in range(i + 1, len(distinct)):
                    prompts += [label_prompt(q, CHOICE_PRINCIPLE, shots, distinct[i], distinct[j], self.con),
                                label_prompt(q, CHOICE_PRINCIPLE, shots, distinct[j], distinct[i], self.con)]
                    where.append((g, i, j))
        p = soft_label(option_logits(self.model, self.ctx.tok, prompts, option_ids(self.ctx.tok))).tolist()
        wins = [[[] for _ in d] for d in texts]
        for n, (g, i, j) in enumerate(where):
            pij = (p[2 * n] + 1 - p[2 * n + 1]) / 2  # the chance response i is the better one, both orders
            wins[g][i].append(pij)
            wins[g][j].append(1 - pij)
        out = []
        for q, cs, d, w in zip(questions, groups, texts, wins):
            score = {t: (sum(x) / len(x) if x else 0.5) for t, x in zip(d, w)}
            out.append([Score(score[self.response(q, c)], f"judge: wins {score[self.response(q, c)]:.3f}")
                        if c.answer_ids else Score(None, "empty generation") for c in cs])
        return out

    def score_many(self, questions, completions) -> List[Score]:
        """Each completion scored against the others of the same question (consecutive runs of one question)."""
        groups, qs_ = [], []
        for q, c in zip(questions, completions):
            if qs_ and qs_[-1] is q:
                groups[-1].append(c)
            else:
                qs_.append(q)
                groups.append([c])
        return [s for ss in self.score_groups(qs_, groups) for s in ss]


def best_and_worst(ctx, qs, q, comps, scores, r: int, skips: Skips) -> Optional[PreferencePair]:
    """The pair (highest-scored, lowest-scored) of one question's samples over thought + response; ties within
    the best (or the worst) go to the sample drawn first. None, counted, when there is no contrast."""
    scored = []
    for j, (c, s) in enumerate(zip(comps, scores)):
        if s.value is None:
            skips.add(s.reason, q.id)
        elif not c.answer_ids:
            skips.add("empty generation", q.id)
        else:
            scored.append((s.value, j))
    if len(scored) < 2:
        skips.add("fewer than two scored samples", q.id)
        return None
    (hi, a), (lo, b) = max(scored, key=lambda x: (x[0], -x[1])), min(scored)
    if hi == lo:
        skips.add("best and worst score the same", q.id)
        return None
    meta = _meta("tpo", r, q, samples=[a, b], scores=[hi, lo], reasons=[scores[a].reason, scores[b].reason])
    return make_pair(qs, ctx.tok, q.prompt(), comps[a], comps[b], skips, meta)  # None (counted) if the same text


def judge_agreement(checks, scores, pair, stats) -> None:
    """How a model judge's ranking of one question's samples agrees with the answer check: over every (right,
    wrong) pair of samples by the check, whether the judge scores the right one higher (a tie is not agreement);
    and whether the built pair's chosen side is the right one, where exactly one side is."""
    right = [j for j, s in enumerate(checks) if s.value == 1]
    wrong = [j for j, s in enumerate(checks) if s.value == 0]
    for name in ("judge_ranked", "judge_ranked_agree", "judge_ranked_ties", "judge_checkable_pairs",
                 "judge_pairs_agree"):
        stats[name] += 0  # recorded even where nothing could be compared
    stats["samples_right"] += len(right)
    for a in right:
        for b in wrong:
            x, y = scores[a].value, scores[b].value
            if x is None or y is None:
                continue
            stats["judge_ranked"] += 1
            stats["judge_ranked_agree"] += x > y
            stats["judge_ranked_ties"] += x == y
    if pair is not None:
        a, b = pair.meta["samples"]
        if {checks[a].value, checks[b].value} == {0.0, 1.0}:
            stats["judge_checkable_pairs"] += 1
            stats["judge_pairs_agree"] += checks[a].value == 1


def pair_chains(q, pair, stats) -> None:
    """Which rationales a pair holds, on the reasoning corpus (the question's chain known): each side's
    reasoning.thought_kind, chain | decoy | other, recorded in the pair's meta and counted."""
    from quietstar.reasoning import thought_kind

    if not q.chain:
        return
    kinds = [thought_kind(side[0], q.chain, q.decoy) for side in (pair.meta["chosen"], pair.meta["rejected"])]
    pair.meta["kinds"] = kinds
    stats["pairs_with_chains"] += 1
    for side, kind in zip(("chosen", "rejected"), kinds):
        stats[f"{side}_{kind}"] += 1


def shares(stats) -> None:
    """The rates of the round's counts, where their denominators are not zero: the judge's agreement with the
    answer check, and the share of pairs whose chosen (rejected) side is the query's chain (its decoy)."""
    if stats.get("judge_ranked"):
        stats["judge_ranking_agreement"] = stats["judge_ranked_agree"] / stats["judge_ranked"]
    if stats.get("judge_checkable_pairs"):
        stats["judge_pair_agreement"] = stats["judge_pairs_agree"] / stats["judge_checkable_pairs"]
    n = stats.get("pairs_with_chains", 0)
    for side in ("chosen", "rejected") if n else ():
        for kind in ("chain", "decoy", "other"):
            stats[f"{side}_{kind}_share"] = stats[f"{side}_{kind}"] / n  # a defaultdict: 0 where none was


def collect_tpo(ctx, qs, questions, r: int, seed: int, skips: Skips):
    comps = ctx.k_rationales(qs, questions, seed, f"round {r}: tpo sample")
    judge, out, stats = response_judge(ctx, qs), [], defaultdict(int)
    flat_q = [q for q, cs in zip(questions, comps) for _ in cs]
    flat_c = [c for cs in comps for c in cs]
    flat = judge.score_many(flat_q, flat_c)
    checks = flat if judge is ctx.check else ctx.check.score_many(flat_q, flat_c)  # recorded, never used to choose
    k = ctx.ex.k
    for i, (q, cs) in enumerate(zip(questions, comps)):
        scores = flat[i * k:(i + 1) * k]
        stats["samples_scored_1"] += sum(s.value == 1 for s in scores)
        p = best_and_worst(ctx, qs, q, cs, scores, r, skips)
        if judge is not ctx.check:
            judge_agreement(checks[i * k:(i + 1) * k], scores, p, stats)
        if p:
            pair_chains(q, p, stats)
            out.append(p)
    stats["pairs"] = len(out)
    shares(stats)
    return out, dict(stats)


# ---------------------------------------------------------------------------------------------- CPO


class StepSearch:
    """tree.search's three callables for one question, over the real sampler.

    A step is a tuple of token ids written after the question's `<start>`: `step_tokens` chain tokens (fewer
    when the chain's closing mark comes first). A step that closes the chain is final and carries the rest
    of the completion: `<end>`, the answer and its stop token, sampled in the same pass (the chain also
    closes, as the sampler closes it, when it reaches max_rationale tokens).
    """

    def __init__(self, ctx, qs, q, seed: int):
        self.ctx, self.qs, self.q, self.seed = ctx, qs, q, seed
        self.rule = ctx.rules["cot"]
        self.root = prompt_ids(qs, ctx.tok, q.prompt(), True)  # BOS, question, <start>
        self.end = qs.end_token_id
        self.calls = 0
        self.malformed = 0  # proposals dropped by the step filter (explicit.step_filter)
        self._target: Optional[str] = None  # the model's own majority answer (self_eval=agreement)

    def _seeds(self, n: int) -> List[int]:
        self.calls += 1
        g = torch.Generator().manual_seed(derive_seed(self.seed, "cpo sampler call", self.calls))
        return torch.randint(0, 2**62, (n,), generator=g).tolist()

    def ids(self, prefix) -> List[int]:
        return self.root + [t for step in prefix for t in step]

    def _left(self, prefix) -> int:
        return self.rule.max_rationale - sum(len(s) for s in prefix)

    def _sample(self, prefixes, n: int, max_tokens, temperature: float) -> List[List[Completion]]:
        """n continuations of each prefix: up to max_tokens(prefix) rationale tokens, then (if the chain
        closed, or reached its cap) <end> and the answer."""
        out = []
        for cap in sorted({max_tokens(p) for p in prefixes}):  # one sampler call per rationale budget
            group = [i for i, p in enumerate(prefixes) if max_tokens(p) == cap]
            rule = dataclasses.replace(self.rule, max_rationale=cap)
            rows = [self.ids(prefixes[i]) for i in group for _ in range(n)]
            got = sample_rows(self.qs, self.ctx.tok, rows, self._seeds(len(rows)), rule, temperature,
                              self.ctx.ex.top_p, started=True)
            out += [(i, got[j * n:(j + 1) * n]) for j, i in enumerate(group)]
        return [cs for _, cs in sorted(out, key=lambda x: x[0])]

    def _step(self, prefix, c: Completion) -> tuple:
        """The step a continuation proposes: its chain tokens; with <end>, answer and stop when it is final."""
        if c.closed or len(c.rationale_ids) >= self._left(prefix):
            return tuple(c.rationale_ids) + (self.end,) + tuple(completion_ids(self.qs, c, False))
        return tuple(c.rationale_ids)

    def propose(self, prefixes, n: int):
        ex, out = self.ctx.ex, []
        t = ex.temperature if ex.propose_temperature is None else ex.propose_temperature
        comps = self._sample(prefixes, n, lambda p: min(ex.step_tokens, self._left(p)), t)
        for p, cs in zip(prefixes, comps):
            steps = []
            for c in cs:
                s = self._step(p, c)
                if not s or s in steps:  # the same step sampled twice is one candidate
                    continue
                if ex.step_filter and not self.well_formed(s):
                    self.malformed += 1
                    continue
                steps.append(s)
            out.append(steps)
        return out

    def well_formed(self, step) -> bool:
        """Every chain token of `step` is one of the corpus's symbols (ctx.step_alphabet); a final step's answer
        too, and it is not empty."""
        ok = self.ctx.step_alphabet
        cut = step.index(self.end) if self.end in step else len(step)
        if any(t not in ok for t in step[:cut]):
            return False
        if cut == len(step):
            return True
        answer = [t for t in step[cut + 1:] if t not in self.rule.answer_stop]
        return bool(answer) and all(t in ok for t in answer)

    def is_final(self, step) -> bool:
        return self.end in step

    def _answer(self, step) -> Optional[str]:
        tail = list(step[step.index(self.end) + 1:])
        return normalise_answer(self.ctx.tok.decode([t for t in tail if t not in self.rule.answer_stop]), self.q.kind)

    def evaluate(self, paths):
        how = self.ctx.ex.self_eval
        if how == "likelihood":
            return self._likelihood(paths)
        if how == "model":
            return self._model_judge(paths)
        if how == "answer":
            if self.q.gold is None:  # nothing to check against: every node unscored (tree counts them)
                return [None] * len(paths)
            return self._reach(paths, self.q.gold)
        return self._reach(paths, self._majority())

    def _majority(self) -> str:
        """The model's own majority answer to the question, from `rollouts` chains sampled at the root (once)."""
        if self._target is None:
            (root,) = self._sample([()], self.ctx.ex.rollouts, self._left, self.ctx.ex.temperature)
            self._target = majority(normalise_answer(c.answer, self.q.kind) for c in root)[0] or ""
        return self._target

    def _reach(self, paths, target: str):
        """The share of `rollouts` sampled continuations of each partial chain whose answer is `target`; a
        finished chain scores 1 or 0 by its own answer. With the model's majority answer as the target
        (self_eval=agreement) this is self-consistency as a value estimate and reads no gold answer; with the
        gold answer (self_eval=answer) it is the answer check of a verifiable task, as TPO's judge=answer."""
        m, t = self.ctx.ex.rollouts, self.ctx.ex.temperature
        open_paths = [p for p in paths if not self.is_final(p[-1])]
        rolled = iter(self._sample(open_paths, m, self._left, t) if open_paths else [])
        out = []
        for p in paths:
            if self.is_final(p[-1]):
                out.append(float(self._answer(p[-1]) == target))
            else:
                cs = next(rolled)
                out.append(sum(normalise_answer(c.answer, self.q.kind) == target for c in cs) / m)
        return out

    @torch.no_grad()
    def _likelihood(self, paths):
        """exp(mean log p) of the chain's tokens so far: how sure the model is of the path, not whether it is right."""
        ctx = self.ctx
        comps = [[t for s in p for t in s] for p in paths]
        b = token_batch([self.root] * len(paths), comps, ctx.tok.pad_id, self.end, ctx.end_target,
                        self.qs.model.tok_embeddings.weight.device)
        s = sequence_logprobs(self.qs, b)
        return [float(torch.exp(v / len(c))) for v, c in zip(s, comps)]

    def _model_judge(self, paths):
        tok, comps = self.ctx.tok, []
        for p in paths:
            ids = [t for s in p for t in s]
            cut = ids.index(self.end) if self.end in ids else len(ids)
            rat, ans = ids[:cut], [t for t in ids[cut + 1:] if t not in self.rule.answer_stop]
            comps.append(Completion(rat, ans, None, tok.decode(rat), tok.decode(ans), len(ids), 0, cut < len(ids)))
        scores = ModelJudge(self.qs, tok).score_many([self.q] * len(paths), comps)
        return [s.value for s in scores]  # None: the judge's output did not parse (tree counts it unscored)


SEARCH_SKIPS = {"identical": "identical pair", "duplicate": "duplicate rejected step",
                "unscored": "judge output could not be parsed", "no_path": "search finished no chain"}


def collect_cpo(ctx, qs, questions, r: int, seed: int, skips: Skips):
    from quietstar.eval.common import Progress

    ex, out, stats, per_question = ctx.ex, [], defaultdict(int), []
    bar = Progress(len(questions), f"round {r}: cpo search")
    for i, q in enumerate(questions):
        s = StepSearch(ctx, qs, q, derive_seed(seed, "cpo question", i))
        t = tree.search(s.propose, s.evaluate, s.is_final, beam=ex.beam, n=ex.proposals,
                        max_depth=ctx.rules["cot"].max_rationale + 1)
        path = tree.winning_path(t)
        pairs, skipped = tree.preference_pairs(t, path, kept_below=ex.pair_kept_siblings)
        per_question.append(len(pairs))
        stats["malformed_steps"] += s.malformed
        for reason, count in skipped.items():
            if reason == "kept_sibling":
                stats["kept_siblings"] += count  # not bad input: the search kept both, neither is preferred
            else:
                for _ in range(count):
                    skips.add(SEARCH_SKIPS[reason], q.id)
        stats["nodes"] += len(t.nodes) - 1
        if path is not None:
            got = s._answer(path[-1].step)
            # recorded; the search itself reads the gold answer only with self_eval=answer
            stats["winning_correct"] += q.gold is not None and got == q.gold
        for pr in pairs:
            out.append(PreferencePair(s.ids(pr.prefix), list(pr.chosen), list(pr.rejected),
                                      _meta("cpo", r, q, depth=pr.depth, scores=[pr.chosen_score, pr.rejected_score],
                                            chosen=ctx.tok.decode([x for x in pr.chosen if x != s.end]),
                                            rejected=ctx.tok.decode([x for x in pr.rejected if x != s.end]))))
        bar.update(1)
    bar.close()
    stats["pairs"] = len(out)
    # pairs found per question: the mean, how many questions gave any, and the most from one
    stats["pairs_per_question"] = len(out) / max(1, len(questions))
    stats["questions_with_pairs"] = sum(n > 0 for n in per_question)
    stats["max_pairs_per_question"] = max(per_question, default=0)
    return out, dict(stats)
