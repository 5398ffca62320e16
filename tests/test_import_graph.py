"""No import cycles among the project's own modules (worker/, service/, gradtune/), and the engine's
task kinds behind one protocol (worker/engine/kinds.py) rather than told apart along the way.

The graph is read from the sources with ``ast``: every ``import`` and ``from ... import`` anywhere in
a module (module level, inside functions, under ``if TYPE_CHECKING``), relative imports resolved,
``from package import name`` counted as an import of ``package.name`` when that is a module.
Importing a submodule also runs its parents' ``__init__``; those implicit edges are left out, as
import linters do, so a package's ``__init__`` may re-export its submodules.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("worker", "service", "gradtune")

# Cycles tolerated for now, each with the reason: a cycle is tolerated only when every module in
# it is one of these or lies under one of them (worker.engine.meta is being split into a package
# by another change, and its internal structure is checked when that lands).
TOLERATED: dict[str, str] = {}  # package -> why its internal cycles are tolerated (none today)


def module_map(root: Path, packages: tuple[str, ...]) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (source file, is a package's __init__)."""
    mods: dict[str, tuple[Path, bool]] = {}
    for top in packages:
        for path in sorted((root / top).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            if is_pkg:
                parts = parts[:-1]
            mods[".".join(parts)] = (path, is_pkg)
    return mods


def _imported(node: ast.AST, package: str, mods: dict) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
        module = ".".join(base + ([node.module] if node.module else []))
    else:
        module = node.module or ""
    return [f"{module}.{a.name}" if f"{module}.{a.name}" in mods else module for a in node.names]


def import_edges(mods: dict[str, tuple[Path, bool]]) -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its source."""
    edges: dict[str, set[str]] = {}
    for name, (path, is_pkg) in mods.items():
        package = name if is_pkg else name.rpartition(".")[0]
        edges[name] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            edges[name].update(t for t in _imported(node, package, mods) if t in mods and t != name)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def _tolerated(cycle: list[str]) -> bool:
    return all(any(m == t or m.startswith(t + ".") for t in TOLERATED) for m in cycle)


def test_the_project_has_no_import_cycles():
    edges = import_edges(module_map(ROOT, PACKAGES))
    assert len(edges) > 30  # the scan found the project
    bad = [c for c in cycles(edges) if not _tolerated(c)]
    assert not bad, "import cycles: " + "; ".join(" <-> ".join(c) for c in bad)


def test_module_path_and_reference_do_not_import_each_other():
    edges = import_edges(module_map(ROOT, PACKAGES))
    assert "worker.engine.reference" not in edges["worker.engine.modules"]
    assert "worker.engine.modules" not in edges["worker.engine.reference"]
    # both stand on the kinds and the training loop, which import neither
    for low in ("worker.engine.kinds", "worker.engine.training"):
        assert not edges[low] & {"worker.engine.modules", "worker.engine.reference", "worker.engine.meta"}


def test_the_scan_finds_cycles_through_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from .a import f\n",
        "a.py": "def f():\n    from .sub import b\n    return b\n",
        "sub/__init__.py": "",
        "sub/b.py": "from ..c import g\n",
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n",
        "d.py": "import pkg.c\nfrom pkg.sub import b\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(textwrap.dedent(text))
    edges = import_edges(module_map(tmp_path, ("pkg",)))
    assert edges["pkg"] == {"pkg.a"}
    assert edges["pkg.a"] == {"pkg.sub.b"}
    assert edges["pkg.sub.b"] == {"pkg.c"}
    assert edges["pkg.c"] == {"pkg.a"}
    assert edges["pkg.d"] == {"pkg.c", "pkg.sub.b"}
    assert cycles(edges) == [["pkg.a", "pkg.c", "pkg.sub.b"]]
    assert not _tolerated(["pkg.a", "pkg.c"])
    assert not _tolerated(["worker.engine.meta", "worker.engine.meta.loop"])  # nothing is tolerated today
    assert not _tolerated(["worker.engine.meta", "worker.engine.modules"])


def test_task_kinds_are_told_apart_in_one_place():
    """isinstance against a task class appears only in kinds.kind_of (the MLP Task's adapter)."""
    kinds = {"Task", "ModuleTask", "MLPKind"}
    seen = []
    for path in sorted((ROOT / "worker").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.Lambda)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance":
                    classes = node.args[1]
                    names = {getattr(n, "id", getattr(n, "attr", None)) for n in ast.walk(classes)}
                    if names & kinds:
                        seen.append(f"{path.relative_to(ROOT)}:{getattr(fn, 'name', 'lambda')}")
    assert seen == ["worker/engine/kinds.py:kind_of"], seen


def test_every_kind_implements_the_protocol():
    import inspect

    from worker.engine.kinds import MLPKind, ModuleTask, TaskKind

    members = {n for n in vars(TaskKind) if not n.startswith("_")}
    assert {"layout", "cost_terms", "as_mlp_task", "as_module_task", "train_sgd", "train_sgd_groups", "name"} <= members
    for kind in (ModuleTask, MLPKind):
        for name in members - {"name"}:
            want = list(inspect.signature(getattr(TaskKind, name)).parameters)
            assert list(inspect.signature(getattr(kind, name)).parameters) == want, (kind.__name__, name)
    assert "name" in ModuleTask.__dataclass_fields__ and isinstance(MLPKind.name, property)
