"""The run directory: one run per directory, and resuming an earlier step into the run it came from.

A run holds `RunLock` on its output dir (`<run dir>/.lock`, flock), so two runs never write into one dir;
`recover_run` finishes or rolls back an interrupted save in a run no live process holds. Resuming step N
into its own run sets the later checkpoints and metrics records aside (`set_aside_later`), deleting nothing.
The checkpoints themselves (checkpoints/step_N/) are checkpoint.py's.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

from quietstar.checkpoint import STEP_PREFIX, fsync_dir, fsync_file, recover_checkpoints, step_dir_name, step_of
from quietstar.errors import UserError

LOCK_NAME = ".lock"


class RunDirInUse(UserError):
    """Another live process holds the run dir's lock."""


class RunLock:
    """An exclusive advisory lock on a run dir: `<run dir>/.lock` (flock), holding the owner's pid.

    Taken by train.py before it writes anything into the dir; a second run into the same dir fails at once,
    naming the holder's pid. The lock is released by `release()` or when the process ends (even by SIGKILL),
    so a crashed run never leaves a stale lock behind."""

    def __init__(self, run_dir):
        self.path = Path(run_dir) / LOCK_NAME
        self.fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirInUse(f"{self.path.parent}: in use by another run (pid {holder}); wait for it to end or "
                              "choose another output dir (hydra.run.dir=...)") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()

    def __del__(self):
        self.release()


def recover_run(path) -> list[str]:
    """`recover_checkpoints` for the run holding checkpoint `path`, if no live process holds its lock."""
    path = Path(path).expanduser()
    root = path.parent if path.name.startswith(STEP_PREFIX) else (
        path / "checkpoints" if (path / "checkpoints").is_dir() else path)
    run_dir = root.parent if root.name == "checkpoints" else root
    if not root.is_dir():
        return []
    try:
        with RunLock(run_dir):
            return recover_checkpoints(root)
    except (RunDirInUse, OSError):  # a live run (or a read-only dir): leave it as it is
        return []


def set_aside_later(ckpt_root, step: int, metrics_file: Optional[Path] = None) -> Optional[Path]:
    """Resuming step `step` into the run it came from: move that run's later checkpoints, and the records of
    later steps in its metrics.jsonl (and samples.jsonl beside it), into
    `<ckpt_root>/abandoned_after_step_N_<time>/`, so the resumed timeline never mixes with the abandoned one
    and nothing is deleted. -> that dir, or None."""
    root = Path(ckpt_root)
    later = sorted(p for p in root.glob(f"{STEP_PREFIX}*") if p.is_dir() and step_of(p) > step)
    files = [] if metrics_file is None else [Path(metrics_file), Path(metrics_file).with_name("samples.jsonl")]
    splits = [(f, *_split_metrics(f, step)) for f in files]
    if not later and not any(dropped for _, _, dropped in splits):
        return None
    dest = root / f"abandoned_after_{step_dir_name(step)}_{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    dest.mkdir(parents=True)
    for p in later:
        os.rename(p, dest / p.name)
    for f, kept, dropped in splits:
        if not dropped:
            continue
        (dest / f.name).write_text("".join(dropped))
        fsync_file(dest / f.name)
        tmp = f.with_name(f.name + ".tmp")
        tmp.write_text("".join(kept))
        fsync_file(tmp)
        os.replace(tmp, f)
    fsync_dir(dest)
    fsync_dir(root)
    return dest


def _split_metrics(metrics_file: Optional[Path], step: int) -> tuple[list[str], list[str]]:
    """The lines of metrics.jsonl up to `step`, and those after it."""
    if metrics_file is None or not Path(metrics_file).is_file():
        return [], []
    kept, dropped = [], []
    for line in Path(metrics_file).read_text(errors="replace").splitlines(keepends=True):
        try:
            later = int(json.loads(line).get("step", 0)) > step
        except (ValueError, TypeError, AttributeError):
            later = False
        (dropped if later else kept).append(line)
    return kept, dropped
