"""The explicit-thinking recipe: `python train.py explicit=star` (or rft, system2, vstar, tpo, cpo, cai);
docs/explicit.md and docs/explicit_preference.md.

    base model (learn_to_think's pretrain stage)
    round r = 1 .. iterations:
        sample   k completions per training question with the latest model   (sample.py)
        score    against the gold answer                                     (judge.py)
        dataset  the method's choice of examples (or preference pairs), written as round_<r>/sft.jsonl
                 (pairs.jsonl)                                               (dataset.py)
        train    SFT (or DPO, the model it starts from as the frozen reference) of `base` (or the latest
                 model) on that dataset                                      (losses.py)
        evaluate greedy, on the held-out split: answer accuracy and tokens generated per answer, with a
                 rationale (cot) and without (direct); and on training-split validation questions, for the
                 stopping rule
    results.json, metrics.jsonl (one record per round) in the run dir.

The methods differ only in how a round's dataset is chosen (`collect_*`):
    star     one completion per question (few-shot prompt); keep the correct ones; rationalise the wrong ones
             with the gold answer as a hint, keep the correct rationalisations without the hint
    rft      k completions per question; keep every distinct correct reasoning path (normalised rationale)
    system2  k completions per question; where the majority answer has at least `consistency` of the votes
             (no gold used), train the direct answer: the prompt, then that answer, no rationale
    vstar, tpo, cpo  the preference-based methods (explicit/preference.py); V-STaR also trains a verifier after
             the last round and reports best-of-k on the held-out questions (preference.verify)
    cai      Constitutional AI (explicit/constitutional.py): the first cai_sl_rounds rounds are SFT on the model's
             critiqued revisions of its responses, the later ones preference pairs the model labels itself
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections import defaultdict
from pathlib import Path

import torch

from quietstar.methods.explicit.collect import collect_rft, collect_star, collect_system2
from quietstar.methods.explicit.constitutional import collect_cai, preference_round
from quietstar.methods.explicit.dataset import Skips, write_jsonl
from quietstar.methods.explicit.judge import AnswerCheck
from quietstar.methods.explicit.losses import PreferenceLoss, fit_dpo, fit_sft
from quietstar.methods.explicit.preference import collect_cpo, collect_tpo, collect_vstar, verify
from quietstar.methods.explicit.sample import sample
from quietstar.methods.explicit.tasks import (GSM8K_MARK, GSM8K_START, gsm8k_splits, gsm8k_stop_rule,
                                              reasoning_questions, reasoning_stop_rule, step_alphabet)
from quietstar.provenance import write_record
from quietstar.seeds import derive_seed

EVAL_MODES = {"star": "cot", "rft": "cot", "system2": "direct", "vstar": "cot", "tpo": "cot", "cpo": "cot",
              "cai": "cot"}
DPO_METHODS = ("tpo", "cpo")  # their rounds train on preference pairs (V-STaR's generator is STaR's SFT)


class Context:
    """What a round needs besides the model: tokenizer, stop rules, the answer check, settings."""

    def __init__(self, cfg, tok):
        self.cfg, self.ex, self.tok = cfg, cfg.explicit, tok
        rc = cfg.data.reasoning
        if self.ex.task == "gsm8k":
            n = self.ex.rationale_tokens
            self.rules = {"cot": gsm8k_stop_rule(tok, n, True), "direct": gsm8k_stop_rule(tok, n, False)}
            self.step_alphabet = frozenset()
        else:
            self.rules = {"cot": reasoning_stop_rule(rc, tok, True), "direct": reasoning_stop_rule(rc, tok, False)}
            self.step_alphabet = step_alphabet(rc, tok)  # CPO's step filter: the tokens a chain step is made of
        self.end_target = self.rules["cot"].rationale_stop[0]  # <end> is scored as the closing mark
        self.check = AnswerCheck()
        self.base = None  # the model the run starts from (set by run): TPO's fixed model judge
        self.verifier_pairs: list = []  # V-STaR: the verifier's pairs, from every round

    def k_rationales(self, qs, questions, seed, desc):
        """explicit.k rationale + answer samples per question, from the few-shot prompt."""
        return self.sample(qs, [q.prompt(self.ex.few_shot) for q in questions], self.ex.k, "cot", seed, desc=desc)

    def sample(self, qs, prompts, k, mode, seed, greedy=False, desc="", implicit=False):
        from quietstar.eval.common import Progress

        bar = Progress(len(prompts) * k, desc) if desc else None
        done = [0]

        def tick(n):
            bar.update(n - done[0])
            done[0] = n
        out = sample(qs, self.tok, prompts, k, self.rules[mode], 0.0 if greedy else self.ex.temperature,
                     self.ex.top_p, torch.Generator().manual_seed(seed), self.ex.sample_batch,
                     tick if bar else None, implicit)
        if bar:
            bar.close()
        return out


class Rounds:
    """The best round by validation accuracy (base = round 0) and the model the next round builds on: the
    round just trained (iterate_from=latest) or the best so far (best: a round that did not beat validation
    is not built on)."""

    def __init__(self, base, base_val: float, iterate_from: str = "latest"):
        self.iterate_from = iterate_from
        self.best_val, self.best_round, self.best_model, self.since_best = base_val, 0, base, 0
        self.latest, self.latest_round = base, 0

    def update(self, r: int, model, val: float) -> None:
        self.latest, self.latest_round = model, r
        if val > self.best_val:
            self.best_val, self.best_round, self.best_model, self.since_best = val, r, model, 0
            return
        self.since_best += 1
        if self.iterate_from == "best":
            self.latest, self.latest_round = self.best_model, self.best_round


def round_seeds(seed: int, r: int) -> dict:
    """Round r's seeds under the run's seed: its samples (`collect`, which derives its own streams from it) and
    its optimizer's batch order (`fit`). Hashed (quietstar.seeds), valid for any train.seed."""
    return {"collect": derive_seed(seed, "explicit collect", r), "fit": derive_seed(seed, "explicit fit", r)}


