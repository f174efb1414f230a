"""Diagnosis of policy_decoy runs on a validation split (never the held-out one): the unseen documents of the
training split, past the ones the runs trained on.

    python bench/policy_diagnosis.py --runs RUN0 RUN1 RUN2 --checkpoints CKPT ... --out FILE

For each run's pretrained checkpoint: the mean gain, in nats, of the answer's log-probability after a
teacher-forced thought over the base prediction before 3-hop direct answers, for the query's chain and for
its decoy (what the RLP reward can rank). For each extra checkpoint (e.g. a longer Quiet-STaR run): its chain
share by hops and its answer accuracy with and without a thought.

    python bench/policy_diagnosis.py --discovery RUN --lengths 7 12 16 --out FILE

For a policy_decoy run's starting point: the reward and the group-relative advantage RLP pays each kind of
sampled thought (the chain, the decoy, a wrong chain, other) before direct answers, by hops:

    python bench/policy_diagnosis.py --rewards RUN[@SEED] [RUN ...] [--floor 0] --out FILE

For a thought.where=gate checkpoint: how many of its thinking slots are direct answers, and how many of the
direct answers, by hops, it picks:

    python bench/policy_diagnosis.py --gate CKPT [CKPT ...] --out FILE

For a policy_discovery run (<start>/<end> at a space): the pretrained model's thoughts before 3-hop answers,
4 per position, at each thought length n_ahead, and how many of them contain the query's chain anywhere (a
thought from a space must restate the query, `a3=-`, before it can write the chain) or restate the query.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quietstar.checkpoint import find_checkpoint, read_train_config
from quietstar.methods.registry import TrainConfig  # noqa: E402
from quietstar.methods.quietstar.load import load_thinker_checkpoint  # noqa: E402
from quietstar.methods.plain.model import reset_thought_embeddings  # noqa: E402
from quietstar.provenance import write_record  # noqa: E402
from quietstar.reasoning import (batches, chain_open_ids, lookup_chain, make_documents, query_symbol,  # noqa: E402
                                 score_answers, thought_kind)

VALIDATION_DOCS = 256


def validation_docs(cfg):
    n = cfg.data.max_docs or cfg.data.synthetic_docs
    return make_documents(cfg.data.reasoning, n + VALIDATION_DOCS, cfg.train.seed, "train")[n:]


def stage_start(run: Path):
    """(the Quiet-STaR stage's model as it starts: its settings with the pretrained weights and the thought
    embeddings reset, in eval mode; the stage's TrainConfig)."""
    ckpt = find_checkpoint(run / "quietstar")
    cfg = read_train_config(ckpt, TrainConfig)
    qs = load_thinker_checkpoint(ckpt)
    start = load_thinker_checkpoint(find_checkpoint(run / "pretrain"))
    qs.load_state_dict({**qs.state_dict(), **{f"model.{k}": v for k, v in start.model.state_dict().items()}})
    reset_thought_embeddings(qs)  # as the stage starts from the pretrained model
    return qs.eval(), cfg


@torch.no_grad()
def thought_gains(run: Path, hops: int = 3) -> dict:
    """Mean gain of the answer's log-probability after the chain / the decoy over no thought."""
    qs, cfg = stage_start(run)
    tok, T = qs.tokenizer, qs.cfg.n_ahead
    gains: dict = {"chain": [], "decoy": []}
    for ids, mask, diff, chunk in batches(validation_docs(cfg), tok, 32):
        B, L = ids.shape
        at = (diff == hops).nonzero().tolist()
        for which, name in ((0, "chain"), (1, "decoy")):
            thoughts = torch.zeros(B, 1, L, T - 3, dtype=torch.long)
            for b, p in at:
                query = query_symbol(tok, ids[b], p)
                thoughts[b, 0, p - 1] = torch.tensor(tok.encode(lookup_chain(chunk[b], query, hops, cfg.data.reasoning)[which],
                                                                add_bos=False))
            logits = qs.grid_logits(ids, thoughts, mask)  # (B, 1, S, L, V); step T - 1 (<end>) predicts x_{i+1}
            after, base = torch.log_softmax(logits[:, 0, T - 1].float(), -1), torch.log_softmax(logits[:, 0, 0].float(), -1)
            gains[name] += [float(after[b, p - 1, ids[b, p]] - base[b, p - 1, ids[b, p]]) for b, p in at]
    return {"seed": cfg.train.seed, "answers": len(gains["chain"]),
            **{f"{k}_gain_nats": sum(v) / len(v) for k, v in gains.items()},
            **{f"{k}_gain_positive_share": sum(x > 0 for x in v) / len(v) for k, v in gains.items()}}


@torch.no_grad()
def rewards_by_kind(run: Path, seed: Optional[int] = None, n_thoughts: int = 4, floor: Optional[float] = 0.0) -> dict:
    """What the RLP reward pays each kind of sampled thought before direct answers, at the start of the Quiet-STaR
    stage (the pretrained model, thought embeddings reset): n_thoughts per answer position, as in training (at
    every answer, whatever the stage's thought.where); reward = log p(answer | thought row, read where the
    thought ends) - log p(answer | no thought), raised to `floor`; the group-relative advantage G/(G-1) (r - mean
    of the group). Kinds: the query's chain, its decoy, the chain after something else (chain_later), a wrong
    chain (begins with the queried symbol, none of those), other. `seed` scores another seed's pretrained model
    with the run's settings (`run` holds pretrain/ and quietstar/ of one seed; pretrain/ may be the other
    seed's)."""
    import dataclasses

    qs, cfg = stage_start(run)
    if seed is not None:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed))
    tok, G = qs.tokenizer, n_thoughts
    g = torch.Generator().manual_seed(cfg.train.seed + 7919)
    rows: dict = {}
    for ids, mask, diff, chunk in batches(validation_docs(cfg), tok, 32):
        with qs.overridden(where="all"):  # a thought before every answer, whatever the stage's thought.where
            out = qs.next_token_logits(ids, mask, generator=g, n_thoughts=G)
            logits = qs.grid_logits(ids, out.thoughts, mask)  # (B, G, S, L, V)
        read, _ = qs.read_steps(out.thoughts)  # (B, G, L): <end>, or a thought's close (thought.close_token)
        after = logits.gather(2, read[:, :, None, :, None].expand(-1, -1, 1, -1, logits.shape[-1])).squeeze(2)
        after = torch.log_softmax(after.float(), -1)  # the thought row's own prediction
        base = torch.log_softmax(logits[:, 0, 0].float(), -1)
        for b, p in (diff > 0).nonzero().tolist():
            hops = int(diff[b, p])
            query = query_symbol(tok, ids[b], p)
            chain, decoy = lookup_chain(chunk[b], query, hops, cfg.data.reasoning)
            r = after[b, :, p - 1, ids[b, p]] - base[b, p - 1, ids[b, p]]  # (G,)
            if floor is not None:
                r = r.clamp_min(floor)
            adv = (r - r.mean()) * G / (G - 1)
            for j in range(G):
                t = qs.decode_thought(out.thoughts, b, j, p - 1)
                kind = thought_kind(t, chain, decoy)
                if kind == "other" and chain in t:  # e.g. `a3=-afcd.` from a <start> that restates the query
                    kind = "chain_later"
                elif kind == "other" and t[:1] == query:
                    kind = "wrong_chain"
                k = rows.setdefault(str(hops), {}).setdefault(kind, {"n": 0, "reward": 0.0, "advantage": 0.0})
                k["n"] += 1
                k["reward"] += float(r[j])
                k["advantage"] += float(adv[j])
    for by_kind in rows.values():
        total = sum(k["n"] for k in by_kind.values())
        for k in by_kind.values():
            k["share"] = k["n"] / total
            k["reward"] /= k["n"]
            k["advantage"] /= k["n"]
    return {"seed": cfg.train.seed, "n_thoughts": G, "floor": floor, "by_hops": rows}


