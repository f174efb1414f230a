"""The package's import graph, from every `import` statement at any depth (inside functions too): no cycle, and a
core that imports no method.

Three floors (docs/architecture.md):
  core     the modules directly in quietstar/ but the entry points below: they import only the core (and the
           Triton kernels, quietstar.kernels)
  methods  quietstar/methods/: the core, other methods, and the inference and evaluation that their
           experiments run (generate.py, eval/)
  entry    train.py, generate.py, export.py, lm_eval.py, eval/: what a user runs

Importing a module first runs every package __init__ above it, so each module also has an edge to each of its
packages; no __init__ imports a module of its own package (the root's public names load on first use), so
importing one method loads no other and no circle closes through a package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "quietstar"
ENTRY = ("quietstar.train", "quietstar.generate", "quietstar.export", "quietstar.lm_eval", "quietstar.eval")


def module_names() -> dict:
    """dotted name -> file, for every .py file of the package."""
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports_of(name: str, path: Path, modules: dict) -> set:
    """The package modules `name` imports, at any depth of its code: `import a.b` and `from a import b` name
    a.b when it is a module, else the nearest module above it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            targets += [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    found = set()
    for t in targets:
        if t.startswith("quietstar.kernels"):
            continue  # the Triton kernels: outside the package's graph, below the core
        while t and t not in modules:
            t = t.rpartition(".")[0]
        if t and t != name:
            found.add(t)
    return found


def packages_above(name: str) -> set:
    parts = name.split(".")
    return {".".join(parts[:k]) for k in range(1, len(parts))}


def import_graph() -> dict:
    """module -> the modules it imports (any depth), and the packages whose __init__ runs first."""
    modules = module_names()
    return {name: imports_of(name, path, modules) | packages_above(name) for name, path in modules.items()}


def floor(name: str) -> str:
    if name == "quietstar.methods" or name.startswith("quietstar.methods."):
        return "methods"
    if any(name == e or name.startswith(e + ".") for e in ENTRY):
        return "entry"
    return "core"


def cycles(graph: dict) -> list:
    """The strongly connected components with more than one module (Tarjan), and self-imports."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_imports_at_any_depth(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import quietstar.model\n"
                      "def f():\n    from quietstar import masks\n    if True:\n        import quietstar.data as d\n"
                      "class C:\n    def g(self):\n        from quietstar.methods.quietstar.thinker import QuietStar\n"
                      "        from quietstar.kernels.thought_attention import thought_attention\n")
    found = imports_of("quietstar.m", source, module_names())
    assert found == {"quietstar.model", "quietstar.masks", "quietstar.data", "quietstar.methods.quietstar.thinker"}
    assert "quietstar.checkpoint" in import_graph()["quietstar.train"]


def test_package_inits_import_nothing_of_their_own_package():
    modules = module_names()
    bad = {name: sorted(t for t in imports_of(name, path, modules) if t.startswith(name + "."))
           for name, path in modules.items() if path.name == "__init__.py"}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"package __init__ files that import their own modules: {bad}"


def test_no_import_cycle_at_any_depth():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_the_core_imports_no_method_and_no_entry_point():
    bad = [f"{m} imports {t}" for m, targets in import_graph().items() if floor(m) == "core"
           for t in sorted(targets) if floor(t) != "core"]
    assert not bad, "core modules importing above the core: " + "; ".join(bad)


def test_no_method_imports_the_training_entry_point():
    bad = [f"{m} imports {t}" for m, targets in import_graph().items() if floor(m) == "methods"
           for t in sorted(targets) if t in ("quietstar.train", "quietstar.lm_eval")]
    assert not bad, "methods importing train.py or lm_eval.py: " + "; ".join(bad)


@pytest.mark.parametrize("floor_name", ["core", "methods", "entry"])
def test_every_floor_has_modules(floor_name):
    assert any(floor(m) == floor_name for m in import_graph())
