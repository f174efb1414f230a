"""Where a recorded number came from: the one writer of every bench/results/*.json.

    from quietstar.provenance import write_record
    write_record("bench/results/thing_cpu.json", {"results": ...}, seeds=[0, 1, 2])

`write_record` puts a `provenance` block first in the record:

    command   the command line that produced it (sys.argv as typed, unless given)
    commit    `git rev-parse HEAD` of the checkout the code ran from, and `dirty`: uncommitted changes to
              tracked files (then the numbers are of a commit plus a diff, and say so)
    date      ISO 8601, local time with its offset
    machine   CPU model, logical cores, torch's threads, torch / Python / platform versions, the GPU if any
    seeds     the seeds the numbers depend on ([] for a measurement that draws none, such as a timing)

`provenance()` returns the block alone, for records that are assembled elsewhere. `write_json` is the atomic
writer under both: the text is made first, written to a temporary file beside the target and renamed over
it, so a failed or interrupted write leaves the old file as it was. Tensors, paths and numpy scalars in a
record are written as plain JSON values.

Records written before this module carry a block backfilled from git history: their `commit` is the commit
that recorded the file (`recorded_with` says so), not one read at run time.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]


def git_commit(repo: Path = REPO) -> dict:
    """{"commit": sha or None, "dirty": bool or None}: None where `repo` is not the top of a git checkout (an
    installed package, or a copied tree inside some other repository, is not that repository's commit)."""
    def git(*args):
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30)

    try:
        top = git("rev-parse", "--show-toplevel")
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != Path(repo).resolve():
            return {"commit": None, "dirty": None}
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:  # a repository without commits
            return {"commit": None, "dirty": None}
        status = git("status", "--porcelain", "--untracked-files=no")
        return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def machine() -> dict:
    """The CPU (model, logical cores), torch's thread count and versions; the GPU where CUDA is up."""
    import torch

    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        pass
    info = {"cpu": cpu or platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def provenance(seeds: Iterable[int], command: Optional[Sequence[str] | str] = None) -> dict:
    """The block `write_record` adds: command, commit, dirty, date, machine, seeds."""
    if command is None:
        command = _command_line()
    if not isinstance(command, str):
        command = shlex.join(str(c) for c in command)
    now = datetime.datetime.now().astimezone()
    return {"command": command, **git_commit(), "date": now.isoformat(timespec="seconds"),
            "machine": machine(), "seeds": sorted({int(s) for s in seeds})}


def _command_line() -> list[str]:
    """sys.argv as it was typed: `python -m pkg.mod args` for a module run, `python script.py args` else."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        name = spec.name.removesuffix(".__main__")
        return ["python", "-m", name, *sys.argv[1:]]
    argv0 = sys.argv[0] if sys.argv else ""
    try:  # a script under the checkout, as typed from its root
        argv0 = str(Path(argv0).resolve().relative_to(REPO)) if argv0 not in ("", "-c") else argv0
    except ValueError:
        pass
    return ["python", argv0, *sys.argv[1:]]


def write_record(path, record: dict, *, seeds: Iterable[int],
                 command: Optional[Sequence[str] | str] = None) -> Path:
    """Write `record` to `path` with its provenance block first (a `provenance` key in `record` is replaced);
    returns the path."""
    body = {k: v for k, v in record.items() if k != "provenance"}
    return write_json(path, {"provenance": provenance(seeds, command), **body})


def write_json(path, obj) -> Path:
    """`obj` as JSON (indent 1) at `path`, atomically: nothing is touched until the text is made, and the file
    is renamed into place whole."""
    path = Path(path)
    text = json.dumps(obj, indent=1, default=jsonable) + "\n"  # a value that cannot be written fails here
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def jsonable(x):
    """json.dump's `default`: paths as strings, tensors and numpy arrays or scalars as lists or numbers."""
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "tolist"):
        return x.tolist()
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
