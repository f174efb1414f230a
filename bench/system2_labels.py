"""Is it the labels? System-2 distillation's round with its wrong labels taken out.

    python bench/system2_labels.py [hops=H] [train.py overrides ...]     # e.g. explicit=system2 model.n_layers=3 ...

A diagnosis, not a method: it reads the gold answers, which System-2 distillation may not. The round keeps
the same self-consistent questions as `explicit=system2` and drops those whose majority answer is wrong (the
record's `kept_label_correct` counts them), so every direct answer it trains on is right. If this round
still lowers the direct accuracy, the noise in the self-consistency labels is not what lowers it. With
`hops=H`, only the questions of at most H hops are trained on (those a direct answer can compute, where the
hop count is what the query says: `a2=` asks for 2 hops).

    python bench/system2_labels.py fit RUN [--out FILE]

How well a System-2 run's round 1 fits its own training data: the greedy direct answer (the chain's opening
mark banned, as the evaluation does) to each prompt of RUN/round_1/sft.jsonl, right when it is the trained
answer, for the run's base and for its round-1 model. A round that gains there while held-out accuracy falls
has memorised its prompts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quietstar.methods.explicit import loop  # noqa: E402
from quietstar.methods.explicit.collect import collect_system2  # noqa: E402


def right_labels_only(max_hops=None):
    def collect(ctx, qs, questions, r, seed, skips):
        if max_hops is not None:
            questions = [q for q in questions if q.difficulty <= max_hops]
        examples, stats = collect_system2(ctx, qs, questions, r, seed, skips)
        kept = [e for e in examples if e.meta["scores"]["answer"] == 1.0]
        return kept, {**stats, "dropped_wrong_label": len(examples) - len(kept)}
    return collect


def fit(run: Path) -> dict:
    import torch

    from quietstar.checkpoint import find_checkpoint
    from quietstar.methods.quietstar.load import load_thinker_checkpoint

    rows = [json.loads(line) for line in open(run / "round_1" / "sft.jsonl")]
    base = json.loads((run / "results.json").read_text())["base"]
    out = {"run": str(run), "prompts": len(rows)}
    for name, path in (("base", base), ("round_1", run / "round_1" / "checkpoints")):
        qs = load_thinker_checkpoint(find_checkpoint(path)).eval()
        banned = qs.tokenizer.encode("-", add_bos=False)[0]
        right = 0
        with torch.no_grad():
            for x in rows:
                h = qs.model(inputs_embeds=qs.embed(torch.tensor([x["prompt_ids"]])), return_hidden=True)[0, -1]
                logits = qs.model.head(h)
                logits[banned] = float("-inf")
                right += int(logits.argmax()) == x["completion_ids"][0]
        out[f"{name}_greedy_acc"] = right / len(rows)
    return out


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "fit":
        from quietstar.provenance import write_record

        res = fit(Path(sys.argv[2]))
        print(json.dumps(res))
        if "--out" in sys.argv:
            write_record(sys.argv[sys.argv.index("--out") + 1], res, seeds=[])
        return
    max_hops = None
    if len(sys.argv) > 1 and sys.argv[1].startswith("hops="):
        max_hops = int(sys.argv.pop(1).split("=", 1)[1])
    loop.COLLECT["system2"] = right_labels_only(max_hops)
    from quietstar.train import main as train_main

    train_main()


if __name__ == "__main__":
    main()
