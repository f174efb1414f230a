"""The numbers the README, the results pages and the benchmarks page quote from bench/results records, each
mapped to the value in its record.

The documents: README.md, every docs/results/*.md, bench/README.md, and the docs/ pages named below
(`DOCS`). A `Table` maps a markdown table (found by its header row) cell by cell; a `Quote` maps a phrase
(as it reads, line breaks aside, `{}` for each number) to the values of its numbers. A quoted number with d
decimals matches a recorded value v when |quoted - scale * v| <= 0.5 * 10^-d: "0.997" matches 0.9968, and
"84%" (scale 100) does not match 0.8347 (83.47 rounds to 83). A table row or a phrase that is not found
is an error too, so an edited sentence or a new row has to be mapped again. Every results page must have
at least one check, and every `bench/results/<name>.json` (or .png) a document names must exist.

    python bench/readme_numbers.py        # every check; exit 1 and one line per mismatch if any

tests/test_readme_numbers.py runs the same checks. Not mapped here: the prose of bench/README.md's timing
sections (its two tables are), and numbers that are settings.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

# a number as prose writes it: a sign only where no digit precedes it ("0.00-0.47" is a range), thousands
# commas, decimals ("-0.066", "+9", "3,190", "0.0018")
NUMBER = r"(?:(?<![\w.])[-+])?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"


@dataclass(frozen=True)
class V:
    """A recorded value: a path into the record ("median/answer_nll/thought/3") or a function of the record,
    times `scale` (100 for a percentage). `bound=True`: the quoted number is a bound the value stays under
    ("under 0.015"), not the value rounded."""

    get: Union[str, Callable[[dict], float]]
    scale: float = 1.0
    bound: bool = False

    def value(self, record: dict) -> float:
        x = self.get(record) if callable(self.get) else at(record, self.get)
        return self.scale * float(x)


Cell = Union[None, str, V, tuple]  # None: not a recorded number; a tuple: one value per number in the cell


def pct(get) -> V:
    return V(get, 100.0)


def recorded(name: str, path: str, scale: float = 1.0) -> V:
    """A value from another record than the table's or the phrase's (a table whose rows are records)."""
    return V(lambda r: scale * float(at(load(name), path)))


@dataclass(frozen=True)
class Table:
    doc: str  # path from the repository root
    header: str  # the header row as it reads
    record: str  # file name in bench/results
    rows: dict  # first cell -> one Cell per further column

    @property
    def name(self) -> str:
        return f"{self.doc}: table '{self.header[:60]}'"


@dataclass(frozen=True)
class Quote:
    doc: str
    phrase: str  # {} for each number
    record: str
    values: tuple  # one V (or path) per {}

    @property
    def name(self) -> str:
        return f"{self.doc}: '{self.phrase[:70]}'"


def at(record, path: str):
    """record[a][b][c] for "a/b/c"; a key that holds "/" itself ("train/nll") is taken whole where it exists."""
    x, parts = record, path.split("/")
    while parts:
        if isinstance(x, list):
            x, parts = x[int(parts[0])], parts[1:]
            continue
        n = next((n for n in range(len(parts), 0, -1) if "/".join(parts[:n]) in x), 1)
        x, parts = x["/".join(parts[:n])], parts[n:]
    return x


@lru_cache(maxsize=None)
def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


@lru_cache(maxsize=None)
def read_doc(doc: str) -> str:
    return (ROOT / doc).read_text()


def as_v(x) -> V:
    return x if isinstance(x, V) else V(x)


def mismatch(quoted: str, v: float, bound: bool = False) -> Optional[str]:
    """None if `quoted` (as written) is `v` rounded to its decimals (bound: if v < quoted); else what differs."""
    q = float(quoted.replace(",", ""))
    decimals = len(quoted.split(".")[1]) if "." in quoted else 0
    if bound:
        return None if v < q else f"{v:.{decimals + 2}f} is not under {quoted}"
    if abs(q - v) <= 0.5 * 10 ** -decimals + 1e-9 * max(1.0, abs(v)):
        return None
    return f"{quoted} != {v:.{decimals + 2}f}"


def check_table(t: Table, text: Optional[str] = None) -> list[str]:
    text = read_doc(t.doc) if text is None else text
    lines = text.splitlines()
    heads = [i for i, line in enumerate(lines) if line.strip() == t.header]
    if len(heads) != 1:
        return [f"{t.name}: header found {len(heads)} times, not once"]
    record, problems, seen = load(t.record), [], []
    for line in lines[heads[0] + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        label, cells = cells[0], cells[1:]
        seen.append(label)
        if label not in t.rows:
            problems.append(f"{t.name}: row '{label}' is not mapped to {t.record}")
            continue
        spec = t.rows[label]
        if len(spec) != len(cells):
            problems.append(f"{t.name}: row '{label}' has {len(cells)} cells, the map {len(spec)}")
            continue
        for col, (cell, want) in enumerate(zip(cells, spec), start=2):
            if want is None:
                continue
            wants = want if isinstance(want, tuple) else (want,)
            found = re.findall(NUMBER, cell)
            if len(found) != len(wants):
                problems.append(f"{t.name}: row '{label}' column {col} '{cell}': {len(found)} numbers, "
                                f"the map {len(wants)}")
                continue
            for q, w in zip(found, wants):
                w = as_v(w)
                bad = mismatch(q, w.value(record), w.bound)
                if bad:
                    problems.append(f"{t.name}: row '{label}' column {col}: {bad} ({t.record})")
    for label in t.rows:
        if label not in seen:
            problems.append(f"{t.name}: mapped row '{label}' is not in the table")
    return problems


def phrase_regex(phrase: str) -> re.Pattern:
    """The phrase with each {} a captured number and each run of spaces any whitespace (lines wrap)."""
    literals = (r"\s+".join(map(re.escape, re.split(r"\s+", lit))) for lit in phrase.split("{}"))
    return re.compile(f"({NUMBER})".join(literals))


def check_quote(q: Quote, text: Optional[str] = None) -> list[str]:
    text = read_doc(q.doc) if text is None else text
    hits = list(phrase_regex(q.phrase).finditer(text))
    if len(hits) != 1:
        return [f"{q.name}: found {len(hits)} times, not once"]
    record, problems = load(q.record), []
    if len(hits[0].groups()) != len(q.values):
        return [f"{q.name}: {len(hits[0].groups())} numbers, the map {len(q.values)}"]
    for i, (quoted, want) in enumerate(zip(hits[0].groups(), q.values), start=1):
        want = as_v(want)
        bad = mismatch(quoted, want.value(record), want.bound)
        if bad:
            problems.append(f"{q.name}: number {i}: {bad} ({q.record})")
    return problems


def check(item, text: Optional[str] = None) -> list[str]:
    """The mismatches of one Table or Quote (`text`: the document's text instead of the file's)."""
    try:
        return check_table(item, text) if isinstance(item, Table) else check_quote(item, text)
    except (OSError, ValueError, LookupError, TypeError, ZeroDivisionError) as e:  # a missing record or key
        return [f"{item.name}: cannot read the recorded value from {item.record}: {type(e).__name__}: {e}"]


# ------------------------------------------------------------------------------------------------ helpers

median = statistics.median
SEEDS = ("0", "1", "2")


# learn_to_think_cpu.json
def ltt(metric: str, pred: str, hops: str) -> str:
    return f"median/{metric}/{pred}/{hops}"


# distill_reasoning_cpu.json
def dist(metric: str, who: str, hops: str) -> str:
    return f"kl_median_of_3_seeds/{metric}/{who}/{hops}"


def kept_per_seed(metric: str, hops: str, pick) -> V:
    return pct(lambda r: pick(x[metric][hops] for x in r["kl_median_of_3_seeds"]["gain_kept_per_run"]))


# explicit_reasoning_cpu.json, the decoy corpus
def ex_seed(method: str, which: str, mode: str, seed: str) -> str:
    return f"groups/decoy/{method}/per_seed/s{seed}/{which}/{mode}/acc"


def ex_gain(method: str, which: str, mode: str) -> V:
    """The median over seeds of (the row's accuracy - the base model's, same mode)."""
    def f(r):
        g = r["groups"]["decoy"][method]["per_seed"]
        return median([g[s][which][mode]["acc"] - g[s]["base"][mode]["acc"] for s in sorted(g)])
    return V(f)


def ex_row(method: str, which: str, mode: str, tokens: bool = True) -> list:
    row = [ex_seed(method, which, mode, s) for s in SEEDS]
    if not tokens:
        return row + [None, None]
    return row + [ex_gain(method, which, mode), f"groups/decoy/{method}/median/{which}/{mode}/tokens_per_answer"]


def ex_verifier(curve: str) -> list:
    def gain(r):
        g = r["groups"]["decoy"]["vstar"]["per_seed"]
        return median([g[s]["verifier"][curve]["4"] - g[s]["base"]["cot"]["acc"] for s in sorted(g)])

    def tokens(r):  # k samples of a solution each
        g = r["groups"]["decoy"]["vstar"]["per_seed"]
        return 4 * median([g[s]["verifier"]["tokens_per_solution"] for s in sorted(g)])
    return [f"groups/decoy/vstar/per_seed/s{s}/verifier/{curve}/4" for s in SEEDS] + [V(gain), V(tokens)]


def ex_quietstar(kind: str, base_mode: str) -> list:
    def gain(r):
        g, base = r["groups"]["decoy"]["quietstar"]["per_seed"], r["groups"]["decoy"]["star"]["per_seed"]
        return median([g[s][kind]["acc"] - base[s]["base"][base_mode]["acc"] for s in sorted(g)])
    return ([f"groups/decoy/quietstar/per_seed/s{s}/{kind}/acc" for s in SEEDS]
            + [V(gain), f"groups/decoy/quietstar/median/{kind}/tokens_per_answer"])


# explicit_reasoning_cpu.json, the decoy corpus on the bases trained again (group decoy_rpo) and the TPO grid
def kc_seed(group: str, method: str, which: str, seed: str) -> str:
    return f"groups/{group}/{method}/per_seed/s{seed}/{which}/cot/acc"


def kc_row(group: str, method: str, which: str = "chosen") -> list:
    def gain(r):
        g = r["groups"][group][method]["per_seed"]
        return median([g[s][which]["cot"]["acc"] - g[s]["base"]["cot"]["acc"] for s in sorted(g)])
    return [kc_seed(group, method, which, s) for s in SEEDS] + [V(gain)]


def grid_val(setting: str) -> list:
    def val(seed):
        def f(r):
            p = r["groups"][f"tpo_grid_{setting}"]["tpo"]["per_seed"][f"s{seed}"]
            return p["val_acc_per_round"][p["best_round"]]
        return V(f)
    per_seed = [val(s) for s in SEEDS]
    return per_seed + [V(lambda r: median([v.value(r) for v in per_seed]))]


KEEP_ROWS = {
    "base, rationale then answer": kc_row("decoy_rpo", "star", "base"),
    "STaR": kc_row("decoy_rpo", "star"),
    "TPO (`explicit=tpo`, the preset)": kc_row("decoy_rpo", "tpo"),
    "TPO, `dpo` with the preset's rounds cut to 2": kc_row("tpo_grid_dpo50lr1", "tpo"),
    "CPO, beam 1, 6 proposals, `rpo`": kc_row("decoy_rpo", "cpo"),
    "CPO, the same, answer check as the search's value (`self_eval=answer`: the `explicit=cpo` preset)":
        kc_row("decoy_cpo_answer", "cpo"),
}
KEEP_PREF_ROWS = {
    "base, rationale then answer": kc_row("decoy_rpo", "star", "base"),
    "STaR": kc_row("decoy_rpo", "star"),
    "TPO, `rpo`, up to 4 rounds (the preset)": kc_row("decoy_rpo", "tpo"),
    "TPO, `rpo`, 2 rounds": kc_row("tpo_grid_rpo50lr1", "tpo"),
    "TPO, `dpo`, the same 2 rounds": kc_row("tpo_grid_dpo50lr1", "tpo"),
    "CPO, beam 1, 6 proposals, step filter, `rpo`": kc_row("decoy_rpo", "cpo"),
    "CPO, the same with the answer check as the search's value": kc_row("decoy_cpo_answer", "cpo"),
}
GRID_ROWS = {
    "`rpo`, 200 steps a round, lr 3e-4, 2 rounds": grid_val("rpo200"),
    "`rpo`, 50 steps, lr 3e-4, 2 rounds": grid_val("rpo50"),
    "`rpo`, 50 steps, lr 1e-4, 2 rounds": grid_val("rpo50lr1"),
    "`ipo`, 50 steps, lr 3e-4, 2 rounds": grid_val("ipo50"),
    "`dpo`, 50 steps, lr 1e-4, 2 rounds": grid_val("dpo50lr1"),
    "`rpo`, 50 steps, lr 1e-4, up to 4 rounds (stop after one without a gain)": grid_val("rpo50lr1it4"),
}


# policy_decoy_rewards_cpu.json, policy_decoy_positions_cpu.json: why seeds 1 and 2 do not move
def rk(seed: int, hops: str, kind: str) -> tuple:
    def get(field):
        def f(r):
            row = next(x for x in r["rewards_by_kind"] if x["seed"] == seed)
            return row["by_hops"][hops][kind][field]
        return V(f)
    return (get("share"), get("reward"), get("advantage"))


def pos(run: str, seed: int) -> tuple:
    def get(hops):
        def f(r):
            return next(x for x in r["checkpoints"] if x["run"] == run and x["seed"] == seed)["chain_share"][hops]
        return V(f)
    return (get("3"), get("1"))


REWARD_ROWS = {f"{s}, {h} hop{'s' if h == '3' else ''}": [rk(s, h, "chain"), rk(s, h, "decoy")]
               for s in (0, 1, 2) for h in ("1", "3")}
POSITION_ROWS = {
    "policy term off (`policy_weight=0`)": [pos("policy term off (policy_weight=0)", s) for s in (1, 2)],
    "RLP, the recipe": [pos("RLP, the recipe (reward_floor=0)", s) for s in (1, 2)],
    "policy term before direct answers only": [pos("RLP, policy term at direct answers only", s) for s in (1, 2)],
    "policy term everywhere but direct answers": [pos("RLP, policy term everywhere but direct answers", s)
                                                  for s in (1, 2)],
    "`reward_floor=1.0` (the decoy's 0.7 nats no longer count)": [pos("RLP, reward_floor=1.0", s) for s in (1, 2)],
    "`reward_floor=1.0`, `policy_weight=100`": [pos("RLP, reward_floor=1.0, policy_weight=100", 1), None],
}


def s2_row(hops: str) -> list:
    def acc(which, mode, seed):
        return f"groups/decoy_3layer/system2/per_seed/s{seed}/{which}/{mode}/acc_by_hops/{hops}"

    def gap(seed):
        def f(r):
            g = r["groups"]["decoy_3layer"]["system2"]["per_seed"][f"s{seed}"]
            b, c = g["base"]["direct"]["acc_by_hops"][hops], g["base"]["cot"]["acc_by_hops"][hops]
            return (g["last_round"]["direct"]["acc_by_hops"][hops] - b) / (c - b)
        return V(f)
    return [tuple(acc("base", "direct", s) for s in SEEDS), tuple(acc("base", "cot", s) for s in SEEDS),
            tuple(acc("last_round", "direct", s) for s in SEEDS), tuple(gap(s) for s in SEEDS)]


# explicit_preference_cpu.json
def pref_round(method: str, rnd: int, path: str) -> str:
    return f"methods/{method}/rounds/{rnd}/{path}"


def ntp_row(objective: str) -> list:
    o = f"objectives_seed_0/{objective}"
    return ([(f"{o}/answer_nll/student/{h}", f"{o}/answer_acc/student/{h}") for h in ("1", "2", "3")]
            + [f"{o}/stages/0/final_metrics/train/nll"])


def pref_row(method: str, rounds: Sequence[int]) -> list:
    keys = ("cot/acc", "cot/tokens_per_answer", "sampled/acc", "direct/acc")
    return [tuple(pref_round(method, r, k) for r in rounds) for k in keys]


def best_of_k(curve: str) -> list:
    return [f"methods/vstar/best_of_k/{curve}/{k - 1}" for k in (1, 2, 4, 8, 16)]


# where_quality_cpu.json
def wq(where: str, key: str) -> str:
    return f"summary/{where}/{key}"


# ------------------------------------------------------------------------------------------------ the map

LTT_ROWS = {h: [ltt("answer_nll", "thought", h), ltt("answer_nll", "no_thought", h), ltt("answer_nll", "baseline", h),
                ltt("answer_acc", "thought", h), ltt("answer_acc", "no_thought", h), ltt("answer_acc", "baseline", h)]
            for h in ("1", "2", "3")}

DISTILL_ROWS = {h: [dist("answer_nll", "base", h), dist("answer_nll", "teacher", h), dist("answer_nll", "student", h),
                    pct(f"kl_median_of_3_seeds/gain_kept/nll/{h}"),
                    dist("answer_acc", "base", h), dist("answer_acc", "teacher", h), dist("answer_acc", "student", h),
                    pct(f"kl_median_of_3_seeds/gain_kept/acc/{h}")] for h in ("1", "2", "3")}

LTT_HEADER = "| hops | NLL thought | NLL no thought | NLL baseline | acc thought | acc no thought | acc baseline |"
WQ_HEADER = ("| where | FLOPs of `all` | thinks at (tokens / answers) | answer NLL gain over no thought | "
             "kept of `all`'s gain (per seed) | 3-hop NLL after a thought |")
DISTILL_HEADER = ("| hops | NLL base | NLL teacher | NLL student | gain kept | acc base | acc teacher | acc student "
                  "| gain kept |")

EXPLICIT_HEADER = ("| model (held-out answer accuracy) | seed 0 | seed 1 | seed 2 "
                   "| median gain over the base, same mode | tokens / answer |")
EXPLICIT_ROWS = {
    "base, rationale then answer": ex_row("star", "base", "cot"),
    "base, direct answer": ex_row("star", "base", "direct"),
    "STaR": ex_row("star", "chosen", "cot"),
    "STaR, last round": ex_row("star", "last_round", "cot", tokens=False),
    "RFT": ex_row("rft", "chosen", "cot"),
    "RFT, last round": ex_row("rft", "last_round", "cot", tokens=False),
    "V-STaR (generator)": ex_row("vstar", "chosen", "cot"),
    "V-STaR (generator), last round": ex_row("vstar", "last_round", "cot", tokens=False),
    "V-STaR best of k ratio at k=4": ex_verifier("best_of_k_ratio"),
    "V-STaR majority vote at k=4": ex_verifier("majority_vote"),
    "TPO": ex_row("tpo", "chosen", "cot"),
    "TPO, last round": ex_row("tpo", "last_round", "cot", tokens=False),
    "CPO": ex_row("cpo", "chosen", "cot"),
    "CPO, last round": ex_row("cpo", "last_round", "cot", tokens=False),
    "System-2 distillation (direct)": ex_row("system2", "chosen", "direct"),
    "System-2 distillation (direct), last round": ex_row("system2", "last_round", "direct", tokens=False),
    "Quiet-STaR, a thought before each answer token": ex_quietstar("quietstar_implicit", "cot"),
    "Quiet-STaR model, no thought (direct)": ex_quietstar("quietstar_direct", "direct"),
    "plain-LM baseline, Quiet-STaR's compute (direct)": ex_quietstar("baseline_direct", "direct"),
}

# the documents that quote recorded numbers
README, BENCH = "README.md", "bench/README.md"
R_LTT, R_POLICY, R_WHERE, R_DIST = ("docs/results/learn_to_think.md", "docs/results/policy.md",
                                    "docs/results/selective_thinking.md", "docs/results/distillation.md")
R_EXPL, R_CUR, R_EVAL, R_LM_EVAL = ("docs/results/explicit.md", "docs/results/curriculum.md",
                                    "docs/results/evaluation.md", "docs/results/lm_eval.md")

LTT, DIST, EXPL, PREF = ("learn_to_think_cpu.json", "distill_reasoning_cpu.json", "explicit_reasoning_cpu.json",
                         "explicit_preference_cpu.json")
WQ, WMW, MW, EVAL = ("where_quality_cpu.json", "where_math_web_cpu.json", "math_web_smollm2_cpu.json",
                     "eval_2026-11-22.json")
GEN, CUR, VAR, DEFAULT = ("generate_cpu.json", "curriculum_reasoning_cpu.json", "learn_to_think_variants_cpu.json",
                          "default_run_cpu.json")
CUR_END = "per_checkpoint/curriculum, end (step 200, n_ahead 7)"
CUR_FIXED = "per_checkpoint/fixed n_ahead 7 (step 261, same FLOPs)"
PW0 = "runs/policy_weight_0/result/answer_nll/thought/3"


def where_row(where: str) -> list:
    return ([wq(where, "flops_of_all"),
             (pct(wq(where, "think_share")), pct(wq(where, "answer_think_share"))),
             wq(where, "answer_gain_all_hops"),
             (wq(where, "kept_of_all_answer_gain"), *(wq(where, f"kept_per_seed/{s}") for s in SEEDS))
             if where != "all" else wq(where, "kept_of_all_answer_gain"),
             wq(where, "answer_nll_thought_3_hops")])


def gen(batch: int, length: int, key: str = "ratio") -> V:
    return V(lambda r: next(x[key] for x in r["results"] if x["batch"] == batch and x["thought_length"] == length))


def em_count(model: str) -> tuple:
    """"k/n": the items right and the items asked."""
    n = f"models/{model}/detail/gsm8k_em/n"
    return V(lambda r: r["models"][model]["gsm8k_em"] * at(r, n)), n


def gate_elsewhere(r: dict) -> list:
    """The gate's thinking share in every base-entropy quintile but the answers' (the fourth)."""
    return [x for i, x in enumerate(r["summary"]["gate"]["think_share_by_entropy_bucket"]) if i != 3]


def clean_implicit(r: dict) -> list:
    """Quiet-STaR's accuracy with a thought before each answer token, per seed, on the clean corpus."""
    return [x["quietstar_implicit"]["acc"] for x in r["groups"]["clean"]["quietstar"]["per_seed"].values()]


