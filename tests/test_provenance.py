"""quietstar/provenance.py: every recorded number says its command, commit, date, machine and seeds; the
writer puts that block first and replaces a file only whole; every record in bench/results/ carries one and
every script that writes there goes through the writer."""

import datetime
import json
import re
import shlex
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from quietstar import provenance
from quietstar.tokenizer import ByteTokenizer
from quietstar.eval import common
from quietstar.model import ModelConfig, Transformer
from quietstar.provenance import write_record
from quietstar.methods.quietstar.thinker import QuietStar
from quietstar.methods.quietstar.config import ThoughtConfig

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BLOCK = ["command", "commit", "dirty", "date", "machine", "seeds"]


def git(*args):
    try:
        out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30)
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


# ---------------------------------------------------------------------------------------- the writer


def test_write_record_puts_the_block_first(tmp_path):
    path = tmp_path / "sub" / "r.json"
    write_record(path, {"x": torch.tensor([1.5, 2.0]), "where": Path("a/b"), "provenance": "stale"}, seeds=[2, 0, 2],
                 command=["python", "bench/x.py", "--name", "a b"])
    text = path.read_text()
    rec = json.loads(text)
    assert list(rec) == ["provenance", "x", "where"] and rec["x"] == [1.5, 2.0] and rec["where"] == "a/b"
    block = rec["provenance"]
    assert list(block) == BLOCK
    assert block["command"] == "python bench/x.py --name 'a b'"
    assert block["seeds"] == [0, 2]
    assert block["commit"] == git("rev-parse", "HEAD")  # None outside a checkout, as git_commit says
    assert (block["dirty"] is None) == (block["commit"] is None)
    when = datetime.datetime.fromisoformat(block["date"])
    assert when.tzinfo is not None and abs((datetime.datetime.now().astimezone() - when).total_seconds()) < 600
    assert block["machine"]["torch"] == torch.__version__ and block["machine"]["cpu"]
    assert block["machine"]["threads"] == torch.get_num_threads()
    assert text.startswith('{\n "provenance": {\n  "command": ') and text.endswith("}\n")  # indent 1


def test_only_the_top_of_a_checkout_names_a_commit(tmp_path):
    assert provenance.git_commit(tmp_path) == {"commit": None, "dirty": None}
    assert provenance.git_commit(ROOT / "bench") == {"commit": None, "dirty": None}  # inside it: not its own commit
    assert provenance.git_commit(ROOT)["commit"] == git("rev-parse", "HEAD")


def test_a_failed_write_leaves_the_old_record_whole(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    write_record(path, {"n": 1}, seeds=[])
    old = path.read_text()
    with pytest.raises(TypeError, match="not JSON serialisable: object"):
        write_record(path, {"n": 2, "bad": object()}, seeds=[])
    assert path.read_text() == old

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(provenance.os, "replace", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_record(path, {"n": 3}, seeds=[])
    assert path.read_text() == old and [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary left


def test_the_command_defaults_to_the_script_as_typed_from_the_root(monkeypatch):
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))  # a script run: no __spec__
    monkeypatch.setattr(sys, "argv", [str(ROOT / "bench" / "bench_where.py"), "--rounds", "5"])
    assert provenance.provenance([])["command"] == "python bench/bench_where.py --rounds 5"
    module = types.ModuleType("__main__")
    module.__spec__ = types.SimpleNamespace(name="quietstar.methods.distill.recipe")
    monkeypatch.setitem(sys.modules, "__main__", module)
    monkeypatch.setattr(sys, "argv", ["/x/distill.py", "RUN0", "--out", "s.json"])
    assert provenance.provenance([])["command"] == "python -m quietstar.methods.distill.recipe RUN0 --out s.json"


def test_the_evaluation_records_its_provenance(tmp_path, monkeypatch):
    from quietstar.eval.__main__ import main

    torch.manual_seed(0)
    qs = QuietStar(Transformer(ModelConfig.from_preset("tiny")), ByteTokenizer(), ThoughtConfig(n_ahead=4))
    monkeypatch.setattr(common, "load_model", lambda *a, **k: (qs, ByteTokenizer(), "tiny random model"))
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps({"text": f"{i} + {i} = {2 * i}."}) + "\n" for i in range(2)))
    argv = ["nll", f"data.path={data}", f"out={tmp_path / 'n.json'}", "seq_len=16", "seed=3"]
    main(argv)
    rec = json.loads((tmp_path / "n.json").read_text())
    assert list(rec)[0] == "provenance" and "machine" not in rec
    block = rec["provenance"]
    assert block["seeds"] == [3] and block["machine"]["torch"] == torch.__version__
    assert block["command"] == shlex.join(["python", "-m", "quietstar.eval", *argv])


