"""Scoring for the learn_to_think recipe (its figures: quietstar/plots.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from quietstar.methods.quietstar.load import load_thinker_checkpoint
from quietstar.methods.plain.model import reset_thought_embeddings
from quietstar.reasoning import chain_open_ids, score_answers, train_and_eval_documents
from quietstar.methods.quietstar.where import ThinkGate


EVAL_SEED_OFFSET = 7919  # the held-out evaluation's own thought-sampling stream: seed = train.seed + this


def recipe_device(cfg) -> str:
    if cfg.train.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.train.device


def evaluate(cfg, pretrain_ckpt, quietstar_ckpt, baseline_ckpt) -> dict:
    """Answer NLL / accuracy of the held-out split: the Quiet-STaR model with and without a thought, the
    baseline, and the pretrained starting point, by difficulty; decoded thoughts before and after."""
    data = cfg.data
    _, docs = train_and_eval_documents(data.reasoning, data.max_docs or data.synthetic_docs, cfg.train.seed)
    dev = recipe_device(cfg)
    r = cfg.learn_to_think
    seed = cfg.train.seed + EVAL_SEED_OFFSET

    def score(path, thoughts: bool, plain_start: bool = False):
        qs = load_thinker_checkpoint(path, device=dev)
        if plain_start:  # the pretrained model as the Quiet-STaR stage starts from it
            qs.configure(cfg.thought)
            reset_thought_embeddings(qs)
            if cfg.thought.where == "gate" and qs.gate is None:  # and with a fresh gate (thought.where=gate)
                qs.gate = ThinkGate(qs.model.cfg.dim).to(dev)
        return score_answers(qs, docs, qs.tokenizer, r.eval_batch_size, seed, thoughts, r.n_examples, dev,
                             without=chain_open_ids(data.reasoning, qs.tokenizer),
                             chains=data.reasoning if thoughts else None)

    before, after = score(pretrain_ckpt, True, plain_start=True), score(quietstar_ckpt, True)
    baseline = score(baseline_ckpt, False)
    pick = lambda metric: {"thought": after["thought"][metric], "no_thought": after["no_thought"][metric],
                           "baseline": baseline["no_thought"][metric], "pretrained": before["no_thought"][metric],
                           "pretrained_thought": before["thought"][metric]}
    out = {
        "answer_nll": pick("nll"),
        "answer_acc": pick("acc"),
        "answer_nll_raw": pick("nll_raw"),
        "scored": "direct answers of the held-out split; answer_nll / answer_acc: the answer given that no chain "
                  "follows (its probability renormalised without the chain's opening mark, which shares the "
                  "position); answer_nll_raw: the plain next-token NLL",
        "answer_count": after["thought"]["count"],
        "examples": {"before": before["examples"], "after": after["examples"]},
        "eval": {"docs": len(docs), "split": "held-out (maps never seen in training)",
                 "difficulty": "hops" if data.reasoning.families == ["lookup"] else "hops (lookup) / digits (state)",
                 "thoughts_per_position": 1, "seed": seed},
    }
    if before.get("thought_kinds"):
        out["thought_kinds"] = {"before": before["thought_kinds"], "after": after["thought_kinds"]}
        out["chain_share"] = {"before": chain_share(before), "after": chain_share(after),
                              "of": f"the sampled thoughts before the held-out {top_level(before)}-hop direct answers "
                                    f"that write the query's chain (reasoning.thought_kind)"}
        out["chain_like_share"] = {"before": chain_share(before, later=True), "after": chain_share(after, later=True),
                                   "of": "the same thoughts that hold the query's chain anywhere"}
    return out


def top_level(scores: dict) -> str:
    return max(scores["thought_kinds"], key=int)


def chain_share(scores: dict, later: bool = False) -> float:
    """Share of the thoughts before the hardest lookup answers that write the query's chain (`later`: also
    those that hold it after something else, the chain-like thoughts of a <start> that restates the query)."""
    counts = scores["thought_kinds"][top_level(scores)]
    return (counts["chain"] + later * counts.get("chain_later", 0)) / max(1, sum(counts.values()))


def evaluate_ablation(cfg, ckpt, results: dict) -> dict:
    """The learn_to_think keys of another Quiet-STaR stage's checkpoint (the policy_weight=0 run), scored like
    `evaluate`'s with the same held-out split and thought seed; its baseline is the recipe's."""
    data, r = cfg.data, cfg.learn_to_think
    _, docs = train_and_eval_documents(data.reasoning, data.max_docs or data.synthetic_docs, cfg.train.seed)
    dev = recipe_device(cfg)
    qs = load_thinker_checkpoint(ckpt, device=dev)
    after = score_answers(qs, docs, qs.tokenizer, r.eval_batch_size, cfg.train.seed + EVAL_SEED_OFFSET, True,
                          r.n_examples, dev, without=chain_open_ids(data.reasoning, qs.tokenizer),
                          chains=data.reasoning)
    pick = lambda metric: {"thought": after["thought"][metric], "no_thought": after["no_thought"][metric],
                           "baseline": results[{"nll": "answer_nll", "acc": "answer_acc",
                                                "nll_raw": "answer_nll_raw"}[metric]]["baseline"]}
    out = {"answer_nll": pick("nll"), "answer_acc": pick("acc"), "answer_nll_raw": pick("nll_raw"),
           "examples": after["examples"]}
    if after.get("thought_kinds"):
        out["thought_kinds"] = after["thought_kinds"]
        out["chain_share"] = {"after": chain_share(after)}
        out["chain_like_share"] = {"after": chain_share(after, later=True)}
    return out


def over_training(cfg, stage_dir: Path) -> list:
    """At every checkpoint a Quiet-STaR stage saved (checkpoint.every): the held-out chain share and the hardest
    level's answer NLL and accuracy with and without a thought, scored like `evaluate`'s."""
    from quietstar.checkpoint import complete_checkpoints, step_of

    data, r = cfg.data, cfg.learn_to_think
    _, docs = train_and_eval_documents(data.reasoning, data.max_docs or data.synthetic_docs, cfg.train.seed)
    dev = recipe_device(cfg)
    out = []
    for ckpt in complete_checkpoints(stage_dir):
        qs = load_thinker_checkpoint(ckpt, device=dev)
        s = score_answers(qs, docs, qs.tokenizer, r.eval_batch_size, cfg.train.seed + EVAL_SEED_OFFSET, True, 0, dev,
                          without=chain_open_ids(data.reasoning, qs.tokenizer), chains=data.reasoning)
        top = max((k for k in s["thought"]["nll"] if k != "all"), key=int)
        point = {"step": step_of(ckpt), "hops": top, "nll_thought": s["thought"]["nll"][top],
                 "nll_no_thought": s["no_thought"]["nll"][top], "acc_thought": s["thought"]["acc"][top],
                 "acc_no_thought": s["no_thought"]["acc"][top]}
        if s.get("thought_kinds"):
            point["chain_share"], point["chain_like_share"] = chain_share(s), chain_share(s, later=True)
        out.append(point)
    return out


def summarise_seeds_main(recipe: str, summarise) -> None:
    """`python -m quietstar.methods.<recipe> RUN_DIR [RUN_DIR ...] [--out FILE]`: summarise(results.json paths)
    over several seeds' runs, printed, and written as JSON with its provenance (the runs' train.seed values)
    and each run's own commit where its results.json records one."""
    import argparse
    import json

    from quietstar.provenance import write_record

    ap = argparse.ArgumentParser(description=f"median over seeds of several {recipe} runs' results.json")
    ap.add_argument("runs", nargs="+", help="run dirs (or their results.json)")
    ap.add_argument("--out", help="write the summary here as JSON")
    ap.add_argument("--runs-command", help="the command that trained the runs, recorded beside this one")
    args = ap.parse_args()
    files = [Path(r) / "results.json" if Path(r).is_dir() else Path(r) for r in args.runs]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise SystemExit(f"error: no results.json: {', '.join(missing)}")
    summary = summarise(files)
    runs = [json.loads(f.read_text()) for f in files]
    summary["run_commits"] = [r.get("provenance", {}).get("commit") for r in runs]
    seeds = [r["eval"]["seed"] - EVAL_SEED_OFFSET for r in runs]  # both recipes score at train.seed + the offset
    print(json.dumps(summary, indent=1))
    if args.runs_command:
        summary = {"runs_command": args.runs_command, **summary}
    if args.out:
        write_record(args.out, summary, seeds=seeds)