def ltt_run(seed: int, path: str) -> str:
    return f"runs/{seed}/{path}"


THOUGHTS = "train_step_thoughts_cpu.json"
LEAN = "train_step_lean_cpu.json"
LEAN_HEADER = "| L=256 | step | peak RSS | peak tensor memory | sequential_dense / ours: time, RSS, tensors |"
LEAN_GOALS = "goals/bench_small L=256/sequential_dense / "


def lean_row(i: int, ours: Optional[str]) -> list:
    """One case of the lean-step record (results/i): step time, peak RSS and peak tensor memory in GB, and
    sequential_dense's time, RSS and tensor memory over ours (none for sequential_dense itself)."""
    gb = 1e-3
    return [f"results/{i}/step_s", V(f"results/{i}/peak_rss_mb", gb), V(f"results/{i}/peak_tensor_mb", gb),
            tuple(f"{LEAN_GOALS}{ours} {what}" for what in ("time", "memory", "tensor memory")) if ours else None]


LEAN_ROWS = {"grid, default (`auto`: no block checkpointed, the estimate 0.86 GB fits 11.8 GB)": lean_row(2, "grid"),
             "grid+ckpt (every block)": lean_row(3, "grid+ckpt"),
             "sequential_dense (the official way)": lean_row(4, None)}


