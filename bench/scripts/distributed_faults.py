"""Faults on a 2-process torchrun job (gloo, CPU, tiny model): what happens and how long recovery takes.

    python bench/scripts/distributed_faults.py [--source DIR] [--label NAME] [--out bench/results/distributed_faults_cpu.json]

--source runs the code of another checkout (PYTHONPATH=DIR; e.g. an exported earlier commit) so that the
same faults are measured before and after a change; each run adds its results under `label` in the record.

  elastic_restart   torchrun --max-restarts=1, DDP, 40 steps, a checkpoint every 4, the default output dir;
                    worker 1 SIGKILLed once step 8's checkpoint exists. Measured: the exit status, the steps
                    logged, seconds from the kill to the first step logged after it and to the end; with
                    `compare`, whether the losses equal an uninterrupted run's bit for bit.
  locked_run_dir    the same job into a run dir whose lock another process holds: seconds to exit, the
                    `error:` lines, and whether a worker printed a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from quietstar.provenance import write_record  # noqa: E402

JOB = ["dist=ddp", "model=tiny", "logger=none", "train.max_steps=40", "checkpoint.every=4", "train.progress=false",
       "train.device=cpu"]
SEED = 42  # configs/train.yaml's train.seed


def torchrun(source: Path, cwd: Path, *args, restarts=0):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(source)}
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           f"--max-restarts={restarts}", str(source / "train.py"), *JOB, *args]
    out, err = open(cwd / "stdout", "w"), open(cwd / "stderr", "w")
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err, start_new_session=True)


def stop(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def steps_logged(cwd: Path) -> list[dict]:
    files = list(cwd.glob("outputs/*/*/metrics.jsonl"))
    return [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]


def worker(cwd: Path, local_rank: int) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and os.readlink(d / "cwd") == str(cwd):
                env = (d / "environ").read_bytes().split(b"\0")
                if f"LOCAL_RANK={local_rank}".encode() in env and b"TORCHELASTIC_RESTART_COUNT=0" in env:
                    pids.append(int(d.name))
        except OSError:
            continue
    return pids


def elastic_restart(source: Path, limit: float) -> dict:
    cwd = Path(tempfile.mkdtemp(prefix="elastic-"))
    t0 = time.time()
    proc = torchrun(source, cwd, restarts=1)
    killed = first_after = None
    n_at_kill = 0
    try:
        while proc.poll() is None and time.time() - t0 < limit:
            if killed is None and list(cwd.glob("outputs/*/*/checkpoints/step_0000008/manifest.json")):
                pids = worker(cwd, 1)
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                if pids:
                    killed, n_at_kill = time.time(), len(steps_logged(cwd))
            if killed is not None and first_after is None and len(steps_logged(cwd)) > n_at_kill:
                first_after = time.time()
            time.sleep(0.02)
    finally:
        finished = proc.poll() is not None
        stop(proc)
    end = time.time()
    records = steps_logged(cwd)
    steps = sorted({r["step"] for r in records})
    stdout, stderr = (cwd / "stdout").read_text(), (cwd / "stderr").read_text()
    return {"exit_status": proc.returncode if finished else None, "finished_within_s": limit if not finished else None,
            "run_dirs": len(list(cwd.glob("outputs/*/*"))), "steps_logged": len(steps), "last_step": max(steps, default=0),
            "records": len(records), "kill_to_first_new_step_s": None if first_after is None else first_after - killed,
            "kill_to_end_s": None if killed is None else end - killed, "steps_at_kill": n_at_kill,
            "resumed_line": next((line for line in stdout.splitlines() if line.startswith("resumed from")), None),
            "worker_errors": [line[:200] for line in stderr.splitlines() if line.startswith(("RuntimeError", "error:"))][:4],
            "losses": [r["loss"] for r in sorted(records, key=lambda r: r["step"])], "cwd": str(cwd)}


def uninterrupted(source: Path) -> list[float]:
    cwd = Path(tempfile.mkdtemp(prefix="whole-"))
    proc = torchrun(source, cwd)
    try:
        proc.wait(timeout=600)
    finally:
        stop(proc)
    return [r["loss"] for r in sorted(steps_logged(cwd), key=lambda r: r["step"])]


def locked_run_dir(source: Path) -> dict:
    import fcntl

    cwd = Path(tempfile.mkdtemp(prefix="locked-"))
    run = cwd / "run"
    run.mkdir()
    fd = os.open(run / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, f"{os.getpid()}\n".encode())
    t0 = time.time()
    proc = torchrun(source, cwd, f"hydra.run.dir={run}")
    try:
        proc.wait(timeout=300)
    finally:
        stop(proc)
        os.close(fd)
    stderr = (cwd / "stderr").read_text()
    return {"exit_to_s": time.time() - t0, "error_lines": [line for line in stderr.splitlines() if line.startswith("error:")],
            "hydra_error_executing_job": stderr.count("Error executing job"),
            "worker_traceback": "quietstar/" in stderr, "worker_exit_codes": sorted(
                int(line.split(":")[1].split()[0]) for line in stderr.splitlines() if line.strip().startswith("exitcode"))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", type=Path, default=ROOT)
    ap.add_argument("--label", default="now")
    ap.add_argument("--compare", action="store_true", help="also run the job uninterrupted and compare the losses")
    ap.add_argument("--limit", type=float, default=150.0, help="seconds before an elastic run counts as hung")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "distributed_faults_cpu.json")
    args = ap.parse_args()
    result = {"elastic_restart": elastic_restart(args.source.resolve(), args.limit),
              "locked_run_dir": locked_run_dir(args.source.resolve())}
    if args.compare:
        whole = uninterrupted(args.source.resolve())
        got = result["elastic_restart"]["losses"]
        result["elastic_restart"]["bitwise_equal_to_uninterrupted"] = got == whole
        result["elastic_restart"]["uninterrupted_steps"] = len(whole)
    record = json.loads(args.out.read_text()) if args.out.is_file() else {}
    record.setdefault("runs", {})[args.label] = result
    record["job"] = "torchrun --standalone --nproc_per_node=2 train.py " + " ".join(JOB)
    write_record(args.out, record, seeds=[SEED], command=sys.argv)
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "losses"} for k, v in result.items()}, indent=1))


if __name__ == "__main__":
    main()
