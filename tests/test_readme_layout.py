"""The README's Layout section names every top-level file and folder of the repository and every module and
folder directly under quietstar/, and nothing that does not exist.

The section is one fenced block: an entry is a line that starts with its path (a folder ends with "/"),
then what it is; an indented line continues the entry above. Hidden names and what .gitignore ignores
(outputs, caches, build metadata) are not part of the tree."""

import fnmatch
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def layout_entries(readme: str) -> list[str]:
    """The paths the Layout section names, in order."""
    section = re.search(r"^## Layout\n(.*?)(?=^## |\Z)", readme, re.S | re.M)
    assert section, "README.md has no '## Layout' section"
    block = re.search(r"^```\n(.*?)^```", section.group(1), re.S | re.M)
    assert block, "the Layout section of README.md has no fenced block"
    return [line.split()[0] for line in block.group(1).splitlines() if line.strip() and not line[0].isspace()]


def ignored(name: str, root: Path) -> bool:
    """Hidden, or matched by one of .gitignore's patterns (a name, `*.egg-info/`, `/out/`)."""
    if name.startswith("."):
        return True
    gitignore = root / ".gitignore"
    patterns = gitignore.read_text().splitlines() if gitignore.exists() else ["__pycache__/", "*.egg-info/"]
    return any(fnmatch.fnmatch(name, p.strip().strip("/")) for p in patterns if p.strip() and not p.startswith("#"))


def tree_entries(root: Path) -> list[str]:
    """Every top-level file and folder, and every module (.py) and folder directly under quietstar/."""
    def name(p: Path) -> str:
        return str(p.relative_to(root)) + ("/" if p.is_dir() else "")

    top = [name(p) for p in root.iterdir() if not ignored(p.name, root)]
    package = [name(p) for p in (root / "quietstar").iterdir()
               if not ignored(p.name, root) and (p.is_dir() or p.suffix == ".py")]
    return sorted(top + package)


def layout_problems(readme: str, root: Path) -> list[str]:
    listed = layout_entries(readme)
    problems = [f"README.md Layout names {e} twice" for e in sorted({e for e in listed if listed.count(e) > 1})]
    for entry in listed:
        path = root / entry.rstrip("/")
        if not path.exists():
            problems.append(f"README.md Layout names {entry}, which does not exist")
        elif path.is_dir() != entry.endswith("/"):
            problems.append(f"README.md Layout names {entry}: a {'folder' if path.is_dir() else 'file'}, so it "
                            f"should read {entry.rstrip('/') + ('/' if path.is_dir() else '')}")
    problems += [f"README.md Layout is missing {e}" for e in tree_entries(root) if e not in listed]
    return problems


def test_the_layout_names_every_entry_of_the_tree_and_nothing_else():
    problems = layout_problems((ROOT / "README.md").read_text(), ROOT)
    assert problems == [], "\n".join(problems)


def test_a_missing_or_an_extra_entry_is_named(tmp_path):
    for name in ("README.md", "train.py", "quietstar/__init__.py", "quietstar/model.py", "quietstar/eval/__init__.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    (tmp_path / "docs").mkdir()
    (tmp_path / "quietstar" / "__pycache__").mkdir()  # ignored, as is anything hidden
    (tmp_path / ".ci").mkdir()
    (tmp_path / ".gitignore").write_text("__pycache__/\n*.egg-info/\n")
    (tmp_path / "x.egg-info").mkdir()

    def readme(*entries):
        lines = [f"{e:<24}what it is" for e in entries]
        return "# x\n\n## Layout\n\n```\n" + "\n".join(lines) + "\n                        more of it\n```\n\n## Next\n"

    whole = ("README.md", "train.py", "docs/", "quietstar/", "quietstar/__init__.py", "quietstar/model.py",
             "quietstar/eval/")
    assert layout_problems(readme(*whole), tmp_path) == []
    assert layout_problems(readme(*whole[:-2], "quietstar/eval/"), tmp_path) == \
        ["README.md Layout is missing quietstar/model.py"]
    assert layout_problems(readme(*whole, "quietstar/thinker.py"), tmp_path) == \
        ["README.md Layout names quietstar/thinker.py, which does not exist"]
    assert layout_problems(readme(*whole[1:]), tmp_path) == ["README.md Layout is missing README.md"]
    assert layout_problems(readme(*whole, "train.py"), tmp_path) == ["README.md Layout names train.py twice"]
    no_slash = tuple("docs" if e == "docs/" else e for e in whole)
    assert layout_problems(readme(*no_slash), tmp_path) == \
        ["README.md Layout names docs: a folder, so it should read docs/", "README.md Layout is missing docs/"]
