"""How much of the thought's gain survives thinking at a quarter of the positions (thought.where), on the
reasoning corpus's held-out split.

Each run dir is a finished `python train.py experiment=learn_to_think [thought.where=W
thought.think_fraction=0.25] train.seed=S` (its results.json holds the answer scores). For each, this reads
the answer NLL gain (no thought - thought, the answer renormalised without the chain mark, as the recipe
scores it) and, over every held-out token, re-scores the Quiet-STaR checkpoint: the prediction used at each
position (after a thought where the selector fires, the base one elsewhere), the base next-token entropy,
and whether it thought. -> bench/results/where_quality_cpu.json and a PNG of the gain by base-entropy bucket.

    python bench/where_quality.py all=/tmp/ltt_s0,/tmp/ltt_s1 entropy=/tmp/wq_entropy_s0,... gate=...
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from quietstar.provenance import write_record  # noqa: E402

N_BUCKETS = 5


@torch.no_grad()
def per_token(run_dir: Path) -> dict:
    """Per-token gain, base entropy and thinking share on the held-out split, for one run's Quiet-STaR stage."""
    from quietstar.checkpoint import read_train_config
    from quietstar.methods.registry import TrainConfig
    from quietstar.methods.quietstar.load import load_thinker_checkpoint
    from quietstar.reasoning import batches, train_and_eval_documents
    from quietstar.methods.quietstar.report import EVAL_SEED_OFFSET
    from quietstar.methods.quietstar.where import row_entropy

    ckpt = run_dir / "quietstar"
    cfg = read_train_config(next((ckpt / "checkpoints").iterdir()), TrainConfig)
    _, docs = train_and_eval_documents(cfg.data.reasoning, cfg.data.max_docs or cfg.data.synthetic_docs, cfg.train.seed)
    qs = load_thinker_checkpoint(ckpt).eval()
    g = torch.Generator().manual_seed(cfg.train.seed + EVAL_SEED_OFFSET)
    gains, ents, thinks, answer = [], [], [], []
    for ids, mask, diff, _ in batches(docs, qs.tokenizer, 32, qs.tokenizer.pad_id or 0):
        out = qs.next_token_logits(ids, mask, generator=g, n_thoughts=1)
        thinking, out = out.thinking(), out.full()
        tgt, ok = ids[:, 1:], mask[:, 1:].bool()
        ce = lambda z: -torch.log_softmax(z[:, :-1].float(), -1).gather(-1, tgt[..., None]).squeeze(-1)
        gains.append((ce(out.base) - ce(out.mixed[:, 0]))[ok])
        ents.append(row_entropy(out.base[:, :-1])[ok])
        thinks.append(thinking[:, :-1][ok])
        answer.append((diff[:, 1:] > 0)[ok])
    gain, ent, think, ans = (torch.cat(t) for t in (gains, ents, thinks, answer))
    edges = torch.quantile(ent, torch.linspace(0, 1, N_BUCKETS + 1))
    bucket = torch.bucketize(ent, edges[1:-1])
    return {"where": cfg.thought.where, "think_fraction": cfg.thought.think_fraction if cfg.thought.where != "all" else 1.0,
            "seed": cfg.train.seed, "tokens": int(gain.numel()),
            "token_gain": float(gain.mean()), "think_share": float(think.float().mean()),
            "answer_think_share": float(think[ans].float().mean()),
            "gain_by_entropy_bucket": [float(gain[bucket == k].mean()) for k in range(N_BUCKETS)],
            "think_share_by_entropy_bucket": [float(think[bucket == k].float().mean()) for k in range(N_BUCKETS)]}


def one_run(run_dir: Path) -> dict:
    res = json.loads((run_dir / "results.json").read_text())
    nll = res["answer_nll"]
    row = per_token(run_dir)
    row.update(run=str(run_dir), answer_nll_thought=nll["thought"], answer_nll_no_thought=nll["no_thought"],
               answer_nll_baseline=nll["baseline"], answer_acc_thought=res["answer_acc"]["thought"],
               quietstar_wall_s=next((s["wall_s"] for s in res["stages"] if s["stage"] == "quietstar"), None),
               quietstar_flops=res["compute"]["quietstar_flops"])
    row["answer_gain"] = {k: nll["no_thought"][k] - nll["thought"][k] for k in nll["thought"]}
    return row


