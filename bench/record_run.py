"""A finished training run's settings and last-step metrics as a bench/results record.

    python train.py logger=none hydra.run.dir=/tmp/default_run
    python bench/record_run.py /tmp/default_run --out bench/results/default_run_cpu.json \
        --command "python train.py logger=none hydra.run.dir=/tmp/default_run"

The record's command is the training command (--command); its seed is the run's train.seed. `final` is the
last metrics.jsonl record: `train/nll` is the objective's NLL (base_loss_weight x the base NLL + the rest x
the mean talk NLL), `train/nll_base` the prediction without a thought, `train/nll_talk` the predictions after
one, all on that step's batch. `steps_wall_s` sums the steps' own times (model loading excluded).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def summarize_run(run: Path) -> dict:
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run / "config.yaml")
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if not steps:
        raise SystemExit(f"error: {run / 'metrics.jsonl'} holds no step")
    last = steps[-1]
    if last["step"] != cfg.train.max_steps:
        raise SystemExit(f"error: {run} stopped at step {last['step']} of {cfg.train.max_steps}")
    return {
        "settings": {"model": cfg.model.name, "data": cfg.data.source, "steps": cfg.train.max_steps,
                     "seq_len": cfg.data.seq_len, "batch_size": cfg.data.batch_size, "n_ahead": cfg.thought.n_ahead,
                     "n_ahead_talk": cfg.thought.n_ahead_talk, "n_thoughts": cfg.thought.n_thoughts,
                     "seed": cfg.train.seed},
        "final": {k: v for k, v in last.items() if not k.startswith("perf/")},
        "steps_wall_s": sum(s.get("perf/step_time_s", 0.0) for s in steps),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", required=True)
    ap.add_argument("--command", required=True, help="the training command line")
    ap.add_argument("--what", default="")
    ap.add_argument("--note", default="")
    a = ap.parse_args(argv)
    from quietstar.provenance import write_record

    record = {"what": a.what, **summarize_run(a.run), "note": a.note,
              "recorded_by": f"python bench/record_run.py {a.run} --out {a.out}"}
    path = write_record(a.out, record, seeds=[record["settings"]["seed"]], command=a.command)
    print(f"wrote {path}: {json.dumps({k: record['final'][k] for k in record['final'] if k.startswith('train/')})}")


if __name__ == "__main__":
    main()
