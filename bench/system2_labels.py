"""Is it the labels? System-2 distillation's round with its wrong labels taken out.

    python bench/system2_labels.py [train.py overrides ...]     # e.g. explicit=system2 model.n_layers=3 ...

A diagnosis, not a method: it reads the gold answers, which System-2 distillation may not. The round keeps
the same self-consistent questions as `explicit=system2` and drops those whose majority answer is wrong (the
record's `kept_label_correct` counts them), so every direct answer it trains on is right. If this round
still lowers the direct accuracy, the noise in the self-consistency labels is not what lowers it.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quietstar.methods.explicit import loop  # noqa: E402
from quietstar.methods.explicit.collect import collect_system2  # noqa: E402


def right_labels_only(ctx, qs, questions, r, seed, skips):
    examples, stats = collect_system2(ctx, qs, questions, r, seed, skips)
    kept = [e for e in examples if e.meta["scores"]["answer"] == 1.0]
    return kept, {**stats, "dropped_wrong_label": len(examples) - len(kept)}


def main():
    loop.COLLECT["system2"] = right_labels_only
    from quietstar.train import main as train_main

    train_main()


if __name__ == "__main__":
    main()