def main(argv):
    groups = dict(a.split("=", 1) for a in argv)
    rows = {w: [one_run(Path(d)) for d in dirs.split(",")] for w, dirs in groups.items()}
    med = lambda xs: statistics.median(xs)
    summary = {}
    for w, rs in rows.items():
        summary[w] = {
            "seeds": [r["seed"] for r in rs],
            "answer_gain_all_hops": med([r["answer_gain"]["all"] for r in rs]),
            "answer_gain_3_hops": med([r["answer_gain"]["3"] for r in rs]),
            "answer_nll_thought_3_hops": med([r["answer_nll_thought"]["3"] for r in rs]),
            "answer_nll_no_thought_3_hops": med([r["answer_nll_no_thought"]["3"] for r in rs]),
            "token_gain": med([r["token_gain"] for r in rs]),
            "think_share": med([r["think_share"] for r in rs]),
            "answer_think_share": med([r["answer_think_share"] for r in rs]),
            "quietstar_flops": med([r["quietstar_flops"] for r in rs]),
            "gain_by_entropy_bucket": [med([r["gain_by_entropy_bucket"][k] for r in rs]) for k in range(N_BUCKETS)],
            "think_share_by_entropy_bucket": [med([r["think_share_by_entropy_bucket"][k] for r in rs])
                                              for k in range(N_BUCKETS)],
        }
    if "all" in summary:
        for w, s in summary.items():
            s["kept_of_all_answer_gain"] = s["answer_gain_all_hops"] / summary["all"]["answer_gain_all_hops"]
            s["kept_of_all_answer_gain_3_hops"] = s["answer_gain_3_hops"] / summary["all"]["answer_gain_3_hops"]
            s["flops_of_all"] = s["quietstar_flops"] / summary["all"]["quietstar_flops"]
            by_seed = {r["seed"]: r["answer_gain"]["all"] for r in rows["all"]}
            s["kept_per_seed"] = {r["seed"]: r["answer_gain"]["all"] / by_seed[r["seed"]] for r in rows[w]
                                  if r["seed"] in by_seed}
    out = ROOT / "bench" / "results" / "where_quality_cpu.json"
    seeds = {r["seed"] for rs in rows.values() for r in rs}
    write_record(out, dict(summary=summary, runs=rows), seeds=seeds,
                 command=["python", "bench/where_quality.py", *argv])
    plot(summary, out.with_suffix(".png"))
    for w, s in summary.items():
        print(f"{w:8s} answer gain {s['answer_gain_all_hops']:.3f} (3 hops {s['answer_gain_3_hops']:.3f}); "
              f"kept {s.get('kept_of_all_answer_gain', float('nan')):.2f} of all's; thinks at {s['think_share']:.2f} of "
              f"tokens, {s['answer_think_share']:.2f} of answers; FLOPs {s.get('flops_of_all', float('nan')):.2f} of all's")
    print(f"wrote {out}")


def plot(summary: dict, path: Path) -> None:
    from quietstar.plots import pyplot, save_figure

    fig, (ax, ax2) = pyplot().subplots(1, 2, figsize=(10, 3.6))
    x = range(1, N_BUCKETS + 1)
    for w, s in summary.items():
        ax.plot(x, s["gain_by_entropy_bucket"], marker="o", label=w)
        ax2.plot(x, s["think_share_by_entropy_bucket"], marker="o", label=w)
    ax.axhline(0, color="grey", lw=0.5)
    for a in (ax, ax2):
        a.set_xticks(list(x))
        a.set_xlabel("base next-token entropy quintile (1 = most certain)")
    ax.set_ylabel("NLL gain per token (nats)")
    ax.set_title("Where the thought's gain sits (held-out)")
    ax2.set_ylabel("share of tokens that think")
    ax2.set_title("Where each selector thinks")
    ax.legend()
    save_figure(fig, path, dpi=120)


if __name__ == "__main__":
    main(sys.argv[1:])