COLLECT = {"star": collect_star, "rft": collect_rft, "system2": collect_system2, "vstar": collect_vstar,
           "tpo": collect_tpo, "cpo": collect_cpo, "cai": collect_cai}


@torch.no_grad()
def evaluate(ctx: Context, qs, questions, mode: str, desc: str = "", implicit: bool = False) -> dict:
    """Greedy answers to `questions`: accuracy (overall and by difficulty), tokens generated per answer,
    the share of rationales that ended at their stop rule, and a few examples. implicit: a Quiet-STaR model
    thinks before every token it writes (sample.sample_rows); its hidden thought tokens are counted."""
    comps = ctx.sample(qs, [q.prompt() for q in questions], 1, mode, 0, greedy=True, desc=desc, implicit=implicit)
    per_token = qs.cfg.n_ahead if implicit else 1  # <start>, n_ahead - 3 thought tokens, <end>, the token
    hits, tokens, closed = defaultdict(list), [], []
    for q, (c,) in zip(questions, comps):
        hits[str(q.difficulty)].append(ctx.check.score(q, c).value == 1)
        tokens.append(c.n_generated * per_token)
        closed.append(c.closed)
    every = [h for v in hits.values() for h in v]
    res = {"acc": sum(every) / len(every), "acc_by_difficulty": {k: sum(v) / len(v) for k, v in sorted(hits.items())},
           "tokens_per_answer": sum(tokens) / len(tokens), "n": len(every)}
    if mode == "cot":
        res["rationale_closed"] = sum(closed) / len(closed)
    res["examples"] = [{"question": q.prompt(), "rationale": c.rationale, "answer": c.answer, "gold": q.gold}
                       for q, (c,) in list(zip(questions, comps))[:3]]
    return res


@torch.no_grad()
def evaluate_sampled(ctx: Context, qs, questions, n: int, seed: int, desc: str = "") -> dict:
    """n rationales per question sampled at the training temperature: the share that are right. Where greedy
    chains are already all right, this is what a preference method can still move: how much of the model's
    distribution is on right chains."""
    comps = ctx.sample(qs, [q.prompt() for q in questions], n, "cot", seed, desc=desc)
    hits = [ctx.check.score(q, c).value == 1 for q, cs in zip(questions, comps) for c in cs]
    return {"acc": sum(hits) / len(hits), "n": len(hits), "temperature": ctx.ex.temperature,
            "tokens_per_answer": sum(c.n_generated for cs in comps for c in cs) / len(hits)}