def where_cost(i: int, key: str, scale: float = 1.0) -> V:
    """where_cost_cpu.json: a case's value (results/i: 0 all positions, then q = 1.0, 0.5, 0.25, 0.1)."""
    return V(f"results/{i}/{key}", scale)


LM_EVAL, LM_EVAL_CSQA = "lm_eval_cpu.json", "lm_eval_csqa_smollm2_base_cpu.json"
LM_EVAL_COUNTS = "lm_eval_csqa_smollm2_base_counts_cpu.json"
LM_EVAL_DEFAULT_RUN = "lm_eval_csqa_default_run_cpu.json"
LM_EVAL_GSM8K = "lm_eval_gsm8k_smollm2_base_cpu.json"
LM_EVAL_RLP = "lm_eval_csqa_rlp_math_web_cpu.json"
LM_EVAL_GSM8K_RUN = "lm_eval_gsm8k_default_run_cpu.json"
LM_EVAL_GSM8K_RLP = "lm_eval_gsm8k_rlp_math_web_cpu.json"
PMW = "policy_math_web_cpu.json"


def pmw_qa(model: str, task: str) -> V:
    """policy_math_web's soft accuracy of a model: after a thought where it was scored with one."""
    return V(lambda r: r["models"][model][f"{task}_soft"]["thought"] if r["models"][model][f"{task}_soft"]["thought"]
             is not None else r["models"][model][f"{task}_soft"]["no_thought"])
PD, PDN, PDD = "policy_decoy_cpu.json", "policy_decoy_nofloor_cpu.json", "policy_decoy_diagnosis_cpu.json"
PD_HEADER = ("| seed | chain share before | after | after, policy off | acc. with a thought | policy off | no thought | "
             "baseline |")


def pd_row(prefix: str) -> list:
    """A policy_decoy row: chain share before / after / after with the policy term off, then 3-hop accuracy with a
    thought, with it off, without a thought, and the baseline's."""
    return [f"{prefix}chain_share/before", f"{prefix}chain_share/after", f"{prefix}policy_off/chain_share/after",
            f"{prefix}answer_acc/thought/3", f"{prefix}policy_off/answer_acc/thought/3",
            f"{prefix}answer_acc/no_thought/3", f"{prefix}answer_acc/baseline/3"]


PD_ROWS = {**{str(s): pd_row(f"per_run/{s}/") for s in (0, 1, 2)}, "median": pd_row("")}
PDCG, PDCG_START = "policy_decoy_close_gate_cpu.json", "policy_decoy_close_gate_start_cpu.json"
PDCG2K = "policy_decoy_close_gate_2000_cpu.json"
PDCG_HEADER = "| seed | chain share | policy off | acc. with a thought | policy off | no thought | baseline |"
PDCG_ROWS = {**{str(s): pd_row(f"per_run/{s}/")[1:] for s in (0, 1, 2)}, "median": pd_row("")[1:]}


S2GRID = "system2_3layer_grid_cpu.json"
S2HOP, S2REPLAY, S2RIGHT = ("system2_1hop_3layer_cpu.json", "system2_replay_3layer_cpu.json",
                            "system2_right_labels_3layer_cpu.json")
S2HOP_CHOSEN = "settings/chosen: max_difficulty=1 train_questions=8192 steps=200 lr=3.0e-4"
S2_4K, S2_4K_MD2 = "system2_3layer_4k_cpu.json", "bases_4000_steps_1_and_2_hops"
S2_STRICT = "label_filter_2000_step_bases/k8_c1.0_q32768_s2"
S2HOP_HEADER = "| 3 layers, held-out 1-hop accuracy | seed 0 | seed 1 | seed 2 |"


def s2hop(seed: int, field: str, scale: float = 1.0) -> V:
    return V(f"gap_closed_1hop/seed {seed}/{field}", scale)


def s2_setting(name: str, path: str) -> str:
    return f"settings/{name}/{path}"


S2_GOLD1 = "diagnosis, gold: 1-hop questions with right labels only, train_questions={}, steps={} lr={} (seed 0)"
S2_SYSTEM2_LINE = ("System-2 distillation gains where one position can compute the answer. On 3-layer bases, trained "
                   "on the 1-hop questions only and with 8,192 questions (`explicit.max_difficulty=1`), its direct "
                   "answers close {}% and {}% of the gap to the base's rationale on held-out 1-hop questions (seeds 0 "
                   "and 1)")
PDCG_VAL, PDISC = "policy_decoy_close_gate_validation_cpu.json", "policy_discovery_close_gate_validation_cpu.json"


PDISC_MORE = "policy_discovery_more_validation_cpu.json"
PDISC_EMB = "policy_discovery_embedding_lr_validation_cpu.json"


def emb_ckpt(r, run: str, step: int) -> dict:
    return next(c for c in r["runs"][run]["checkpoints"] if c["step"] == step)


def emb_at(run: str, step: int, field: str, scale: float = 1.0) -> V:
    """A checkpoint's value in the discovery runs with the 100x thought-embedding rate, found by its step."""
    return V(lambda r: at(emb_ckpt(r, run, step), field), scale)


def emb_row(seed: str) -> list:
    run = f"seed {seed}"
    return [tuple(emb_at(run, 500, f"chain_like_share/{h}") for h in "123"),
            tuple(emb_at(run, 1000, f"chain_like_share/{h}") for h in "123"),
            (emb_at(run, 1000, "answer_acc/thought/3"), emb_at(run, 1000, "answer_acc/no_thought/3")),
            (emb_at(run, 1000, "answer_acc/thought/2"), emb_at(run, 1000, "answer_acc/no_thought/2"))]
PDISC_MORE_HEADER = ("| variant | chain-holding thoughts before 3-hop answers, step 100 / 300 / 500 | NLL without a thought, "
                     "start -> step 500 |")


def disc_more_row(run: str) -> list:
    """A discovery variant: its chain-holding share before 3-hop answers at steps 100, 300, 500, then its train NLL
    without a thought at the first logged step and at step 500."""
    return [tuple(f"runs/{run}/checkpoints/{i}/chain_like_share/3" for i in range(3)),
            (f"runs/{run}/training_curve/0/nll_base", f"runs/{run}/training_curve/-1/nll_base")]


def right_problems(r) -> set:
    """The GSM8K problems an lm_eval generation record gets right with the flexible extraction."""
    return {x["doc_id"] for x in r["items_scored"] if x["flexible-extract"]["exact_match"] == 1.0}


def one(xs: set):
    if len(xs) != 1:
        raise ValueError(f"expected one problem, got {sorted(xs)}")
    return next(iter(xs))


def disc_ckpt(r, seed: int, step: int) -> dict:
    return next(x for x in r["checkpoints"] if x["seed"] == seed and x["step"] == step)


def close_kind(r, seed: int, hops: str, kind: str) -> dict:
    return next(x for x in r["rewards_by_kind_close"] if x["seed"] == seed)["by_hops"][hops][kind]


def close_adv(seed: int, hops: str, kind: str) -> V:
    return V(lambda r: close_kind(r, seed, hops, kind)["advantage"])


def val_share(i: int, hops: str) -> V:
    return V(lambda r: r["checkpoints"][i]["chain_share"][hops])


def start_share(seed: int, hops: str = "3") -> V:
    """The pretrained model's share of chains before `hops`-hop answers, a thought before every answer."""
    return V(lambda r: 100.0 * next(x for x in r["rewards_by_kind"] if x["seed"] == seed)["by_hops"][hops]["chain"]["share"])


