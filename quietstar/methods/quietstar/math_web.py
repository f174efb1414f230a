"""Do thoughts learned by their effect help on real text? One command: `python train.py experiment=policy_math_web`.

Four training stages from the same starting model (the run's `model`, or `init_from`), on the run's text
(`data.path`, records `0 .. data.max_docs - 1`), each an ordinary run in a subfolder of the run dir:

  official/    Quiet-STaR with the official objective: the reward is the talk-head-mixed prediction's gain,
               the baseline the mean of the other thoughts, negative advantages clamped, the policy term
               weighted by policy_math_web.official_policy_weight (the official code's 1e6)
  rlp/         the run's own `thought` settings (the preset: thought.objective=rlp)
  policy_off/  rlp/ with thought.policy_weight=0: what the policy term itself did
  baseline/    continued pretraining as a plain LM with rlp/'s model FLOPs (quietstar/flops.py)

Every stage saves a checkpoint every `checkpoint.every` steps. After a stage trains, the same launch scores it
on held-out records of the same file (`policy_math_web.eval_start` on, never trained on):

  nll      NLL per token with and without a thought (quietstar.eval nll) by base-entropy quintile, on
           `eval_docs` records, at the last step
  curve    the same on the first `curve_docs` records at every saved step (step 0: the starting model): does
           the gain grow with training?
  gsm8k    the paper's soft accuracy (quietstar.eval gsm8k / csqa) on the first `qa_limit` items, with and
  csqa     without a thought (qa_limit=0: not scored)

and the starting model (stage `before`) the same way. Each score is a quietstar.eval JSON under `eval/`, reused
when present, so a launch per stage (`policy_math_web.stages=[rlp]`) can share one run dir with the others;
the launch that finds every stage scored writes `results.json` and `curves.png`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from quietstar.errors import UserError
from quietstar.provenance import write_record

STAGES = ("official", "rlp", "policy_off", "baseline")
SCORED = ("before", *STAGES)  # `before`: the starting model, scored and not trained


@dataclass
class PolicyMathWebConfig:
    """The recipe's own settings (the rlp/ stage uses the run's `thought`, `optim`, `train` and `data`)."""

    stages: List[str] = field(default_factory=lambda: list(SCORED))
    """The stages this launch trains and scores (`before` is scored only); results.json is written once all five
    are scored."""
    official_policy_weight: float = 1e6  # the official objective's policy weight (its rewards are ~1e-3 nats)
    eval_start: int = 1800  # the first held-out record of data.path (data.max_docs must not reach it)
    eval_docs: int = 48  # held-out records scored for NLL at the last step
    curve_docs: int = 16  # held-out records scored at every saved step
    eval_seq_len: int = 128  # tokens per scored record
    eval_batch_size: int = 4
    qa_limit: int = 200  # GSM8K test / CommonsenseQA dev items scored (soft accuracy); 0: none
    gsm8k_path: Optional[str] = None  # default: ../shared/data/gsm8k/test.jsonl beside the project
    csqa_path: Optional[str] = None  # default: ../shared/data/commonsenseqa/dev_rand_split.jsonl

    def __post_init__(self):
        if not self.stages or any(s not in SCORED for s in self.stages):
            raise ValueError(f"policy_math_web.stages: each of {list(SCORED)}, got {list(self.stages)}")
        for name in ("eval_docs", "curve_docs", "eval_seq_len", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"policy_math_web.{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_start < 0 or self.qa_limit < 0:
            raise ValueError("policy_math_web.eval_start and qa_limit must be >= 0")


# --------------------------------------------------------------------------------------------------
# stage configs


def stage_config(cfg, name: str):
    """The TrainConfig of one stage, writing to <run dir>/<name>."""
    from quietstar.methods.quietstar.learn_to_think import _plain, _stage, micro_step_flops

    t = cfg.thought
    if name == "official":
        t = dataclasses.replace(t, objective="official", reward_from=None, reward_floor=None, ema_decay=None,
                                clamp_negative_advantage=True, nll_weight=1.0,
                                policy_weight=cfg.policy_math_web.official_policy_weight)
    elif name == "policy_off":
        t = dataclasses.replace(t, policy_weight=0.0)
    elif name == "baseline":
        ratio = micro_step_flops(cfg, plain=False) / micro_step_flops(cfg, plain=True)
        train = dataclasses.replace(cfg.train, max_steps=max(1, round(cfg.train.max_steps * ratio)))
        return _stage(cfg, name, thought=_plain(cfg), train=train, init_from=cfg.init_from)
    return _stage(cfg, name, thought=t, init_from=cfg.init_from)


def check_split(cfg) -> Path:
    """The text file, and that no held-out record can be trained on (a UserError naming the field otherwise)."""
    r, d = cfg.policy_math_web, cfg.data
    if d.source != "jsonl" or not d.path or not Path(d.path).is_file():
        raise UserError(f"policy_math_web needs data=jsonl with data.path a jsonl file (its held-out records are "
                        f"scored), got data.source={d.source!r} data.path={d.path!r}")
    if not d.max_docs or d.max_docs > r.eval_start:
        raise UserError(f"policy_math_web: data.max_docs ({d.max_docs}) must be set and <= "
                        f"policy_math_web.eval_start ({r.eval_start}), so that no scored record is trained on")
    if cfg.thought.curriculum:
        raise UserError("policy_math_web: thought.curriculum is not supported here (the baseline's FLOPs are "
                        "matched to fixed thought lengths)")
    return Path(d.path)


# --------------------------------------------------------------------------------------------------
# scoring


def _eval(root: Path, tag: str, argv: list, threads: Optional[int]) -> dict:
    """One quietstar.eval run, or its JSON from an earlier launch."""
    out = root / "eval" / f"{tag}.json"
    if out.is_file():
        return json.loads(out.read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    from quietstar.eval.__main__ import main as eval_main

    print(f"[policy_math_web] scoring {tag}", flush=True)
    return eval_main([*argv, f"out={out}", f"threads={threads or 0}"])


def score(cfg, root: Path, tag: str, model_args: list, think: str, steps: list) -> None:
    """Score one model (held-out NLL at every step in `steps`, the last one on more records; QA at the last)."""
    r, path = cfg.policy_math_web, cfg.data.path
    nll = ["nll", f"data.path={path}", f"data.start={r.eval_start}", f"seq_len={r.eval_seq_len}",
           f"batch_size={r.eval_batch_size}", f"seed={cfg.train.seed}", f"thoughts={think}"]
    for step, args in steps:
        _eval(root, f"{tag}_curve_{step:07d}", [*nll, *args, f"limit={r.curve_docs}"], cfg.train.threads)
    _eval(root, f"{tag}_nll", [*nll, *model_args, f"limit={r.eval_docs}"], cfg.train.threads)
    if r.qa_limit:
        for task, given in (("gsm8k", r.gsm8k_path), ("csqa", r.csqa_path)):
            _eval(root, f"{tag}_{task}", [task, *model_args, f"limit={r.qa_limit}", f"seed={cfg.train.seed}",
                                          f"thoughts={think}", *([f"data.path={given}"] if given else [])],
                  cfg.train.threads)


def before_args(cfg) -> list:
    """quietstar.eval's model arguments for the starting model."""
    if cfg.init_from:
        return [f"ckpt={cfg.init_from}"]
    if not cfg.model.name:
        raise UserError("policy_math_web: the starting model needs a name (model.name, e.g. smollm2-135m) or "
                        "init_from (a checkpoint), so that it can be scored before training")
    return [f"model={cfg.model.name}"]