@torch.no_grad()
def gate_picks(path: str) -> dict:
    """Where a thought.where=gate checkpoint thinks on the validation split: the share of its thinking slots that
    are direct answers (the token after `=` when no chain opens there), and the share of the direct answers, by
    hops, that it picks (as the evaluation does: the top think_fraction of each sequence's gate scores, a
    gate_explore share of the slots drawn at random)."""
    ckpt = find_checkpoint(path)
    cfg = read_train_config(ckpt, TrainConfig)
    qs = load_thinker_checkpoint(ckpt).eval()
    if qs.cfg.where != "gate":
        raise SystemExit(f"error: {ckpt}: thought.where={qs.cfg.where!r}, not gate")
    eq, open_ = qs.tokenizer.encode("=-", add_bos=False)
    g = torch.Generator().manual_seed(cfg.train.seed + 7919)
    slots = answers_in_slots = 0
    picked: dict = {}
    for ids, mask, diff, _ in batches(validation_docs(cfg), qs.tokenizer, 32):
        lengths = mask.sum(-1)
        sel = qs.thinking_positions(qs.text_pass(ids, lengths).hidden, lengths, None, g)
        thinks = torch.zeros_like(ids, dtype=torch.bool).scatter_(1, sel.positions, sel.valid)
        nxt = torch.cat([ids[:, 1:], ids.new_full((ids.shape[0], 1), open_)], 1)
        direct = (ids == eq) & (nxt != open_) & (nxt != 0)  # position p - 1 of a direct answer at p
        slots += int(thinks.sum())
        answers_in_slots += int((thinks & direct).sum())
        for b, p in (diff > 0).nonzero().tolist():
            k = picked.setdefault(str(int(diff[b, p])), [0, 0])
            k[0], k[1] = k[0] + int(thinks[b, p - 1]), k[1] + 1
    return {"checkpoint": str(ckpt), "seed": cfg.train.seed, "think_fraction": qs.cfg.think_fraction,
            "gate_explore": qs.cfg.gate_explore, "slots_that_are_direct_answers": answers_in_slots / max(1, slots),
            "direct_answers_picked": {h: a / max(1, n) for h, (a, n) in sorted(picked.items())}}


