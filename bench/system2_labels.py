"""Is it the labels? System-2 distillation's round with its wrong labels taken out.

    python bench/system2_labels.py [hops=H] [train.py overrides ...]     # e.g. explicit=system2 model.n_layers=3 ...

A diagnosis, not a method: it reads the gold answers, which System-2 distillation may not. The round keeps
the same self-consistent questions as `explicit=system2` and drops those whose majority answer is wrong (the
record's `kept_label_correct` counts them), so every direct answer it trains on is right. If this round
still lowers the direct accuracy, the noise in the self-consistency labels is not what lowers it. With
`hops=H`, only the questions of at most H hops are trained on (those a direct answer can compute, where the
hop count is what the query says: `a2=` asks for 2 hops).
"""

from __future__ import annotations

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


def main():
    max_hops = None
    if len(sys.argv) > 1 and sys.argv[1].startswith("hops="):
        max_hops = int(sys.argv.pop(1).split("=", 1)[1])
    loop.COLLECT["system2"] = right_labels_only(max_hops)
    from quietstar.train import main as train_main

    train_main()


if __name__ == "__main__":
    main()