def saved_steps(stage_dir: Path) -> list:
    """(step, eval arguments) of every checkpoint a stage saved, in step order."""
    from quietstar.checkpoint import complete_checkpoints, step_of

    return [(step_of(p), [f"ckpt={p}"]) for p in complete_checkpoints(stage_dir)]


# --------------------------------------------------------------------------------------------------
# the recipe


def run(cfg, train_fn):
    """Train and score this launch's stages; with every stage scored, results.json and curves.png."""
    from quietstar.methods.quietstar.learn_to_think import _Summary, run_stage

    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    check_split(cfg)
    log: list = []
    last = None
    for name in cfg.policy_math_web.stages:
        if name == "before":  # step 0 of every stage's curve
            score(cfg, root, "before", before_args(cfg), "off", [(0, before_args(cfg))])
            continue
        stage = stage_config(cfg, name)
        last = run_stage(stage, train_fn, log, recipe="policy_math_web")
        think = "off" if name == "baseline" else "on"
        score(cfg, root, name, [f"ckpt={last}"], think, [] if name == "baseline" else saved_steps(root / name))
    missing = [s for s in SCORED if not (root / "eval" / f"{s}_nll.json").is_file()]
    if not missing:
        results = collect(cfg, root)
        results["stages"] = log
        write_record(root / "results.json", results, seeds=[cfg.train.seed])
        plot(results, root, root / "curves.png")
        print_results(results, root)
    else:
        print(f"[policy_math_web] results.json waits for the stages {missing} (launch them into {root})")
    return _Summary(root, last)


NLL_KEYS = ("nll_base", "nll_thought", "gain", "tokens", "gain_ci95_record_bootstrap")