def checkpoint_scores(path: str) -> dict:
    ckpt = find_checkpoint(path)
    cfg = read_train_config(ckpt, TrainConfig)
    qs = load_thinker_checkpoint(ckpt)
    r = score_answers(qs, validation_docs(cfg), qs.tokenizer, 32, cfg.train.seed + 7919, True, 0, "cpu",
                      without=chain_open_ids(cfg.data.reasoning, qs.tokenizer), chains=cfg.data.reasoning)
    share = {h: c["chain"] / max(1, sum(c.values())) for h, c in r["thought_kinds"].items()}
    like = {h: (c["chain"] + c["chain_later"]) / max(1, sum(c.values())) for h, c in r["thought_kinds"].items()}
    return {"checkpoint": str(ckpt), "seed": cfg.train.seed, "step": int(ckpt.name.rsplit("_", 1)[-1]),
            "run_steps": cfg.train.max_steps, "chain_share": share, "chain_like_share": like,
            "answer_acc": {"thought": r["thought"]["acc"], "no_thought": r["no_thought"]["acc"]}}


@torch.no_grad()
def discovery_lengths(run: Path, lengths: list, hops: int = 3, n_thoughts: int = 4) -> list:
    """Per thought length: the share of sampled thoughts before `hops`-hop answers containing the chain."""
    import dataclasses

    cfg = read_train_config(find_checkpoint(run / "quietstar"), TrainConfig)
    rows = []
    for T in lengths:
        qs = load_thinker_checkpoint(find_checkpoint(run / "pretrain"))
        qs.configure(dataclasses.replace(cfg.thought, n_ahead=T))
        reset_thought_embeddings(qs)  # as the stage starts from the pretrained model
        qs.eval()
        tok, g = qs.tokenizer, torch.Generator().manual_seed(cfg.train.seed + 7919)
        total = chain = restated = 0
        examples = []
        for ids, mask, diff, chunk in batches(validation_docs(cfg), tok, 32):
            out = qs.next_token_logits(ids, mask, generator=g, n_thoughts=n_thoughts).full()
            for b, p in (diff == hops).nonzero().tolist():
                query = query_symbol(tok, ids[b], p)
                want = lookup_chain(chunk[b], query, hops, cfg.data.reasoning)[0]
                for j in range(n_thoughts):
                    t = qs.decode_thought(out.thoughts, b, j, p - 1)
                    total, chain, restated = total + 1, chain + (want in t), restated + (f"{query}{hops}=" in t)
                    if want in t and len(examples) < 3:
                        examples.append(t)
        rows.append({"n_ahead": T, "sampled_tokens": T - 3, "thoughts": total, "contain_chain": chain / total,
                     "restate_query": restated / total, "examples": examples})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="*", default=[], help="policy_decoy run dirs (pretrain/ and quietstar/ inside)")
    ap.add_argument("--checkpoints", nargs="*", default=[], help="checkpoints (or run dirs) to score")
    ap.add_argument("--discovery", help="a policy_discovery run dir: thoughts by length (--lengths)")
    ap.add_argument("--lengths", nargs="*", type=int, default=[7, 12, 16])
    ap.add_argument("--rewards", nargs="*", default=[], help="policy_decoy run dirs: the reward and advantage of each "
                    "kind of sampled thought before direct answers, at the start of the Quiet-STaR stage (RUN@SEED: "
                    "that seed's validation documents, RUN's quietstar/ settings and pretrain/ model)")
    ap.add_argument("--gate", nargs="*", default=[], help="thought.where=gate checkpoints (or run dirs): where they "
                    "think (the share of their slots that are direct answers, and of the direct answers they pick)")
    ap.add_argument("--floor", type=float, default=0.0, help="--rewards: the reward floor (the recipe's 0)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    split = f"validation: the {VALIDATION_DOCS} documents of the training split after the ones the runs trained on"

    def record(rows: list, key: str, seeds=None, **extra) -> None:
        for row in rows:
            print(row, flush=True)
        write_record(a.out, {"split": split, **extra, key: rows},
                     seeds=seeds if seeds is not None else sorted({r["seed"] for r in rows}))

    if a.rewards:
        runs = [r.partition("@") for r in a.rewards]  # RUN or RUN@SEED
        return record([rewards_by_kind(Path(r), seed=int(sd) if sd else None, floor=a.floor) for r, _, sd in runs],
                      "rewards_by_kind")
    if a.discovery:
        seed = read_train_config(find_checkpoint(Path(a.discovery) / "quietstar"), TrainConfig).train.seed
        return record(discovery_lengths(Path(a.discovery), a.lengths), "by_length", [seed],
                      model="the run's pretrained checkpoint, <start>/<end> at the run's init tokens")
    if a.gate:
        return record([gate_picks(c) for c in a.gate], "gate_picks")
    gains = [thought_gains(Path(r)) for r in a.runs]
    scores = [checkpoint_scores(c) for c in a.checkpoints]
    for row in gains:
        print(row, flush=True)
    record(scores, "checkpoints", sorted({r["seed"] for r in gains + scores}), thought_gains=gains)


if __name__ == "__main__":
    main()