def test_a_recipe_summary_records_the_runs_seeds(tmp_path, monkeypatch, capsys):
    from quietstar.methods.quietstar.learn_to_think import median_over_seeds
    from quietstar.methods.quietstar.report import EVAL_SEED_OFFSET, summarise_seeds_main

    runs = []
    for seed, nll in ((4, 1.0), (9, 3.0)):
        run = tmp_path / f"s{seed}"
        run.mkdir()
        (run / "results.json").write_text(json.dumps({"answer_nll": {"thought": {"all": nll}},
                                                      "eval": {"seed": seed + EVAL_SEED_OFFSET}}))
        runs.append(str(run))
    out = tmp_path / "summary.json"
    monkeypatch.setattr(sys, "argv", ["learn_to_think.py", *runs, "--out", str(out)])
    summarise_seeds_main("learn_to_think", median_over_seeds)
    rec = json.loads(out.read_text())
    assert list(rec)[0] == "provenance" and rec["provenance"]["seeds"] == [4, 9]
    assert rec["answer_nll"]["thought"]["all"] == 2.0 and rec["run_commits"] == [None, None]
    assert json.loads(capsys.readouterr().out)["answer_nll"] == rec["answer_nll"]


# ---------------------------------------------------------------------------------------- the records


def blocks(x, where="", first=True):
    """Every provenance block in a record, with its path, and whether it is its dict's first key."""
    if isinstance(x, dict):
        if "provenance" in x:
            yield where or "(top)", x["provenance"], list(x)[0] == "provenance"
        for k, v in x.items():
            if k != "provenance":
                yield from blocks(v, f"{where}.{k}", False)
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from blocks(v, f"{where}[{i}]", False)


def problems(block: dict) -> list:
    """What a provenance block lacks, in words; [] for a complete one."""
    out = []
    if block.get("command") is None:
        if not (isinstance(block.get("command_unknown"), str) and block["command_unknown"].strip()):
            out.append("no command and no command_unknown reason")
    elif not (isinstance(block["command"], str) and block["command"].strip()):
        out.append(f"command {block['command']!r}")
    if not re.fullmatch(r"[0-9a-f]{40}", str(block.get("commit"))):
        out.append(f"commit {block.get('commit')!r}")
    elif git("rev-parse", "--git-dir") is not None and git("cat-file", "-t", block["commit"]) != "commit":
        out.append(f"commit {block['commit']} is not in this repository")
    if not re.match(r"\d{4}-\d{2}-\d{2}", str(block.get("date"))):
        out.append(f"date {block.get('date')!r}")
    m = block.get("machine")
    if not isinstance(m, dict):
        out.append("no machine")
    else:
        for k in ("cpu", "torch"):
            known = isinstance(m.get(k), str) and m[k].strip()
            if not known and not (k in m and m[k] is None and k in str(m.get("unrecorded", ""))):
                out.append(f"machine.{k} neither given nor marked unrecorded")
    seeds = block.get("seeds")
    if not (isinstance(seeds, list) and all(isinstance(s, int) for s in seeds)):
        out.append(f"seeds {seeds!r}")
    return out


RECORDS = sorted(RESULTS.glob("*.json"))


@pytest.mark.parametrize("path", RECORDS, ids=[p.name for p in RECORDS])
def test_every_record_says_where_it_came_from(path):
    rec = json.loads(path.read_text())
    assert list(rec)[0] == "provenance", f"{path.name}: no provenance block first"
    found = list(blocks(rec))
    bad = {where: p for where, block, is_first in found
           for p in [problems(block) + ([] if is_first else ["not its dict's first key"])] if p}
    assert not bad, f"{path.name}: {bad}"


def test_a_block_with_a_gap_is_caught():
    good = {"command": "python x.py", "commit": git("rev-parse", "HEAD") or "0" * 40, "date": "2026-12-01",
            "seeds": [], "machine": {"cpu": None, "torch": "2.13.0", "unrecorded": "cpu: not written"}}
    assert problems(good) == []
    assert problems({**good, "command": None}) == ["no command and no command_unknown reason"]
    assert problems({**good, "commit": "abc"}) == ["commit 'abc'"]
    assert problems({**good, "machine": {"cpu": None, "torch": "2.13.0"}}) == [
        "machine.cpu neither given nor marked unrecorded"]
    assert problems({**good, "seeds": "one run"}) == ["seeds 'one run'"]


# ---------------------------------------------------------------------------------------- the writers

WRITES = re.compile(r"write_text\(|json\.dump\(|write_record\(|write_json\(")  # and the place: --out or results
PLACE = re.compile(r"""--out|"results"|bench/results|results\.json""")
RAW = re.compile(r"write_text\(\s*json\.dumps|json\.dump\(")


def writers():
    files = [*sorted((ROOT / "bench").glob("*.py")), *sorted((ROOT / "bench" / "scripts").glob("*.py")),
             *sorted((ROOT / "quietstar" / "methods").rglob("*.py"))]
    return [f for f in files if WRITES.search(f.read_text()) and PLACE.search(f.read_text())]


def test_every_script_that_writes_a_record_uses_write_record():
    found = writers()
    names = {f.relative_to(ROOT).as_posix() for f in found}
    assert {"bench/bench_train_step.py", "bench/bench_where.py", "bench/scripts/op_times.py",
            "quietstar/methods/quietstar/report.py"} <= names  # the check sees the writers it is meant to see
    bad = [f.relative_to(ROOT).as_posix() for f in found
           if RAW.search(f.read_text()) or "write_record(" not in f.read_text()]
    assert not bad, f"write JSON records without quietstar.provenance.write_record: {bad}"