def collect(cfg, root: Path) -> dict:
    """results.json from the eval JSONs: per model the held-out NLL with and without a thought (and by
    base-entropy quintile), the gain curve over training, and the QA soft accuracies."""
    from quietstar.methods.quietstar.learn_to_think import micro_step_flops

    def read(tag):
        f = root / "eval" / f"{tag}.json"
        return json.loads(f.read_text()) if f.is_file() else None

    out: dict = {"models": {}, "curves": {}}
    for name in SCORED:
        nll = read(f"{name}_nll")
        m = {k: nll[k] for k in NLL_KEYS if k in nll}
        m["entropy_quintiles"] = [{k: b[k] for k in ("bucket", "tokens", "nll_base", "nll_thought", "gain")}
                                  for b in nll.get("entropy_buckets", [])]
        for task in ("gsm8k", "csqa"):
            qa = read(f"{name}_{task}")
            if qa is not None:
                m[f"{task}_soft"] = {"no_thought": qa["soft_acc_base"], "thought": qa["soft_acc_thought"], "n": qa["n"]}
        out["models"][name] = m
        if name in ("before", "baseline"):
            continue
        start = sorted((root / "eval").glob("before_curve_*.json"))  # the starting model: step 0
        curve = start + sorted((root / "eval").glob(f"{name}_curve_*.json"))
        out["curves"][name] = [{"step": int(f.stem.rsplit("_", 1)[1]),
                                **{k: v for k, v in json.loads(f.read_text()).items() if k in NLL_KEYS[:3]}}
                               for f in curve]
    out["training"] = {s: training_summary(root / s / "metrics.jsonl") for s in STAGES[:3]}
    r = cfg.policy_math_web
    out["eval"] = {"data": cfg.data.path, "train_records": f"0..{cfg.data.max_docs - 1}",
                   "held_out_records": f"{r.eval_start}..{r.eval_start + r.eval_docs - 1}",
                   "curve_records": r.curve_docs, "seq_len": r.eval_seq_len, "qa_items": r.qa_limit,
                   "metric": "NLL per token (nats) of the talk-head-mixed prediction after one sampled thought "
                             "(nll_thought) and of the base prediction (nll_base); gain = nll_base - nll_thought"}
    bl = stage_config(cfg, "baseline")
    out["compute"] = {"counted": "model FLOPs (quietstar/flops.py)",
                      "thought_stage_flops": micro_step_flops(cfg, False) * cfg.train.max_steps * cfg.optim.grad_accum,
                      "baseline_flops": micro_step_flops(cfg, True) * bl.train.max_steps * cfg.optim.grad_accum,
                      "thought_stage_steps": cfg.train.max_steps, "baseline_steps": bl.train.max_steps}
    return out


TRAINING_KEYS = ("thought/reward_mean", "thought/reward_std", "thought/advantage_pos_frac", "thought/mix_weight_mean",
                 "thought/entropy_first_token", "train/nll_base", "train/nll_talk")


def training_summary(metrics: Path, window: int = 4) -> dict:
    """The thought stages' diagnostics: the mean of each of TRAINING_KEYS over the first and the last `window`
    logged steps, and the step at which the first thought token's entropy first fell under 0.1 nats (None: never)."""
    from quietstar.plots import read_metrics

    rows = read_metrics(metrics)
    mean = lambda part, k: sum(r[k] for r in part if k in r) / max(1, sum(k in r for r in part))
    collapsed = next((r["step"] for r in rows if r.get("thought/entropy_first_token", 1.0) < 0.1), None)
    return {"first": {k: mean(rows[:window], k) for k in TRAINING_KEYS},
            "last": {k: mean(rows[-window:], k) for k in TRAINING_KEYS},
            "steps_logged": [rows[0]["step"], rows[-1]["step"]] if rows else [], "entropy_under_0.1_at": collapsed}


def plot(results: dict, root: Path, out: Path) -> Path:
    """Training curves of the three thought stages, the held-out gain over training, and the quintiles."""
    from quietstar.plots import plot_stage_comparison, read_metrics

    stages = ("official", "rlp", "policy_off")
    return plot_stage_comparison({s: read_metrics(root / s / "metrics.jsonl") for s in stages}, results["curves"],
                                 {s: results["models"][s]["entropy_quintiles"] for s in stages}, out,
                                 title="policy_math_web: the official objective vs RLP vs RLP without its policy term")


def print_results(results: dict, root: Path) -> None:
    models = results["models"]
    print(f"\n[policy_math_web] held-out records {results['eval']['held_out_records']}: NLL per token")
    print(f"  {'model':>10}  {'no thought':>10} {'thought':>8} {'gain':>8}   {'GSM8K soft':>10} {'CSQA soft':>9}")
    for name, m in models.items():
        qa = [f"{m[t]['thought'] if m[t]['thought'] is not None else m[t]['no_thought']:.3f}" if t in m else "-"
              for t in ("gsm8k_soft", "csqa_soft")]  # a model scored without thoughts: its no-thought accuracy
        print(f"  {name:>10}  {m['nll_base']:10.4f} {m['nll_thought']:8.4f} {m['gain']:+8.4f}   {qa[0]:>10} {qa[1]:>9}")
    print(f"  results: {root / 'results.json'}\n  curves:  {root / 'curves.png'}")