CHECKS: list = [
    # ------------------------------------------------------------------ README: the default run
    Quote("README.md", "ended at NLL {} on its last step's sequence: the mean of {} without thoughts and {} for the "
          "predictions after a thought", DEFAULT, ("final/train/nll", "final/train/nll_base", "final/train/nll_talk")),
    # ------------------------------------------------------------------ README: learn_to_think
    *(Table(doc, LTT_HEADER, LTT, LTT_ROWS) for doc in (README, R_LTT)),
    Quote("README.md", "held-out 3-hop answers go from {}% to {}% correct, while a plain-LM baseline given the same "
          "FLOPs stays at {}%", LTT, (pct(ltt("answer_acc", "no_thought", "3")), pct(ltt("answer_acc", "thought", "3")),
                                      pct(ltt("answer_acc", "baseline", "3")))),
    Quote(R_LTT, "At 3 hops the NLL after a thought is {}x the same model's NLL without one, and {}x the "
          "baseline's", LTT,
          (V(lambda r: at(r, ltt("answer_nll", "thought", "3")) / at(r, ltt("answer_nll", "no_thought", "3"))),
           V(lambda r: at(r, ltt("answer_nll", "thought", "3")) / at(r, ltt("answer_nll", "baseline", "3"))))),
    Quote(R_LTT, "the 3-hop thought NLLs are {}, {} and {}", LTT,
          tuple(ltt_run(s, "answer_nll/thought/3") for s in (0, 1, 2))),
    Quote(R_LTT, "Each stage took {}-{} s (pretrain), {}-{} s (Quiet-STaR, {} steps) and {}-{} s (baseline, {} "
          "steps), from the two seeds that had the machine to themselves", LTT,
          (ltt_run(1, "stages_wall_s/pretrain"), ltt_run(0, "stages_wall_s/pretrain"),
           ltt_run(0, "stages_wall_s/quietstar"), ltt_run(1, "stages_wall_s/quietstar"), "compute/quietstar_steps",
           ltt_run(0, "stages_wall_s/baseline"), ltt_run(1, "stages_wall_s/baseline"), "compute/baseline_steps")),
    Quote(R_LTT, "That buys it {} steps", LTT, ("compute/baseline_steps",)),
    Quote(R_LTT, "at 3 hops {}, against {} without a thought and {} for the baseline", LTT,
          (ltt("answer_nll_raw", "thought", "3"), ltt("answer_nll_raw", "no_thought", "3"),
           ltt("answer_nll_raw", "baseline", "3"))),
    Quote(R_LTT, "gives a 3-hop thought NLL of {} ({} with the policy term)", VAR,
          (PW0, V(lambda r: load(LTT)["runs"]["0"]["answer_nll"]["thought"]["3"]))),
    # ------------------------------------------------------------------ README: thought.where quality and math web
    *(Table(doc, WQ_HEADER, WQ, {"all": where_row("all"), "entropy, q = 0.25": where_row("entropy"),
                                  "gate, q = 0.25": where_row("gate")}) for doc in (README, R_WHERE)),
    Quote(R_WHERE, "The gate keeps {}-{}% of the gain at {}% of the FLOPs, seed by seed, and the entropy rule "
          "{}-{}%", WQ,
          (pct(lambda r: min(r["summary"]["gate"]["kept_per_seed"].values())),
           pct(lambda r: max(r["summary"]["gate"]["kept_per_seed"].values())), pct(wq("gate", "flops_of_all")),
           pct(lambda r: min(r["summary"]["entropy"]["kept_per_seed"].values())),
           pct(lambda r: max(r["summary"]["entropy"]["kept_per_seed"].values())))),
    Quote(R_WHERE, "They think at {}% of the real tokens", WQ, (pct(wq("gate", "think_share")),)),
    Quote(R_WHERE, "the answers after `=`: {} nats per token there, under {} elsewhere", WQ,
          (wq("all", "gain_by_entropy_bucket/3"),
           V(lambda r: max(x for i, x in enumerate(r["summary"]["all"]["gain_by_entropy_bucket"]) if i != 3),
             bound=True))),
    Quote(R_WHERE, "at only {}% of the second quintile, which is why it misses {}% of the answers", WQ,
          (pct(wq("entropy", "think_share_by_entropy_bucket/3")),
           pct(lambda r: 1 - r["summary"]["entropy"]["answer_think_share"]))),
    Quote(R_WHERE, "The gate thinks at {}% of the answers; it spends the rest of its slots evenly ({}-{}% of each "
          "other quintile)", WQ,
          (pct(wq("gate", "answer_think_share")), pct(lambda r: min(gate_elsewhere(r))),
           pct(lambda r: max(gate_elsewhere(r))))),
    Quote(R_WHERE, "both rules keep {}% of the all-positions gain at q = 0.25 ({} and {} nats per token against "
          "{})", WMW,
          (pct("results/entropy/kept_of_all_gain"), "results/entropy/gain", "results/gate/gain",
           "results/all/gain")),
    Quote(R_WHERE, "spread over every entropy quintile ({}-{} nats per token for `all`)", MW,
          (V(lambda r: min(b["gain"] for b in r["earlier"][0]["result"]["entropy_buckets"])),  # where's `all` run
           V(lambda r: max(b["gain"] for b in r["earlier"][0]["result"]["entropy_buckets"])))),
    Quote(R_LTT, "is better after a thought by {} nats per token on held-out records (95% record-bootstrap "
          "interval {}-{}), and on {}% of the", MW,
          ("result/gain", "gain_ci95_record_bootstrap/0", "gain_ci95_record_bootstrap/1",
           pct("records_improved_share"))),
    # ------------------------------------------------------------------ README and docs: distillation
    *(Table(doc, DISTILL_HEADER, DIST, DISTILL_ROWS) for doc in (README, R_DIST)),
    Table("docs/distillation.md", "| hops | NLL base | NLL teacher (thought) | NLL student | kept | acc base | "
          "acc teacher | acc student | kept |", DIST, DISTILL_ROWS),
    Quote(R_DIST, "so the 1-hop gain carries over ({}-{}% of the NLL gain and {}-{}% of the accuracy gain per "
          "seed) and the 2- and 3-hop gains, which need the thought's serial steps, do not ({}% to {}%)", DIST,
          (kept_per_seed("nll", "1", min), kept_per_seed("nll", "1", max), kept_per_seed("acc", "1", min),
           kept_per_seed("acc", "1", max),
           pct(lambda r: min(x[m][h] for x in r["kl_median_of_3_seeds"]["gain_kept_per_run"] for m in ("nll", "acc")
                             for h in ("2", "3"))),
           pct(lambda r: max(x[m][h] for x in r["kl_median_of_3_seeds"]["gain_kept_per_run"] for m in ("nll", "acc")
                             for h in ("2", "3"))))),
    Quote("docs/distillation.md", "the share of the 1-hop gain kept is {}%, {}% and {}% in NLL and {}%, {}% and {}% in "
          "accuracy", DIST,
          tuple(pct(f"kl_median_of_3_seeds/gain_kept_per_run/{i}/{m}/1") for m in ("nll", "acc") for i in range(3))),
    Table("docs/distillation.md", "| objective | 1 hop NLL / acc | 2 hops | 3 hops | student training NLL, end |", DIST,
          {"kl": ntp_row("kl"), "ntp_rl, official": ntp_row("ntp_rl_official"),
           "ntp_rl, teacher_gain": ntp_row("ntp_rl_teacher_gain")}),
    Quote("docs/distillation.md", "transfers, but less than the KL: {}% of the 1-hop NLL gain and {}% of the accuracy "
          "gain, against {}% and {}% for the KL on the same teacher. Its reward was positive at {}% of positions in "
          "the last step",
          DIST, (pct("objectives_seed_0/ntp_rl_teacher_gain/gain_kept/nll/1"),
                 pct("objectives_seed_0/ntp_rl_teacher_gain/gain_kept/acc/1"),
                 pct("objectives_seed_0/kl/gain_kept/nll/1"), pct("objectives_seed_0/kl/gain_kept/acc/1"),
                 pct("objectives_seed_0/ntp_rl_teacher_gain/stages/0/final_metrics/distill/reward_pos_frac"))),
    Quote("docs/distillation.md", "the KL to the teacher with it ({} nats at the end)", DIST,
          ("objectives_seed_0/ntp_rl_official/stages/0/final_metrics/distill/kl",)),
    Quote("docs/distillation.md", "it reaches the baseline's 1-hop level in 600 steps ({} against {} median, {}% "
          "against {}% accuracy)", DIST,
          (dist("answer_nll", "student", "1"), V(lambda r: load(LTT)["median"]["answer_nll"]["baseline"]["1"]),
           pct(dist("answer_acc", "student", "1")),
           pct(lambda r: load(LTT)["median"]["answer_acc"]["baseline"]["1"]))),
    # ------------------------------------------------------------------ README and docs: explicit thinking
    Table(R_EXPL, EXPLICIT_HEADER, EXPL, EXPLICIT_ROWS),
    Table(README, EXPLICIT_HEADER, EXPL, {k: v for k, v in EXPLICIT_ROWS.items() if not k.endswith(", last round")}),
    Table("docs/explicit.md", EXPLICIT_HEADER, EXPL, EXPLICIT_ROWS),
    Table("docs/explicit.md", "| 3 layers, held-out accuracy | direct, base | rationale, base | direct, after the round "
          "| gap closed |", EXPL, {"1 hop, seeds 0 / 1 / 2": s2_row("1"), "3 hops, seeds 0 / 1 / 2": s2_row("3")}),
    Quote(README, "TPO gains on every seed: {} / {} / {} -> {} / {} / {} on bases trained again, against STaR's "
          "median {} on the same bases", EXPL,
          tuple(kc_seed("decoy_rpo", "tpo", "base", s) for s in SEEDS)
          + tuple(kc_seed("decoy_rpo", "tpo", "chosen", s) for s in SEEDS) + (kc_row("decoy_rpo", "star")[3],)),
    Table(R_EXPL, "| model, same bases (held-out cot accuracy) | seed 0 | seed 1 | seed 2 | median gain over the base |",
          EXPL, KEEP_ROWS),
    Table("docs/explicit_preference.md", "| TPO, same bases (held-out cot accuracy) | seed 0 | seed 1 | seed 2 "
          "| median gain over the base |", EXPL, KEEP_PREF_ROWS),
    Table("docs/explicit_preference.md", "| TPO setting | validation, seed 0 | seed 1 | seed 2 | median |", EXPL,
          GRID_ROWS),
    Quote("docs/explicit_preference.md", "right no more often than the base model's own greedy chain (held-out {} / {} / "
          "{}): on {}, {} and {} of 1,024 training questions", EXPL,
          tuple(kc_seed("decoy_rpo", "cpo", "base", s) for s in SEEDS)
          + tuple(f"groups/decoy_rpo/cpo/per_seed/s{s}/stats_per_round/0/winning_correct" for s in SEEDS)),
    Quote(README, "scores partial chains with the answer check (`explicit.self_eval=answer`, now the `explicit=cpo` "
          "preset):\n{} / {} / {} -> {} / {} / {}", EXPL, tuple(kc_seed("decoy_cpo_answer", "cpo", w, s) for w in ("base", "chosen") for s in SEEDS)),
    Quote("docs/explicit_preference.md", "the winning path is right on {}, {} and {} of the 1,024 training questions "
          "(round 1), against {}, {} and {} with self-agreement. Held-out accuracy goes {} / {} / {} -> {} / {} / {}, "
          "a median gain of {} against STaR's {}", EXPL,
          tuple(f"groups/decoy_cpo_answer/cpo/per_seed/s{s}/stats_per_round/0/winning_correct" for s in SEEDS)
          + tuple(f"groups/decoy_rpo/cpo/per_seed/s{s}/stats_per_round/0/winning_correct" for s in SEEDS)
          + tuple(kc_seed("decoy_cpo_answer", "cpo", w, s) for w in ("base", "chosen") for s in SEEDS)
          + (kc_row("decoy_cpo_answer", "cpo")[3], kc_row("decoy_rpo", "star")[3])),
    Quote(README, "One seed's default run takes {} minutes on 2 CPU cores", "policy_decoy_default_run_time_cpu.json",
          (V(lambda r: r["wall_s"] / 60),)),
    Quote("docs/explicit_preference.md", "None of the {} critiques has a verdict", "cai_gsm8k_smollm2_cpu.json",
          ("rounds/1/skips/critique has no verdict",)),
    Quote("docs/explicit_preference.md", "The labeller gives {} pairs, but it prefers the same position whichever way "
          "the\npair is asked", "cai_gsm8k_smollm2_cpu.json", ("labels/pairs",)),
    Quote("docs/explicit_preference.md", "The mean confidence |2p - 1| is {}. All {} pairs", "cai_gsm8k_smollm2_cpu.json",
          ("labels/label_confidence_mean", "labels/both_sides_wrong")),
    Quote("docs/explicit_preference.md", "leaves the held-out\naccuracy at {}, and validation", "cai_gsm8k_smollm2_cpu.json",
          ("rounds/2/held_out_cot_acc",)),
    Quote("docs/learning.md", "first token's entropy stays at {}-{} nats throughout",
          "policy_discovery_answers_only_validation_cpu.json",
          tuple(V(lambda r, f=f: f(x["entropy_first_token"] for x in r["training_curve"])) for f in (min, max))),
    Table("docs/learning.md", PDISC_MORE_HEADER, PDISC_MORE, {
        "the RLP objective alone (`thought.nll_weight=0`, as RLP has no NLL term), policy term before answers only":
            disc_more_row("rlp_alone_before_answers"),
        "the RLP objective alone, the gate's positions": disc_more_row("rlp_alone_gate"),
        "the policy term at 10 times its weight (`thought.policy_weight=10`), the gate's positions":
            disc_more_row("policy_weight_10_gate"),
        "16 thoughts per position (`thought.n_thoughts=16`, the recipe's 4), the gate's positions":
            disc_more_row("sixteen_thoughts_gate")}),
    Quote("docs/learning.md", "chain-holding thoughts before 1-hop answers reach {} at step 100 and fall back to {}",
          PDISC_MORE, tuple(f"runs/policy_weight_10_gate/checkpoints/{i}/chain_like_share/1" for i in (0, 2))),
    Table("docs/learning.md", "| seed | chain-holding, step 500 | step 1,000 | 3-hop accuracy, step 1,000 | 2-hop accuracy, "
          "step 1,000 |", PDISC_EMB, {s: emb_row(s) for s in SEEDS}),
    Quote("docs/learning.md", "seed 2's thoughts before 3-hop answers\nhold the chain {}% of the time at step 1,000, and "
          "its accuracy with a thought equals its accuracy without one\n({})", PDISC_EMB,
          (emb_at("seed 2, policy_weight=0", 1000, "chain_like_share/3", 100.0),
           emb_at("seed 2, policy_weight=0", 1000, "answer_acc/thought/3"))),
    Quote("docs/learning.md", "Seed 0's reach {} at step 500, against {} with the term", PDISC_EMB,
          (emb_at("seed 0, policy_weight=0", 500, "chain_like_share/3"), emb_at("seed 0", 500, "chain_like_share/3"))),
    Quote("docs/learning.md", "({} before 3-hop answers at step 1,500)", PDISC_EMB,
          (emb_at("seed 0", 1500, "chain_like_share/3"),)),
    Quote("docs/learning.md", "the 3-hop accuracy with a thought is {}, against {} without one", PDISC_EMB,
          (emb_at("seed 2", 1000, "answer_acc/thought/3"), emb_at("seed 2", 1000, "answer_acc/no_thought/3"))),
    Quote("docs/learning.md", "Its 1- and 2-hop answers are right {}% of the time after a thought", PDISC_EMB,
          (emb_at("seed 1", 1000, "answer_acc/thought/2", 100.0),)),
    Quote("docs/learning.md", "before 3-hop answers the chain-holding share is {} at step\n1,000 (goal 0.5), and before "
          "2-hop answers {}", PDISC_EMB,
          (V(lambda r: median([at(emb_ckpt(r, f"seed {s}", 1000), "chain_like_share/3") for s in SEEDS])),
           V(lambda r: median([at(emb_ckpt(r, f"seed {s}", 1000), "chain_like_share/2") for s in SEEDS])))),
    Quote(README, "seed 2's thoughts before 3-hop answers hold it {}% of the time after\n1,000 steps ({}% with the policy "
          "term off), seed 1's before 1- and 2-hop answers only, seed 0's {}% of the time", PDISC_EMB,
          (emb_at("seed 2", 1000, "chain_like_share/3", 100.0), emb_at("seed 2, policy_weight=0", 1000, "chain_like_share/3", 100.0),
           emb_at("seed 0", 1000, "chain_like_share/3", 100.0))),
    Quote("docs/learning.md", "has {} of chain-holding thoughts before 3-hop answers, where it started\nat {}",
          "policy_discovery_longer_validation_cpu.json", ("checkpoints/3/chain_like_share/3", "start_chain_like_share_3hop")),
    Quote("docs/learning.md", "The mean reward then rises ({} -> {} and {} -> {})", PDISC_MORE,
          tuple(f"runs/{run}/training_curve/{i}/reward_mean" for run in ("rlp_alone_before_answers", "rlp_alone_gate")
                for i in (0, -1))),
    Quote(R_POLICY, "The default run takes {} minutes on 2 CPU cores", "policy_decoy_default_run_time_cpu.json",
          (V(lambda r: r["wall_s"] / 60),)),
    Quote("docs/explicit.md", "all lower the validation accuracy after round 1, from {} to {}-{}", S2GRID,
          (V(lambda r: r["settings"]["steps=50 lr=1.0e-4"]["val_acc_per_round"][0]),
           V(lambda r: min(v["val_acc_per_round"][1] for v in r["settings"].values())),
           V(lambda r: max(v["val_acc_per_round"][1] for v in r["settings"].values())))),
    Quote("docs/explicit.md", "Held-out 1-hop direct accuracy falls with them, from {} to {}-{}, although 88% of the "
          "round's training labels are right ({} of {})", S2GRID,
          (V(lambda r: r["settings"]["steps=50 lr=1.0e-4"]["held_out_direct_acc_by_hops_per_round"][0]["1"]),
           V(lambda r: min(v["held_out_direct_acc_by_hops_per_round"][1]["1"] for v in r["settings"].values())),
           V(lambda r: max(v["held_out_direct_acc_by_hops_per_round"][1]["1"] for v in r["settings"].values())),
           "settings/steps=50 lr=1.0e-4/stats_round_1/kept_label_correct",
           "settings/steps=50 lr=1.0e-4/examples_round_1")),
    Table("docs/explicit.md", S2HOP_HEADER, S2HOP, {
        "direct, base": [s2hop(s, "direct_base") for s in (0, 1, 2)],
        "rationale, base": [s2hop(s, "cot_base") for s in (0, 1, 2)],
        "direct, the round chosen by validation": [s2hop(s, "direct_chosen") for s in (0, 1, 2)],
        "share of the gap closed": [s2hop(s, "gap_closed", 100.0) for s in (0, 1, 2)]}),
    Quote(README, S2_SYSTEM2_LINE, S2HOP, (s2hop(0, "gap_closed", 100.0), s2hop(1, "gap_closed", 100.0))),
    Quote(R_EXPL, "trained on the\n  1-hop questions only and with 8,192 questions (`explicit.max_difficulty=1`), its "
          "direct answers close {}% and\n  {}% of the gap", S2HOP, (s2hop(0, "gap_closed", 100.0), s2hop(1, "gap_closed", 100.0))),
    Quote("docs/explicit.md", "so more than half of the\n  gap is closed there (median {}%)", S2HOP,
          (V(lambda r: 100 * statistics.median(v["gap_closed"] for v in r["gap_closed_1hop"].values())),)),
    Quote("docs/explicit.md", "Only {}% of its\n  round's labels are right ({} of {})", S2HOP,
          (V(lambda r: 100 * at(r, S2HOP_CHOSEN + "/seed 2/stats_round_1/kept_label_correct")
             / at(r, S2HOP_CHOSEN + "/seed 2/examples_round_1")),
           S2HOP_CHOSEN + "/seed 2/stats_round_1/kept_label_correct", S2HOP_CHOSEN + "/seed 2/examples_round_1")),
    Quote("docs/explicit.md", "Direct 2-hop answers\n  get worse ({} -> {} and {} -> {} on seeds 0 and 1), and so do the "
          "round's own rationales\n  (1-hop {} -> {} and {} -> {})", S2HOP,
          tuple(f"{S2HOP_CHOSEN}/seed {s}/held_out_direct_acc_by_hops_per_round/{i}/2" for s in (0, 1) for i in (0, 1))
          + tuple(f"{S2HOP_CHOSEN}/seed {s}/held_out_cot_acc_by_hops_per_round/{i}/1" for s in (0, 1) for i in (0, 1))),
    Quote("docs/explicit.md", "Validation goes from {} to {} / {} after 50 steps at lr 1e-4", S2REPLAY,
          ("settings/steps=50 lr=1.0e-4 replay_weight=1.0/val_acc_per_round/0",
           "settings/steps=50 lr=1.0e-4 replay_weight=1.0/val_acc_per_round/1",
           "settings/steps=50 lr=1.0e-4 replay_weight=3.0/val_acc_per_round/1")),
    Quote("docs/explicit.md", "still takes held-out 1-hop direct accuracy from {} to {}", S2RIGHT,
          ("settings/steps=50 lr=1.0e-4/held_out_direct_acc_by_hops_per_round/0/1",
           "settings/steps=50 lr=1.0e-4/held_out_direct_acc_by_hops_per_round/1/1")),
    Quote("docs/explicit.md", "This gives 1-hop {} and {} (50 steps at 1e-4; 200 at 3e-4)", S2HOP,
          tuple(s2_setting(f"every depth, train_questions=8192, steps={n} lr={lr} (seed 0)",
                           "held_out_direct_acc_by_hops_per_round/1/1") for n, lr in (("50", "1.0e-4"), ("200", "3.0e-4")))),
    Quote("docs/explicit.md", "1-hop accuracy falls to {} and {}. The round fits\n    its {} training prompts (greedy "
          "accuracy on them {} -> {})", S2HOP,
          tuple(s2_setting(S2_GOLD1.format(1024, n, lr), "held_out_direct_acc_by_hops_per_round/1/1")
                for n, lr in (("50", "1.0e-4"), ("200", "3.0e-4")))
          + ("fit_of_its_own_prompts/prompts", "fit_of_its_own_prompts/base_greedy_acc",
             "fit_of_its_own_prompts/round_1_greedy_acc")),
    Quote("docs/explicit.md", "1-hop accuracy rises to {}, so the two changes", S2HOP,
          (s2_setting(S2_GOLD1.format(8192, "200", "3.0e-4"), "held_out_direct_acc_by_hops_per_round/1/1"),)),
    Quote("docs/explicit.md", "So {}% of its round's labels are the queried symbol itself, against {}% and {}% on "
          "seeds 0 and\n  1", S2_4K, tuple(pct(f"labels_of_the_2000_step_bases_runs/seed {s}/answer_is_queried_symbol")
                                       for s in (2, 0, 1))),
    Quote("docs/explicit.md", "label right, but {}% of them are then fixed points", S2_4K,
          (pct(f"{S2_STRICT}/labels_round_1/answer_is_queried_symbol"),)),
    Quote("docs/explicit.md", "held-out 1-hop direct accuracy\n  falls from {} to {}", S2_4K,
          (f"{S2_STRICT}/held_out_direct_acc_by_hops_per_round/0/1", f"{S2_STRICT}/held_out_direct_acc_by_hops_per_round/1/1")),
    Quote("docs/explicit.md", "(held-out {} / {} /\n  {} direct, {} with a rationale)", S2_4K,
          tuple(f"bases_4000_steps_1hop_only/seed {s}/gap_1hop/direct_base" for s in SEEDS)
          + ("bases_4000_steps_1hop_only/seed 0/gap_1hop/cot_base",)),
    Quote("docs/explicit.md", "At 2 hops it answers\n  directly {} / {} / {}, against {} / {} / {} with a rationale",
          S2_4K, tuple(f"{S2_4K_MD2}/seed {s}/gap_2hop/{w}" for w in ("direct_base", "cot_base") for s in SEEDS)),
    Quote("docs/explicit.md", "the round validation picks closes {}%, {}% and {}% of the 2-hop gap (median {}%)", S2_4K,
          tuple(pct(f"{S2_4K_MD2}/seed {s}/gap_2hop/gap_closed") for s in SEEDS) + (pct("gap_closed_2hop_median"),)),
    Quote("docs/explicit.md", "although\n  about {}% of its labels are right", S2_4K,
          (V(lambda r: 100 * min(at(r, f"{S2_4K_MD2}/seed {s}/labels_round_1/right") for s in SEEDS)),)),
    Quote(R_EXPL, "it: {}% of its self-consistent labels are the queried symbol", S2_4K,
          (pct("labels_of_the_2000_step_bases_runs/seed 2/answer_is_queried_symbol"),)),
    Quote(R_EXPL, "the round closes {}%, {}% and {}% of the 2-hop gap", S2_4K,
          tuple(pct(f"{S2_4K_MD2}/seed {s}/gap_2hop/gap_closed") for s in SEEDS)),
    Quote(README, "the round closes a median {}% of the 2-hop gap", S2_4K, (pct("gap_closed_2hop_median"),)),
    Quote(R_EXPL, "reach the gold answer ({} -> {} on seed 0, {} -> {} on seed 1)", EXPL,
          (ex_seed("star", "base", "cot", "0"), ex_seed("star", "chosen", "cot", "0"),
           ex_seed("star", "base", "cot", "1"), ex_seed("star", "chosen", "cot", "1"))),
    Quote(R_EXPL, "On the clean corpus they match an explicit rationale ({}-{} against {})", EXPL,
          (V(lambda r: min(clean_implicit(r))), V(lambda r: max(clean_implicit(r))),
           "groups/clean/star/median/base/cot/acc")),
    Quote("docs/explicit.md", "Quiet-STaR, with a thought before each answer token, is right on {}, {} and {} (seeds "
          "0-2)", EXPL, tuple(f"groups/clean/quietstar/per_seed/s{s}/quietstar_implicit/acc" for s in SEEDS)),
    Quote("docs/explicit.md", "Seed 1: {} -> {} (round {}; round {} reached {}, but validation had stopped improving)",
          EXPL, (ex_seed("star", "base", "cot", "1"), ex_seed("star", "chosen", "cot", "1"),
                 "groups/decoy/star/per_seed/s1/best_round", "groups/decoy/star/per_seed/s1/rounds_run",
                 ex_seed("star", "last_round", "cot", "1"))),
    Quote(R_EXPL, "exact match {}, at about {} tokens an answer", "gsm8k_zero_shot_cpu.json",
          ("em", "tokens_per_answer")),
    Table("docs/explicit_preference.md", "| model | cot acc | cot tokens/answer | sampled acc (T=1.5) | direct acc |",
          PREF, {
              "base": [pref_round("tpo", 0, "cot/acc"), pref_round("tpo", 0, "cot/tokens_per_answer"),
                       pref_round("tpo", 0, "sampled/acc"), pref_round("tpo", 0, "direct/acc")],
              "V-STaR generator, round 1 / 2": pref_row("vstar", (1, 2)),
              "TPO, round 1 / 2": pref_row("tpo", (1, 2)),
              "CPO, round 1": pref_row("cpo", (1,))}),
    Table("docs/explicit_preference.md", "| k | 1 | 2 | 4 | 8 | 16 |", PREF, {
        "best-of-k, ratio": best_of_k("best_of_k_ratio"), "best-of-k, likelihood": best_of_k("best_of_k_likelihood"),
        "majority vote": best_of_k("majority_vote"), "pass@k": best_of_k("pass_at_k")}),
    Quote("docs/explicit_preference.md", "verifier trained on {} pairs from both rounds, DPO loss {} -> {}", PREF,
          ("methods/vstar/best_of_k/pairs", "methods/vstar/best_of_k/loss_first", "methods/vstar/best_of_k/loss_last")),
    Quote("docs/explicit_preference.md", "After one round greedy cot falls to {} and after two to {}, while the DPO "
          "loss falls to {} and {} ({} pairs in round 1 and {} in round 2; {} and then {} of 1024 questions give "
          "no pair",
          PREF, (pref_round("tpo", 1, "cot/acc"), pref_round("tpo", 2, "cot/acc"), pref_round("tpo", 1, "loss_last"),
                 pref_round("tpo", 2, "loss_last"), pref_round("tpo", 1, "stats/pairs"),
                 pref_round("tpo", 2, "stats/pairs"), pref_round("tpo", 1, "skips/best and worst score the same"),
                 pref_round("tpo", 2, "skips/best and worst score the same"))),
    Quote("docs/explicit_preference.md", "their closing mark falls {} -> {} -> {} and tokens per answer rise {} -> {}",
          PREF, (*(pref_round("tpo", r, "cot/rationale_closed") for r in (0, 1, 2)),
                 pref_round("tpo", 0, "cot/tokens_per_answer"), pref_round("tpo", 2, "cot/tokens_per_answer"))),
    # ------------------------------------------------------------------ README: curriculum, evaluation, generation
    Quote(R_CUR, "It ended at a 3-hop thought NLL of {}, against {} for a fixed length of {} with the same FLOPs "
          "(261 steps)", CUR, (f"{CUR_END}/thought_nll/3", f"{CUR_FIXED}/thought_nll/3", f"{CUR_FIXED}/n_ahead")),
    Quote(R_CUR, "how well each length fits the chain, not progress: {} at {}, {} at {}", CUR,
          ("per_checkpoint/curriculum, end of stage 1 (step 60, n_ahead 11)/thought_nll/3",
           "per_checkpoint/curriculum, end of stage 1 (step 60, n_ahead 11)/n_ahead",
           "per_checkpoint/curriculum, end of stage 2 (step 120, n_ahead 9)/thought_nll/3",
           "per_checkpoint/curriculum, end of stage 2 (step 120, n_ahead 9)/n_ahead")),
    Table(R_EVAL, "| | base | 20 steps, no thought | 20 steps, with thought |", EVAL, {
        "GSM8K soft accuracy (first 200 test)": [pct("table/base/gsm8k_soft_acc_base"),
                                                 pct("table/trained/gsm8k_soft_acc_base"),
                                                 pct("table/trained/gsm8k_soft_acc_thought")],
        "CSQA soft accuracy (first 200 dev)": [pct("table/base/csqa_soft_acc_base"),
                                               pct("table/trained/csqa_soft_acc_base"),
                                               pct("table/trained/csqa_soft_acc_thought")],
        "GSM8K exact match, zero-shot CoT, 1 sample, <=64 tokens (first 50)": [
            em_count("base"), None, em_count("trained")],
        "held-out NLL, math_web last 30 records (nats/token)": ["table/base/nll_base", "table/trained/nll_base",
                                                                "table/trained/nll_thought"]}),
    Quote(R_EVAL, "moves the mixing weight only to about {}", EVAL, ("training/last/thought/mix_weight_mean",)),
    Quote(BENCH, "runs at {} / {} / {} of plain decoding's tokens/s for {} / {} / {}-token thoughts at batch 1, "
          "and {} / {} / {} at batch 8 (goal: 0.8/(length+1) = {} / {} / {}", GEN,
          (gen(1, 4), gen(1, 8), gen(1, 12), gen(1, 4, "thought_length"), gen(1, 8, "thought_length"),
           gen(1, 12, "thought_length"),
           gen(8, 4), gen(8, 8), gen(8, 12), gen(1, 4, "goal_ratio"), gen(1, 8, "goal_ratio"),
           gen(1, 12, "goal_ratio"))),
    # ------------------------------------------------------------------ docs/learning.md
    Table("docs/learning.md", "| prediction | answer NLL | accuracy | raw NLL |", LTT, {
        "after a thought": [ltt(m, "thought", "3") for m in ("answer_nll", "answer_acc", "answer_nll_raw")],
        "same model, no thought": [ltt(m, "no_thought", "3") for m in ("answer_nll", "answer_acc", "answer_nll_raw")],
        "baseline (same FLOPs)": [ltt(m, "baseline", "3") for m in ("answer_nll", "answer_acc", "answer_nll_raw")]}),
    Quote("docs/learning.md", "gives a 3-hop thought NLL of {}, against {}", VAR,
          (PW0, V(lambda r: load(LTT)["runs"]["0"]["answer_nll"]["thought"]["3"]))),
    Quote("docs/learning.md", "keeps {}% (entropy) and {}% (gate) of the all-positions answer-NLL gain at {}% of the "
          "FLOPs", WQ, (pct(wq("entropy", "kept_of_all_answer_gain")), pct(wq("gate", "kept_of_all_answer_gain")),
                        pct(wq("gate", "flops_of_all")))),
    Quote("docs/learning.md", "reaches only {}% of the answers (median); the gate, trained on the rewards the thoughts "
          "earn, reaches {}%", WQ, (pct(wq("entropy", "answer_think_share")), pct(wq("gate", "answer_think_share")))),
    Table("docs/learning.md", "| base-entropy quintile | entropy (nats) | NLL no thought | NLL thought | gain |", MW, {
        **{label: [tuple(f"result/entropy_buckets/{k}/base_entropy_range/{i}" for i in (0, 1)),
                   f"result/entropy_buckets/{k}/nll_base", f"result/entropy_buckets/{k}/nll_thought",
                   f"result/entropy_buckets/{k}/gain"]
           for k, label in enumerate(("0 (most confident)", "1", "2", "3", "4 (least confident)"))},
        "all": [None, "result/nll_base", "result/nll_thought", "result/gain"]}),
    Quote("docs/learning.md", "The prediction after a thought is better by {} nats per token", MW, ("result/gain",)),
    Quote("docs/learning.md", "and {}% of the records improve", MW, (pct("records_improved_share"),)),
    Quote("docs/learning.md", "(`record_bootstrap` in `quietstar/eval/nll.py`, which `python -m quietstar.eval nll` "
          "runs), is\n{}-{}.", MW, ("gain_ci95_record_bootstrap/0", "gain_ci95_record_bootstrap/1")),
    Quote("docs/learning.md", "Records 1,800-1,847, which training never saw, were then scored ({} tokens, 128 per "
          "record)", MW, ("result/tokens",)),
    Quote("docs/learning.md", "The mixing weight is {} after 40 steps", MW, ("train_final/thought/mix_weight_mean",)),
    Quote("docs/learning.md", "the gain is negative on the easiest fifth ({}) and {} on the hardest", MW,
          ("result/buckets/0/gain", "result/buckets/4/gain")),
    Quote("docs/learning.md", "It keeps {}-{}% of the 1-hop NLL gain and {}-{}% of the accuracy gain (3 seeds)", DIST,
          (kept_per_seed("nll", "1", min), kept_per_seed("nll", "1", max), kept_per_seed("acc", "1", min),
           kept_per_seed("acc", "1", max))),
    # ------------------------------------------------------------------ README, docs/learning.md: the RLP objective
    *(Table(doc, PD_HEADER, PD, PD_ROWS) for doc in (R_POLICY,)),
    Table("docs/learning.md", PD_HEADER, PD, PD_ROWS),
    *(Table(doc, PDCG_HEADER, PDCG, PDCG_ROWS) for doc in (README, R_POLICY)),
    Quote(README, "The pretrained models write the chain in {}%, {}% and {}% of\ntheir thoughts", PDCG_START,
          tuple(start_share(s) for s in (0, 1, 2))),
    Quote(R_POLICY, "the pretrained models write the chain in {}%, {}% and {}% of their thoughts", PDCG_START,
          tuple(start_share(s) for s in (0, 1, 2))),
    Quote(R_POLICY, "ends with {} / {} / {} 3-hop accuracy with a thought, {}, {} and {} below the run with it",
          PDCG, (*(f"per_run/{s}/policy_off/answer_acc/thought/3" for s in (0, 1, 2)),
                 *(V(lambda r, s=s: r["per_run"][s]["answer_acc"]["thought"]["3"]
                     - r["per_run"][s]["policy_off"]["answer_acc"]["thought"]["3"]) for s in (0, 1, 2)))),
    Quote(R_POLICY, "the chains before 3-hop answers end at {} / {} / {}", PDCG,
          tuple(f"per_run/{s}/policy_off/chain_share/after" for s in (0, 1, 2))),
    Quote(R_POLICY, "gets the same FLOPs ({} plain steps)", PDCG, ("compute/baseline_steps",)),
    Table(R_POLICY, "| seed, 2,000 steps | chain share | policy off | acc. with a thought | policy off | no thought | "
          "baseline |", PDCG2K, PDCG_ROWS),
    Quote(R_POLICY, "matched again: {}\nplain steps", PDCG2K, ("compute/baseline_steps",)),
    Quote(R_POLICY, "every seed's 3-hop accuracy with a thought is above 0.90 ({}, {}, {}), the chain\nshare is above "
          "90% on seeds 1 and 2 and {} on seed 0 (median {}), and the policy term off is\n{}-{} lower", PDCG2K,
          (*(f"per_run/{s}/answer_acc/thought/3" for s in (0, 1, 2)), "per_run/0/chain_share/after",
           V(lambda r: median([x["chain_share"]["after"] for x in r["per_run"]])),
           *(V(lambda r, f=f: f(x["answer_acc"]["thought"]["3"] - x["policy_off"]["answer_acc"]["thought"]["3"]
                                for x in r["per_run"])) for f in (min, max)))),
    Quote(README, "At 2,000 steps the accuracy with a thought is {},\n{} and {}", PDCG2K,
          tuple(f"per_run/{s}/answer_acc/thought/3" for s in (0, 1, 2))),
    Quote("docs/learning.md", "At step 1,000 the thoughts\nthat hold the chain are {}%, {}% and {}% of those before "
          "3-hop answers", PDISC, tuple(pct(lambda r, s=s: disc_ckpt(r, s, 1000)["chain_like_share"]["3"])
                                        for s in (0, 1, 2))),
    Quote("docs/learning.md", "RLP pays a thought that holds the chain {} nats before a 3-hop answer, advantage {}", PDISC,
          tuple(V(lambda r, f=f: r["rewards_by_kind_start"][0]["by_hops"]["3"]["chain_later"][f])
                for f in ("reward", "advantage"))),
    Quote("docs/learning.md", "But such thoughts are {}% of the samples there", PDISC,
          (pct(lambda r: r["rewards_by_kind_start"][0]["by_hops"]["3"]["chain_later"]["share"]),)),
    Table("docs/learning.md", "| seed | 1 hop | 2 hops | 3 hops |", PDCG_VAL,
          {str(s): [(close_adv(s, h, "chain"), close_adv(s, h, "decoy")) for h in ("1", "2", "3")] for s in (1, 2)}),
    Quote("docs/learning.md", "At one hop the chain now earns {} / {} nats against {} / {} without the close", PDCG_VAL,
          (V(lambda r: close_kind(r, 1, "1", "chain")["reward"]), V(lambda r: close_kind(r, 2, "1", "chain")["reward"]),
           *(V(lambda r, s=s: next(x for x in load("policy_decoy_rewards_cpu.json")["rewards_by_kind"]
                                   if x["seed"] == s)["by_hops"]["1"]["chain"]["reward"]) for s in (1, 2)))),
    Quote("docs/learning.md", "validation split from {} to {}, against {} with the policy term off, and restricting "
          "the policy term\nto the direct answers (the diagnosis objective of `bench/policy_positions.py`) gives {}",
          PDCG_VAL, (V(lambda r: close_kind(r, 1, "3", "chain")["share"]), val_share(1, "3"), val_share(0, "3"),
                     val_share(2, "3"))),
    Table("docs/learning.md", "| step | 200 | 400 | 600 | 800 | 1,000 |", PDCG_VAL,
          {"chain share": [val_share(i, "3") for i in range(4, 9)],
           "accuracy": [V(lambda r, i=i: r["checkpoints"][i]["answer_acc"]["thought"]["3"]) for i in range(4, 9)]}),
    Quote("docs/learning.md", "3-hop accuracy with a thought {} (median), against {} with the\npolicy term off", PDCG,
          ("answer_acc/thought/3", "policy_off/answer_acc/thought/3")),
    Quote(R_POLICY, "each gate picks {}-{}% of the 3-hop answers and {}-{}% of the 1-hop ones, and about {}% of its "
          "slots are direct answers", PDCG_START,
          tuple(V(lambda r, h=h, f=f: 100.0 * f(x["direct_answers_picked"][h] for x in r["gate_picks"][:3]))
                for h, f in (("3", min), ("3", max), ("1", min), ("1", max)))
          + (V(lambda r: 100.0 * median(x["slots_that_are_direct_answers"] for x in r["gate_picks"][:3])),)),
    Quote(R_POLICY, "met on seed 0 (0.997),\n  missed on seeds 1 ({}) and 2 ({})", PDCG,
          ("per_run/1/answer_acc/thought/3", "per_run/2/answer_acc/thought/3")),
    Table("docs/learning.md", "| seed | 3-hop chain share, pretrained | after (RLP) | after (policy_weight=0) | "
          "3-hop acc. with a thought (RLP) | (policy_weight=0) | no thought | baseline |", PDN,
          {str(s): pd_row(f"per_run/{s}/") for s in (0, 1)}),
    Quote(R_POLICY, "It takes the chains from {}% to {}% of the thoughts,\nand 3-hop accuracy with a thought to {}, "
          "against {} with the term off", PD,
          (pct("per_run/0/chain_share/before"), pct("per_run/0/chain_share/after"), "per_run/0/answer_acc/thought/3",
           "per_run/0/policy_off/answer_acc/thought/3")),
    Quote(R_POLICY, "write the correct chain in only {}-{}% of their\nthoughts before 3-hop answers, and the chain "
          "still gains them about {} nats on the answer", PD,
          (pct("per_run/2/chain_share/before"), pct("per_run/1/chain_share/before"),
           V(lambda r: load(PDD)["thought_gains"][1]["chain_gain_nats"]))),
    Quote("docs/learning.md", "raises the answer's log-probability by {} nats on\n  average, and the decoy by {}", PDD,
          ("thought_gains/1/chain_gain_nats", "thought_gains/1/decoy_gain_nats")),
    Quote("docs/learning.md", "reached 3-hop accuracy {} with a thought, against {} at 200 steps", PDD,
          ("checkpoints/1/answer_acc/thought/3", "checkpoints/0/answer_acc/thought/3")),
    Quote("docs/learning.md", "3-hop accuracy with a thought\n  {} (goal 0.90 on every seed), chain share {} (goal "
          "0.90), ablation {} lower (goal 0.2)", PD,
          ("answer_acc/thought/3", "chain_share/after",
           V(lambda r: r["answer_acc"]["thought"]["3"] - r["policy_off"]["answer_acc"]["thought"]["3"]))),
    Quote("docs/learning.md", "and the ablation goal with {}.", PD,
          (V(lambda r: at(r, "per_run/0/answer_acc/thought/3") - at(r, "per_run/0/policy_off/answer_acc/thought/3")),)),
    Table("docs/learning.md", "| thoughts G, length T | grid rows | step (s) | peak RSS (MB) | step time per row, vs "
          "G=2 T=8 |", THOUGHTS, {f"G={G} T={T}": [f"results/{i}/R", f"results/{i}/step_s", f"results/{i}/peak_rss_mb",
                                                 f"goals/G={G} T={T}/step_s per thought row / G=2 T=8's"]
                                  for i, (G, T) in enumerate([(2, 8), (4, 8), (8, 8), (16, 8), (4, 16), (4, 32)])}),
    # ------------------------------------------------------------------ docs: discovery and the policy weight
    Quote("docs/learning.md", "(chain share {} -> {}, and {} with the term off)", "policy_discovery_cpu.json",
          ("chain_share/before", "chain_share/after", "policy_off/chain_share/after")),
    Quote("docs/learning.md", "The 3-hop answer NLL is {} with a\nthought and {} without, so the thought adds nothing, "
          "and the 3-hop accuracy is {} in both runs", "policy_discovery_cpu.json",
          ("answer_nll/thought/3", "answer_nll/no_thought/3", "answer_acc/thought/3")),
    Quote("docs/learning.md", "and the 3-hop accuracy is {} in both runs", "policy_discovery_cpu.json",
          ("policy_off/answer_acc/thought/3",)),
    Table("docs/learning.md", "| n_ahead | sampled tokens | thoughts that restate the query | thoughts that hold the "
          "chain |", "policy_discovery_lengths_cpu.json",
          {str(T): [f"by_length/{i}/sampled_tokens", pct(f"by_length/{i}/restate_query"),
                    pct(f"by_length/{i}/contain_chain")] for i, T in enumerate((7, 12, 16))}),
    Quote("docs/learning.md", "one thought in {} holds the chain", "policy_discovery_lengths_cpu.json",
          (V(lambda r: 1 / r["by_length"][2]["contain_chain"]),)),
    Quote("docs/learning.md", "The 3-hop chain share\nwas {} at weight 1 after 200 steps. At weight 10 it was {} at "
          "step 100 and {} at step 200, and the\n3-hop accuracy with a thought stayed at {}",
          "policy_decoy_weight_cpu.json",
          ("rows/0/chain_share/3", "rows/1/chain_share/3", "rows/2/chain_share/3", "rows/2/answer_acc/thought/3")),
    Quote("docs/learning.md", "ends with a 3-hop thought NLL of {} and 3-hop accuracy {}. The\nofficial "
          "objective's seed-0 run ended at {}", "policy_clean_cpu.json",
          ("answer_nll/thought/3", "answer_acc/thought/3", V(lambda r: load(LTT)["runs"]["0"]["answer_nll"]["thought"]["3"]))),
    Quote("docs/learning.md", "the same stage with `policy_weight=0` ends at {}.", "policy_clean_cpu.json",
          ("policy_off/answer_nll/thought/3",)),
    Quote(R_LTT, "at 13 sampled tokens {}% of them do", "policy_discovery_lengths_cpu.json",
          (pct("by_length/2/contain_chain"),)),
    Table("docs/learning.md", "| model | NLL no thought | NLL after a thought | gain (95% interval) | GSM8K soft | "
          "CommonsenseQA soft |", PMW,
          {"before (the starting model)": ["models/before/nll_base", None, None, pmw_qa("before", "gsm8k"),
                                           pmw_qa("before", "csqa")],
           **{label: [f"models/{n}/nll_base", f"models/{n}/nll_thought",
                      (f"models/{n}/gain", f"models/{n}/gain_ci95_record_bootstrap/0",
                       f"models/{n}/gain_ci95_record_bootstrap/1"), pmw_qa(n, "gsm8k"), pmw_qa(n, "csqa")]
              for label, n in (("official", "official"), ("RLP", "rlp"), ("RLP, policy_weight=0", "policy_off"))},
           "continued pretraining": ["models/baseline/nll_base", None, None, pmw_qa("baseline", "gsm8k"),
                                     pmw_qa("baseline", "csqa")]}),
    Quote("docs/learning.md", "for RLP's model FLOPs (`baseline/`, {} steps)", PMW, ("compute/baseline_steps",)),
    Quote("docs/learning.md", "falls from {} nats to under 0.1 by step {}", PMW,
          ("training/official/first/thought/entropy_first_token", "training/official/entropy_under_0.1_at")),
    Quote("docs/learning.md", "the held-out NLL without a thought rises from {} to {}. The gain after a thought,\n  {}, "
          "is real but measured against that damaged prediction, which stays {} nats worse", PMW,
          ("models/before/nll_base", "models/official/nll_base", "models/official/gain",
           V(lambda r: r["models"]["official"]["nll_thought"] - r["models"]["before"]["nll_base"]))),
    Quote("docs/learning.md", "differ by {} nats on average at the end, and w grows to {} (the official\n  run's: {})",
          PMW, ("training/rlp/last/thought/reward_std", "training/rlp/last/thought/mix_weight_mean",
                "training/official/last/thought/mix_weight_mean")),
    Quote("docs/learning.md", "is\n  {} nats worse than no thought at the end of the run", PMW,
          (V(lambda r: -r["training"]["rlp"]["last"]["thought/reward_mean"]),)),
    Quote("docs/learning.md", "The held-out gain is {}, and the run without the policy term ends at {}", PMW,
          ("models/rlp/gain", "models/policy_off/gain")),
    Quote("docs/learning.md", "ends at {} without any thought, {} nats better than RLP's\n  prediction after a thought "
          "and {} better", PMW,
          ("models/baseline/nll_base", V(lambda r: r["models"]["rlp"]["nll_thought"] - r["models"]["baseline"]["nll_base"]),
           V(lambda r: r["models"]["policy_off"]["nll_thought"] - r["models"]["baseline"]["nll_base"]))),
    Quote("docs/learning.md", "CommonsenseQA's falls\n  from {} to {}-{} after the thought stages (scored after a "
          "thought) and to {} after", PMW,
          ("models/before/csqa_soft/no_thought",
           V(lambda r: min(r["models"][n]["csqa_soft"]["thought"] for n in ("official", "rlp", "policy_off"))),
           V(lambda r: max(r["models"][n]["csqa_soft"]["thought"] for n in ("official", "rlp", "policy_off"))),
           "models/baseline/csqa_soft/no_thought")),
    Quote("docs/learning.md", "at steps 100 and 200 it is {} and {} for the official objective, {} and {} for RLP,\nand "
          "{} and {} without the policy term", PMW,
          tuple(f"curves/{n}/{i}/gain" for n in ("official", "rlp", "policy_off") for i in (1, 2))),
    Quote(R_LTT, "continued pretraining with the same FLOPs ends at a\nheld-out NLL of {}, better than any "
          "model after a thought: {} for the official objective, whose\npolicy term at 1e6 collapses the thoughts and "
          "raises the model's own NLL from {}, and {} for RLP,\nwhose thoughts gain {} nats per token", PMW,
          ("models/baseline/nll_base", "models/official/nll_thought", "models/before/nll_base", "models/rlp/nll_thought",
           "models/rlp/gain")),
    Quote(R_POLICY, "(seed 0: 3-hop thought NLL {}\nagainst {})", "policy_clean_cpu.json",
          ("answer_nll/thought/3", V(lambda r: load(LTT)["runs"]["0"]["answer_nll"]["thought"]["3"]))),
    # ------------------------------------------------------------------ README and bench/README.md: timings
    *(Table(doc, LEAN_HEADER, LEAN, LEAN_ROWS) for doc in (README, BENCH)),
    Table(BENCH, "| think_fraction q | step | of the all-positions step | median of rounds | goal | peak RSS | "
          "generation |", "where_cost_cpu.json", {
              "all positions": [where_cost(0, "step_s"), None, None, None, where_cost(0, "peak_mem_mb", 1e-3),
                                where_cost(0, "gen_tokens_per_s")],
              **{label: [where_cost(i, "step_s"), f"summary/q={q}/time_ratio", f"median_of_rounds/q={q}/time_ratio",
                         f"summary/q={q}/goal_ratio", where_cost(i, "peak_mem_mb", 1e-3),
                         (where_cost(i, "gen_tokens_per_s"), where_cost(i, "gen_think_share", 100.0)) if q != "1.0"
                         else where_cost(i, "gen_tokens_per_s")]
                 for i, (label, q) in enumerate((("1.0 (subset grid of every position)", "1.0"), ("0.5", "0.5"),
                                                 ("0.25", "0.25"), ("0.1", "0.1")), start=1)}}),
    # ------------------------------------------------------------------ docs/learning.md: seeds 1 and 2
    Table("docs/learning.md", "| seed, hops | chain: share, reward, advantage | decoy: share, reward, advantage |",
          "policy_decoy_rewards_cpu.json", REWARD_ROWS),
    Table("docs/learning.md", "| run | seed 1 | seed 2 |", "policy_decoy_positions_cpu.json", POSITION_ROWS),
    Quote("docs/learning.md", "medians) the 3-hop thought NLL is {} and the accuracy {}, against {} with "
          "`policy_weight=0` and {} for the official objective's runs", "policy_clean_seeds_cpu.json",
          ("answer_nll/thought/3", "answer_acc/thought/3", "policy_off/answer_nll/thought/3",
           V(lambda r: load(LTT)["median"]["answer_nll"]["thought"]["3"]))),
    Quote("docs/learning.md", "chain share is {} -> {} ({} with the term off), and the 3-hop answer NLL is {} with a "
          "thought and {} without", "policy_discovery_seeds_cpu.json",
          ("chain_share/before", "chain_share/after", "policy_off/chain_share/after", "answer_nll/thought/3",
           "answer_nll/no_thought/3")),
    Quote("docs/learning.md", "At the start it is then paid more than a decoy ({} against {} nats, advantage {} against {})",
          "policy_decoy_rewards_cpu.json",
          tuple(V(lambda r, k=k, f=f: next(x for x in r["rewards_by_kind"] if "n_ahead=5" in x["settings"])
                  ["by_hops"]["1"][k][f])
                for k, f in (("chain", "reward"), ("decoy", "reward"), ("chain", "advantage"), ("decoy", "advantage")))),
    Quote("docs/learning.md", "the policy term leaves fewer 1-hop chains than no policy term ({} against {})",
          "policy_decoy_positions_cpu.json",
          tuple(V(lambda r, w=w: next(x for x in r["checkpoints"] if x["run"] == w)["chain_share"]["1"])
                for w in ("n_ahead=5 (2 sampled tokens: a 1-hop chain fits), RLP, the recipe",
                          "n_ahead=5 (2 sampled tokens: a 1-hop chain fits), policy term off"))),
    Quote("docs/learning.md", "Held-out, seeds 1 and 2 with the floor at 1.0 end with 3-hop chain shares of {} and {}, "
          "against {} and {} with the policy term off", "policy_decoy_floor1_cpu.json",
          ("per_run/0/chain_share/after", "per_run/1/chain_share/after",
           V(lambda r: r["per_run"][0]["policy_off"]["chain_share"]["after"]),
           V(lambda r: r["per_run"][1]["policy_off"]["chain_share"]["after"]))),
    # ------------------------------------------------------------------ docs/results/lm_eval.md
    Table(R_LM_EVAL, "| record | model | task | items | result |", LM_EVAL, {
        "`lm_eval_cpu.json`": [None, None, ("questions", "requests"),
                               (V("max_abs_logprob_diff_nats", bound=True), "requests_per_s/quietstar", "requests_per_s/hf")],
        "`lm_eval_csqa_smollm2_base_cpu.json`": [None, None, recorded(LM_EVAL_CSQA, "questions"),
                                                 recorded(LM_EVAL_CSQA, "acc", 100.0)],
        "`lm_eval_csqa_smollm2_base_counts_cpu.json`": [None, None, recorded(LM_EVAL_COUNTS, "items"),
                                                        (recorded(LM_EVAL_COUNTS, "chosen/A"),
                                                         recorded(LM_EVAL_COUNTS, "targets/A"))],
        "`lm_eval_csqa_default_run_cpu.json`": [None, None, recorded(LM_EVAL_DEFAULT_RUN, "items"),
                                                (recorded(LM_EVAL_DEFAULT_RUN, "scores/acc,none", 100.0),
                                                 recorded(LM_EVAL_DEFAULT_RUN, "chosen/A"))],
        "`lm_eval_gsm8k_smollm2_base_cpu.json`": [None, None, recorded(LM_EVAL_GSM8K, "items"),
                                                  (recorded(LM_EVAL_GSM8K, "scores/exact_match,strict-match", 100.0),
                                                   recorded(LM_EVAL_GSM8K, "scores/exact_match,flexible-extract", 100.0))],
        "`lm_eval_gsm8k_default_run_cpu.json`": [None, None, recorded(LM_EVAL_GSM8K_RUN, "items"),
                                                 (recorded(LM_EVAL_GSM8K_RUN, "scores/exact_match,strict-match", 100.0),
                                                  recorded(LM_EVAL_GSM8K_RUN, "scores/exact_match,flexible-extract", 100.0))],
        "`lm_eval_gsm8k_rlp_math_web_cpu.json`": [None, None, recorded(LM_EVAL_GSM8K_RLP, "items"),
                                                  (recorded(LM_EVAL_GSM8K_RLP, "scores/exact_match,strict-match", 100.0),
                                                   recorded(LM_EVAL_GSM8K_RLP, "scores/exact_match,flexible-extract",
                                                            100.0))],
        "`lm_eval_csqa_rlp_math_web_cpu.json`": [None, None, recorded(LM_EVAL_RLP, "items"),
                                                 (recorded(LM_EVAL_RLP, "scores/acc,none", 100.0),
                                                  recorded(LM_EVAL_RLP, "chosen/A"))]}),
    Quote(R_LM_EVAL, "([policy.md](policy.md)): A on all {} again", LM_EVAL_RLP, ("chosen/A",)),
    Quote(R_LM_EVAL, "After the RLP objective's 200 steps on math\nweb text, {} of {} are right in the strict format and {} "
          "with the flexible extraction. Problem {} is among them",
          LM_EVAL_GSM8K_RLP,
          (V(lambda r: round(r["scores"]["exact_match,strict-match"] * r["items"])), "items",
           V(lambda r: len(right_problems(r))),
           V(lambda r: one(right_problems(r) & right_problems(load(LM_EVAL_GSM8K)) & right_problems(load(LM_EVAL_GSM8K_RUN)))))),
    Quote(R_LM_EVAL, "with a thought before every generated token, {} of {} are right in both formats", LM_EVAL_GSM8K_RUN,
          (V(lambda r: sum(x["strict-match"]["exact_match"] == 1.0 and x["flexible-extract"]["exact_match"] == 1.0
                           for x in r["items_scored"])), "items")),
    Quote(R_LM_EVAL, "Both models get\nproblem {} right, and each gets one other (the base problem {}, the thinking "
          "model problem {})", LM_EVAL_GSM8K_RUN,
          (V(lambda r: one(right_problems(r) & right_problems(load(LM_EVAL_GSM8K)))),
           V(lambda r: one(right_problems(load(LM_EVAL_GSM8K)) - right_problems(r))),
           V(lambda r: one(right_problems(r) - right_problems(load(LM_EVAL_GSM8K)))))),
    Quote(R_LM_EVAL, "Thinking at every token costs {} s a problem (one thread, batches of\n{}, beside other jobs), "
          "against the base model's {} s (batches of {})", LM_EVAL_GSM8K_RUN,
          (V(lambda r: r["seconds"] / r["items"]), "batch_size", recorded(LM_EVAL_GSM8K, "seconds", 1 / 200),
           recorded(LM_EVAL_GSM8K, "batch_size"))),
    Quote(R_LM_EVAL, "{} of {}\nanswers is right in lm_eval's strict format, and {} with its flexible extraction",
          LM_EVAL_GSM8K, (V(lambda r: round(r["scores"]["exact_match,strict-match"] * r["items"])), "items",
                          V(lambda r: round(r["scores"]["exact_match,flexible-extract"] * r["items"])))),
    Quote(R_LM_EVAL, "zero-shot CoT scoring gives {}% on the same problems", "gsm8k_zero_shot_cpu.json", (V("em", 100.0),)),
    Quote(R_LM_EVAL, "with a thought before every continuation token, they do not: A is still chosen on all {}",
          LM_EVAL_DEFAULT_RUN, ("chosen/A",)),
    Quote(R_LM_EVAL, "letter A the highest log-likelihood on every one of the {} questions. Its {}% is the share",
          LM_EVAL_COUNTS, ("chosen/A", V("scores/acc,none", 100.0))),
]