def _question_documents(rc, ex) -> tuple[int, int]:
    """How many training-split documents hold the training questions, and how many after them the validation ones."""
    return -(-ex.train_questions // rc.n_queries), -(-ex.val_questions // rc.n_queries)


def _questions(cfg):
    """(train, validation, eval) questions: the first documents of the training split, later training
    documents, the first documents of the held-out split (GSM8K: tasks.gsm8k_splits)."""
    from quietstar.reasoning import make_documents

    rc, ex, seed = cfg.data.reasoning, cfg.explicit, cfg.train.seed
    if ex.task == "gsm8k":
        root = Path(ex.gsm8k_dir).expanduser()
        return gsm8k_splits(root / "train.jsonl", root / "test.jsonl", ex.train_questions, ex.val_questions,
                            ex.eval_questions)
    per_doc = rc.n_queries
    n_train, n_val = _question_documents(rc, ex)
    docs = make_documents(rc, n_train + n_val, seed, "train")
    train = reasoning_questions(docs[:n_train], "train", rc.chain_close, corpus=rc)[:ex.train_questions]
    val = reasoning_questions(docs[n_train:], "train", rc.chain_close, n_train, corpus=rc)[:ex.val_questions]
    n_eval = min(rc.eval_docs, -(-ex.eval_questions // per_doc))
    evq = reasoning_questions(make_documents(rc, n_eval, seed, "eval"), "eval", rc.chain_close,
                              corpus=rc)[:ex.eval_questions]
    if ex.max_difficulty is not None:  # the training and validation questions of the documents above, filtered
        train, val = ([q for q in part if q.difficulty <= ex.max_difficulty] for part in (train, val))
    return train, val, evq


def _replay_documents(cfg, tok) -> list:
    """explicit.replay_weight: token ids of explicit.replay_docs training-split documents, those after the ones
    whose queries are the training and validation questions (_questions)."""
    from quietstar.reasoning import encode_document, make_documents

    rc, ex = cfg.data.reasoning, cfg.explicit
    first = sum(_question_documents(rc, ex))
    docs = make_documents(rc, first + ex.replay_docs, cfg.train.seed, "train")[first:]
    return [encode_document(d, tok)[0] for d in docs]


def _base(cfg, train_fn, stages):
    from quietstar.checkpoint import find_checkpoint
    from quietstar.methods.quietstar.load import load_thinker_checkpoint
    from quietstar.methods.plain.model import reset_thought_embeddings
    from quietstar.methods.quietstar.learn_to_think import pretrain_config, run_stage
    from quietstar.methods.quietstar.report import recipe_device

    ex, marks = cfg.explicit, (cfg.thought.init_token, cfg.thought.end_init_token)
    if ex.task == "gsm8k":  # a pretrained model; <start> reads as a new line, <end> as the final-answer marker
        path, qs = _pretrained(cfg, ex.base or cfg.model.name or "smollm2-135m", recipe_device(cfg))
        marks = (GSM8K_START, GSM8K_MARK)
    else:
        path = find_checkpoint(ex.base) if ex.base else \
            run_stage(pretrain_config(cfg), train_fn, stages, "explicit", ("train/",))
        qs = load_thinker_checkpoint(path, device=recipe_device(cfg))
    qs.model.grad_checkpointing = False  # short SFT sequences: nothing to save
    qs.configure(dataclasses.replace(qs.cfg, init_token=marks[0], end_init_token=marks[1]))
    with torch.no_grad():  # <start> / <end> read as the chain's marks (never trained by a plain LM)
        reset_thought_embeddings(qs)
    return path, qs.eval()


def _pretrained(cfg, name: str, device):
    """(what was loaded, QuietStar) for task=gsm8k: a training checkpoint, or a pretrained model by name or HF dir."""
    from quietstar.checkpoint import find_checkpoint
    from quietstar.methods.quietstar.load import load_thinker_checkpoint
    from quietstar.loading import load_pretrained
    from quietstar.methods.quietstar.thinker import QuietStar

    where = Path(name).expanduser()
    if where.is_dir() and not (where / "config.json").is_file():  # an HF dir has a config.json
        path = find_checkpoint(where)  # a run, checkpoints/ or step dir
        return path, load_thinker_checkpoint(path, device=device)
    model, tok = load_pretrained(name, dtype=getattr(torch, cfg.model.dtype))
    return name, QuietStar(model, tok, cfg.thought).to(device)


def _save(cfg, qs, tok, out: Path, step: int):
    from omegaconf import OmegaConf

    from quietstar.checkpoint import save_checkpoint
    from quietstar.optim import build_optimizer

    opt, sched = build_optimizer(qs, cfg.optim, max(1, step))  # no optimizer state is kept: a round is not resumed
    yaml = OmegaConf.to_yaml(OmegaConf.structured(dataclasses.replace(cfg, recipe=None)))
    return save_checkpoint(out, step, qs, opt, sched, data_state={}, generator=None, tokenizer=tok, keep_last=1,
                           config_yaml=yaml, save_optimizer=False)


def _line(name: str, e: dict) -> str:
    by = " ".join(f"{k}:{v:.3f}" for k, v in e["acc_by_difficulty"].items())
    return f"{name:>14}: acc {e['acc']:.3f} ({by})  tokens/answer {e['tokens_per_answer']:.2f}"


def run(cfg, train_fn):
    """The recipe. -> a TrainResult-like summary; results.json and metrics.jsonl in the run dir."""
    from quietstar.errors import UserError
    from quietstar.logging import start_run
    from quietstar.methods.quietstar.learn_to_think import _Summary

    if cfg.explicit.task == "reasoning" and cfg.data.source != "reasoning":
        raise UserError(f"explicit: needs data=reasoning (its questions have checkable answers), got "
                        f"data.source={cfg.data.source!r}")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    ex, root = cfg.explicit, Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    stages: list = []
    base_path, base = _base(cfg, train_fn, stages)
    tok = base.tokenizer
    ctx = Context(cfg, tok)
    ctx.base = base
    train_q, val_q, eval_q = _questions(cfg)
    replay = _replay_documents(cfg, tok) if ex.replay_weight > 0 else []
    mode = EVAL_MODES[ex.method]
    run_log = start_run(cfg.logger, root, config=dataclasses.asdict(cfg))
    t0 = time.time()

    def assess(qs, name):
        e = {m: evaluate(ctx, qs, eval_q, m, f"{name}: eval {m}") for m in ("cot", "direct")}
        e["val"] = evaluate(ctx, qs, val_q, mode)["acc"]
        if ex.eval_samples:
            seed = derive_seed(cfg.train.seed, "explicit eval sampled")  # every round: the same stream
            e["sampled"] = evaluate_sampled(ctx, qs, eval_q, ex.eval_samples, seed, f"{name}: eval sampled")
            print(f"{name + ' sampled':>14}: acc {e['sampled']['acc']:.3f} (T={ex.temperature:g}, "
                  f"{ex.eval_samples} per question)", flush=True)
        for m in ("cot", "direct"):
            print(_line(f"{name} {m}", e[m]), flush=True)
        return e

    print(f"[explicit] {ex.method}: {len(train_q)} training questions, {len(val_q)} validation, {len(eval_q)} "
          f"held-out; base {base_path}", flush=True)
    rounds = [{"round": 0, "eval": assess(base, "base")}]
    track = Rounds(base, rounds[0]["eval"]["val"], ex.iterate_from)
    for r in range(1, ex.iterations + 1):
        skips, t_r = Skips(), time.time()
        dpo = ex.method in DPO_METHODS or (ex.method == "cai" and preference_round(ex, r))
        seeds = round_seeds(cfg.train.seed, r)
        latest = track.latest
        examples, stats = COLLECT[ex.method](ctx, latest, train_q, r, seeds["collect"], skips)
        data_path = write_jsonl(root / f"round_{r}" / ("pairs.jsonl" if dpo else "sft.jsonl"), examples)
        print(f"[explicit] round {r}: {len(examples)} {'pairs' if dpo else 'examples'} -> {data_path} ({stats}; "
              f"skipped: {skips})", flush=True)
        init = base if ex.train_from == "base" else latest
        model = copy.deepcopy(init)
        if dpo:  # the round's starting model is the frozen reference
            losses = fit_dpo(model, init, examples, ex.beta, ex.steps, ex.batch_size, cfg.optim, seeds["fit"],
                             ctx.end_target, tok.pad_id, _fit_progress(r, ex.steps, ex.loss),
                             loss=PreferenceLoss(ex.loss, ex.beta, ex.nll_weight, ex.simpo_gamma))
        else:
            losses = fit_sft(model, examples, ex.steps, ex.batch_size, cfg.optim, seeds["fit"], ctx.end_target,
                             tok.pad_id, _fit_progress(r, ex.steps), replay, ex.replay_weight)
        e = assess(model, f"round {r}")
        rec = {"round": r, "from_round": track.latest_round, "examples": len(examples), "stats": stats,
               "skips": skips.as_dict(), "skip_examples": skips.examples, "loss_first": losses[0] if losses else None,
               "loss_last": losses[-1] if losses else None, "wall_s": round(time.time() - t_r, 1), "eval": e,
               "dataset": str(data_path)}
        if ex.keep_checkpoints:
            rec["checkpoint"] = str(_save(cfg, model, tok, root / f"round_{r}" / "checkpoints", max(1, len(losses))))
        rounds.append(rec)
        run_log.log(_flat(rec), step=r)
        track.update(r, model, e["val"])
        if ex.patience and track.since_best >= ex.patience:
            print(f"[explicit] validation accuracy has not improved for {track.since_best} round(s): stop", flush=True)
            break
    best_round, best_model = track.best_round, track.best_model
    verifier = None
    if ex.method == "vstar":  # the best round's generator, the verifier trained on every round's pairs
        verifier = verify(ctx, base, best_model, eval_q, cfg.train.seed)
        print(_curve_line(verifier), flush=True)
        run_log.log({f"vstar/{name}@{k}": verifier[name][k - 1] for name in ("best_of_k", "majority_vote", "pass_at_k")
                     for k in (1, verifier["n"])}, step=len(rounds))
    run_log.finish()
    results = {"method": ex.method, "task": ex.task, "eval_mode": mode, "base": str(base_path),
               "best_round": best_round,
               "rounds": rounds, "stages": stages, "wall_s": round(time.time() - t0, 1),
               "questions": {"train": len(train_q), "val": len(val_q), "eval": len(eval_q),
                             "eval_split": "held-out (maps never seen in training)" if ex.task == "reasoning" else
                             f"the first {len(eval_q)} problems of {Path(ex.gsm8k_dir) / 'test.jsonl'}",
                             "decoding": "greedy"},
               "settings": dataclasses.asdict(ex), "optim": dataclasses.asdict(cfg.optim), "seed": cfg.train.seed}
    if verifier is not None:
        results["verifier"] = verifier
    write_record(root / "results.json", results, seeds=[cfg.train.seed])
    b, f = rounds[0]["eval"][mode], rounds[best_round]["eval"][mode]
    print(f"\n[explicit] {ex.method}: held-out {mode} accuracy {b['acc']:.3f} -> {f['acc']:.3f} (round {best_round}, "
          f"by validation), tokens/answer {b['tokens_per_answer']:.2f} -> {f['tokens_per_answer']:.2f}\n"
          f"  results: {root / 'results.json'}", flush=True)
    return _Summary(root, Path(rounds[best_round].get("checkpoint") or base_path))


def _flat(rec: dict) -> dict:
    """One metrics.jsonl record of a round: numbers only, namespaced."""
    out = {"explicit/examples": rec["examples"], "explicit/skipped": sum(rec["skips"].values()),
           "explicit/val_acc": rec["eval"]["val"]}
    out.update({f"explicit/{k}": v for k, v in rec["stats"].items()})
    for m in ("cot", "direct"):
        e = rec["eval"][m]
        out[f"eval_{m}/acc"], out[f"eval_{m}/tokens_per_answer"] = e["acc"], e["tokens_per_answer"]
        out.update({f"eval_{m}/acc_{k}": v for k, v in e["acc_by_difficulty"].items()})
    if "sampled" in rec["eval"]:
        out["eval_sampled/acc"] = rec["eval"]["sampled"]["acc"]
    if rec["loss_last"] is not None:
        out["train/loss"], out["train/loss_first"] = rec["loss_last"], rec["loss_first"]
    return out


def _fit_progress(r: int, steps: int, kind: str = "sft"):
    every = max(1, steps // 5)

    def show(step, loss):
        if step % every == 0 or step == steps:
            print(f"  round {r}: {kind} step {step}/{steps} loss {loss:.4f}", flush=True)
    return show


def _curve_line(v: dict) -> str:
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= v["n"]]
    rows = [f"{name:>14}: " + " ".join(f"k={k}:{v[name][k - 1]:.3f}" for k in ks)
            for name in ("best_of_k_ratio", "best_of_k_likelihood", "majority_vote", "pass_at_k")]
    return "[explicit] vstar held-out accuracy vs k\n" + "\n".join(rows)
