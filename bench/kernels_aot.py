"""Compile every thought-attention kernel ahead of time for sm_80 and sm_90 and tabulate what it uses.

Every launch the dispatch can make (kernels/aot.py: each kernel and constexpr branch, each autotune config
its pruner can keep, bf16 / fp16, the head dims of the model presets) is compiled by Triton for both
targets without a GPU; the table gives shared memory against the target's limit, registers and spill bytes
from ptxas. It shows that the kernels compile and fit, not that they run correctly on a GPU (they never have).
The record also holds fp32 rows, compiled when fp32 was still a CUDA dtype: they are why it no longer is.

    python bench/kernels_aot.py                 # every job -> bench/results/kernels_aot.json (1-2 h, 2 cores)
    python bench/kernels_aot.py --dtype bf16 --head-dim 128 --processes 4 --out /tmp/aot.json
    python bench/kernels_aot.py --resume        # compile only the jobs the record does not have yet
    python bench/kernels_aot.py --recheck       # re-apply the limits and ACCEPTED_SPILLS to the recorded numbers
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import triton

from quietstar.kernels import aot
from quietstar.provenance import write_record

OUT = Path(__file__).resolve().parent / "results" / "kernels_aot.json"
COLUMNS = ["kernel", "variant", "config", "dtype", "head_dim", "target", "shared", "shared_limit", "registers",
           "spill_stores", "spill_loads", "status"]


def row(job: aot.Job, result: dict) -> dict:
    """A job's coordinates, what its compile used and the limits it breaks ("ok" if none)."""
    problems = aot.check(job, result)
    spilled = "error" not in result and result["spill_stores"] + result["spill_loads"] > 0
    status = "; ".join(problems) or ("ok (accepted spills)" if spilled else "ok")
    return {"kernel": job.kernel, "variant": job.variant, "config": job.config, "dtype": job.dtype,
            "head_dim": job.head_dim, "target": f"sm_{job.arch}", "shared": result.get("shared"),
            "shared_limit": aot.SHARED_LIMIT[job.arch], "registers": result.get("registers"),
            "spill_stores": result.get("spill_stores"), "spill_loads": result.get("spill_loads"), "status": status}


def unrow(r: dict) -> tuple[aot.Job, dict]:
    """Inverse of row: the job and the compile result it was made from."""
    job = aot.Job(r["kernel"], r["variant"], r["config"], r["dtype"], r["head_dim"], int(r["target"][3:]))
    if r["shared"] is None:
        return job, {"error": r["status"].removeprefix("compile error: ")}
    return job, {k: r[k] for k in ("shared", "registers", "spill_stores", "spill_loads")}


def record(rows: list[dict], n_jobs: int) -> dict:
    return {
        "what": "AOT compile of kernels/thought_attention.py (Triton, no GPU): resources per kernel launch",
        "triton": triton.__version__,
        "targets": {f"sm_{a}": {"shared_limit": aot.SHARED_LIMIT[a]} for a in aot.TARGETS},
        "head_dims": {D: preset for D, (preset, _, _) in aot.head_dims().items()},
        "accepted_spills": {"dtypes": ["bf16", "fp16"], "max_bytes": aot.ACCEPTED_SPILL_BYTES, "configs": [
            {"kernel": k, "head_dim": D, "target": f"sm_{a}", "configs": list(configs), "why": why}
            for (k, D, a), (configs, why) in aot.ACCEPTED_SPILLS.items()]},
        "complete": len(rows) == n_jobs, "jobs": n_jobs, "compiled": len(rows),
        "failed": sum(not r["status"].startswith("ok") for r in rows), "rows": rows}


def table(rows: list[dict]) -> str:
    cells = [COLUMNS] + [["" if r[c] is None else str(r[c]) for c in COLUMNS] for r in rows]
    width = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS) - 1)]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, width)) + "  " + line[-1] for line in cells)


def compile_all(args) -> dict:
    jobs = aot.enumerate_jobs(args.dtype or tuple(aot.DTYPES), args.head_dim)
    results, earlier = {}, []
    if args.resume and args.out.exists():  # keep what an interrupted run of the same jobs compiled
        old = json.loads(args.out.read_text())
        ids = {j.id for j in jobs}
        results = {job.id: result for job, result in map(unrow, old["rows"]) if job.id in ids}
        earlier = old.get("earlier_provenance", []) + [old["provenance"]]
    # bf16/fp16 first, fp32 (slow where it spills) last, largest head dim first; the record is rewritten
    # every 50 results, with "complete": false until every job is in
    todo = sorted((j for j in jobs if j.id not in results), key=lambda j: (j.dtype == "fp32", -j.head_dim))

    def rec():
        out = record([row(j, results[j.id]) for j in jobs if j.id in results], len(jobs))
        return {"earlier_provenance": earlier, **out} if earlier else out

    def progress(job, result):
        results[job.id] = result
        print(f"[{len(results)}/{len(jobs)}] {job.id}: {'; '.join(aot.check(job, result)) or 'ok'} "
              f"{json.dumps(result)}", flush=True)
        if len(results) % 50 == 0:
            write_record(args.out, rec(), seeds=[])

    aot.compile_jobs(todo, args.processes, on_result=progress, timeout=args.timeout)
    return rec()


def recheck(path: Path) -> dict:
    """The record at `path` with every status recomputed by the current aot.check; its compile's
    provenance is kept as "compile_provenance"."""
    old = json.loads(path.read_text())
    rec = record([row(*unrow(r)) for r in old["rows"]], old["jobs"])
    kept = {k: old[k] for k in ("earlier_provenance",) if k in old}
    return {"compile_provenance": old.get("compile_provenance", old["provenance"]), **kept, **rec}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", action="append", choices=list(aot.DTYPES), help="only these dtypes (repeatable)")
    p.add_argument("--head-dim", action="append", type=int, help="only these head dims (repeatable)")
    p.add_argument("--processes", type=int, default=2, help="compile worker processes")
    p.add_argument("--timeout", type=float, default=900, help="seconds one compile may take")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--resume", action="store_true", help="keep the jobs the record at --out has; compile the rest")
    p.add_argument("--recheck", action="store_true", help="recompute the statuses of the record at --out")
    args = p.parse_args(argv)
    if args.recheck:
        rec = recheck(args.out)
    else:
        reason = aot.ptxas_available()
        if reason:
            print(reason, file=sys.stderr)
            return 2
        rec = compile_all(args)
    write_record(args.out, rec, seeds=[])
    print(table(rec["rows"]))
    print(f"\n{rec['compiled']} of {rec['jobs']} jobs compiled, {rec['failed']} failed; written to {args.out}")
    return 1 if rec["failed"] or not rec["complete"] else 0


if __name__ == "__main__":
    sys.exit(main())