def documents() -> list[str]:
    """Every document whose quoted numbers are checked: README.md, bench/README.md, each docs/results page, and
    the other docs pages the checks name."""
    pages = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs" / "results").glob("*.md"))
    named = sorted({c.doc for c in CHECKS} - {README, BENCH, *pages})
    return [README, BENCH, *pages, *named]


DOCS = documents()


def coverage_problems() -> list[str]:
    """A checked document with no check at all (a new results page has to be mapped), and a record file that a
    document names but bench/results does not hold."""
    problems = [f"{doc}: no table or quote of it is checked" for doc in DOCS
                if not any(c.doc == doc for c in CHECKS)]
    for doc in DOCS:
        for name in sorted(set(re.findall(r"bench/results/([\w.-]+\.(?:json|png))", read_doc(doc)))):
            if not (RESULTS / name).exists():
                problems.append(f"{doc}: names bench/results/{name}, which does not exist")
    return problems


def main() -> int:
    problems = [p for c in CHECKS for p in check(c)] + coverage_problems()
    for p in problems:
        print(p)
    counts = ", ".join(f"{doc} {sum(c.doc == doc for c in CHECKS)}" for doc in DOCS)
    print(f"{len(CHECKS)} tables and quotes checked ({counts}), {len(problems)} mismatches")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
