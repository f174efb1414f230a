"""The training step of the tree as it is against the tree from before the package was split into a core and
methods/ (commit REFERENCE): the same loss and the same gradients, bit for bit, on the tiny model, for the
official objective, RLP with its EMA teacher, selective thinking and the plain LM.

Each tree runs tests/step_digest.py in its own process on one thread; the older tree comes from `git archive`,
so the test skips where the checkout has no git history (a source archive or a shallow clone)."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = "707550fd2dea45d7bbd3ebb090b85fb2b53cc2cd"  # the last commit with quietstar/thinker.py at the top


def digests(tree: Path, cwd: Path) -> dict:
    p = subprocess.run([sys.executable, str(ROOT / "tests" / "step_digest.py"), str(tree)], capture_output=True,
                       text=True, cwd=cwd, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def reference_tree(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", REFERENCE, "quietstar", "kernels"],
                                 capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"git archive: {e}")
    if archive.returncode != 0:
        pytest.skip(f"no commit {REFERENCE[:7]} in this checkout: {archive.stderr.decode()[-200:]}")
    tar = out / "tree.tar"
    tar.write_bytes(archive.stdout)
    with tarfile.open(tar) as t:
        t.extractall(out, filter="data")
    return out


def test_the_step_is_bitwise_the_one_before_the_split(reference_tree, tmp_path):
    before, now = digests(reference_tree, tmp_path), digests(ROOT, tmp_path)
    assert sorted(before) == sorted(now) == ["official", "plain", "rlp_ema", "where_entropy"]
    for case in before:
        assert now[case]["loss"] == before[case]["loss"], case
        assert now[case]["grads"].keys() == before[case]["grads"].keys(), case
        changed = [k for k, h in now[case]["grads"].items() if h != before[case]["grads"][k]]
        assert not changed, f"{case}: gradients differ in {changed}"
        assert len(now[case]["grads"]) > 5, case  # the digests cover the model, not an empty set
