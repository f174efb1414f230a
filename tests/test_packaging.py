"""What an install puts on a machine, and what the repository root puts on sys.path.

The project installs one top-level name, `quietstar`: the kernels/ and configs/ folders ship inside it
(pyproject's package-dir), train.py stays the checkout's entry point and `quietstar-train` the installed
one. From the repository root (where `python -m pytest` and `python train.py` run, root first on sys.path)
nothing the project ships answers to another package's name: `import kernels` is Hugging Face's package,
which `transformers` imports. CI installs into a new virtual environment with the README's commands.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def run_python(code: str, cwd: Path, **env) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env={**ENV, **env}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def tracked_files() -> list[str]:
    """The checkout's files as a clone has them (git's tracked and not-ignored files)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the files a clone holds are unknown")
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the checkout, with the build backend already installed (no network)."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed: no offline wheel build")
    src, dist = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for f in tracked_files():
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(dist), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (path,) = dist.glob("quietstar-*.whl")
    return path


def test_the_wheel_installs_one_top_level_name_and_the_kernels_configs_and_command_inside_it(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"quietstar", f"quietstar-{wheel.name.split('-')[1]}.dist-info"}
    info = {Path(n).name: n for n in names if ".dist-info/" in n}
    with zipfile.ZipFile(wheel) as z:
        assert z.read(info["top_level.txt"]).decode().split() == ["quietstar"]
        assert re.search(r"^quietstar-train = quietstar\.train:main$", z.read(info["entry_points.txt"]).decode(),
                         re.M)
    assert "quietstar/kernels/thought_attention.py" in names and "quietstar/kernels/reference.py" in names
    assert "quietstar/configs/train.yaml" in names
    shipped = {f"quietstar/configs/{p.relative_to(ROOT / 'configs')}" for p in (ROOT / "configs").rglob("*.yaml")}
    assert shipped <= set(names), sorted(shipped - set(names))
    tasks = {f"quietstar/eval/tasks/{p.name}" for p in (ROOT / "quietstar" / "eval" / "tasks").glob("*.yaml")}
    assert tasks and tasks <= set(names), sorted(tasks - set(names))  # lm_eval's task YAMLs (quietstar.lm_eval)
    assert not [n for n in names if n.endswith("train.py") and n != "quietstar/train.py"]


def test_the_installed_wheel_imports_its_kernels_and_finds_its_configs_anywhere(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    proc = run_python("import quietstar, quietstar.kernels.reference as r; from quietstar.train import config_dir;"
                      "print(quietstar.__file__); print(r.__file__); print(config_dir())", cwd=tmp_path,
                      PYTHONPATH=str(site))
    package, kernel, configs = (Path(line) for line in proc.stdout.split())
    assert package.parent == kernel.parent.parent == configs.parent == site / "quietstar"


def test_this_environment_installed_only_quietstar():
    dist = importlib.metadata.distribution("quietstar")
    assert (dist.read_text("top_level.txt") or "").split() == ["quietstar"]
    (script,) = [e for e in dist.entry_points if e.group == "console_scripts"]
    assert (script.name, script.value) == ("quietstar-train", "quietstar.train:main")
    from quietstar import train

    assert script.load() is train.main


def test_from_the_repository_root_kernels_is_not_the_projects(tmp_path):
    """The root is first on sys.path: a kernels/__init__.py there would shadow Hugging Face's `kernels`
    (a folder without one is only a namespace portion, which any installed package named `kernels` wins)."""
    assert not (ROOT / "kernels" / "__init__.py").exists()
    where = "import importlib.util as u; s = u.find_spec('kernels'); print(s and s.origin)"
    from_root, elsewhere = (run_python(where, cwd=cwd).stdout.strip() for cwd in (ROOT, tmp_path))
    assert from_root == elsewhere  # Hugging Face's file where it is installed, nothing of ours either way
    assert not from_root.startswith(str(ROOT))
    proc = run_python("import quietstar.kernels.thought_attention as t, quietstar.kernels.reference as r;"
                      "print(t.__file__); print(r.__file__)", cwd=ROOT)
    assert all(Path(p).parent == ROOT / "kernels" for p in proc.stdout.split())


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_transformers_saves_and_loads_a_model_after_quietstar_is_imported(tmp_path):
    """From the root, as pytest and train.py run: transformers imports Hugging Face's `kernels`."""
    code = f"""
import quietstar, quietstar.kernels.thought_attention
import torch
from transformers import LlamaConfig, LlamaForCausalLM
cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
model = LlamaForCausalLM(cfg).eval()
model.save_pretrained({str(tmp_path)!r})
again = LlamaForCausalLM.from_pretrained({str(tmp_path)!r}).eval()
ids = torch.arange(8)[None]
assert torch.equal(model(ids).logits, again(ids).logits)
print("ok")
"""
    assert run_python(code, cwd=ROOT).stdout.split()[-1] == "ok"


def readme_block(heading: str) -> str:
    """The first fenced block after the README line that starts with `heading`."""
    text = (ROOT / "README.md").read_text()
    start = text.index(heading)
    block = re.search(r"```\n(.*?)```", text[start:], re.S)
    assert block, f"no code block after {heading!r} in README.md"
    return block.group(1).strip()


def test_ci_runs_the_readmes_install_and_test_commands_in_a_new_environment():
    ci = (ROOT / ".ci" / "run").read_text()
    lines = [line.strip() for line in ci.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    install, test = readme_block("Install"), readme_block("Test")
    assert install in lines and test in lines
    assert lines.index(install) < lines.index(test) == len(lines) - 1
    assert "python3 -m venv" in ci and lines.index(next(x for x in lines if "-m venv" in x)) < lines.index(install)
