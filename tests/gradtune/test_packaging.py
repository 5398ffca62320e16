"""pyproject.toml's dependencies against the code, and README's two commands against the extras.

* ``pip install gradtune`` is the client and the CLI: the base dependencies are exactly the
  third-party modules gradtune/ imports, less what the user's own environment brings (torch and
  numpy, imported when a model or tensors are handled) and the server stacks that the server-side
  commands import after checking their extras.
* README's ``<!-- ci:test -->`` command installs every distribution the tests, the service, the
  worker and the migrations import (resolved through the installed packages' own metadata), and
  its one-command start installs what ``gradtune serve`` requires.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
OWN = {"gradtune", "service", "worker", "migrations", "tests", "benchmarks"}

CLIENT = {"httpx", "typer", "rich"}
# Imported by gradtune/ but not installed with it: the user's torch and numpy (Client.tune,
# TunedSettings.sgd, gradtune.torch_utils), and what the server-side commands import once
# extras.require has found their extras.
FROM_USER_ENV = {"torch", "numpy"}
SERVER_SIDE = {"service", "worker", "uvicorn"}

API = {
    "fastapi",
    "uvicorn",
    "pydantic",
    "pydantic-settings",
    "sqlalchemy",
    "alembic",
    "psycopg",
    "celery",
    "python-multipart",
    "numpy",
    "pyarrow",
    "boto3",
    "sse-starlette",
    "prometheus-client",
}
WORKER = {
    "celery",
    "sqlalchemy",
    "psycopg",
    "pydantic",
    "pydantic-settings",
    "torch",
    "numpy",
    "scikit-learn",
    "pyarrow",
    "boto3",
    "prometheus-client",
}


def _names(reqs: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in reqs}


def third_party_imports(paths: list[Path]) -> dict[str, set[str]]:
    """Top-level third-party module -> the files importing it (anywhere in the file)."""
    found: dict[str, set[str]] = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            for mod in mods:
                top = mod.split(".")[0]
                if top not in sys.stdlib_module_names and top not in OWN and top != "__future__":
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_base_install_is_the_client_and_cli_only():
    assert _names(PROJECT["dependencies"]) == CLIENT
    used = set(third_party_imports(sorted((ROOT / "gradtune").rglob("*.py"))))
    assert used - FROM_USER_ENV - SERVER_SIDE == CLIENT, "gradtune/ imports differ from the base dependencies"


def test_extras_carry_the_server_stacks():
    extras = PROJECT["optional-dependencies"]
    assert _names(extras["api"]) == API
    assert _names(extras["worker"]) == WORKER
    assert {"test", "bench"} <= set(extras)
    # what users install takes ranges (an exact pin in a library fights the user's own); the tools
    # of the test and dev extras (hypothesis, ruff, mypy) are pinned exactly, so CI is repeatable
    for req in [*PROJECT["dependencies"], *extras["api"], *extras["worker"]]:
        spec = str(Requirement(req).specifier)
        assert spec.startswith(">=") and "," not in spec, f"{req}: pin with >= as the others"
    for req in extras["dev"]:
        assert str(Requirement(req).specifier).startswith("=="), f"{req}: the dev tools are pinned exactly"


def readme_command(marker: str | None) -> str:
    """README's command after `marker` (None: the first code block with `gradtune serve`)."""
    text = (ROOT / "README.md").read_text()
    if marker is not None:
        text = text.split(marker, 1)[1]
    blocks = re.findall(r"^```\n(.*?)^```", text, re.M | re.S)
    return next(b.strip() for b in blocks if marker is not None or "gradtune serve" in b)


def installed_extras(command: str) -> set[str]:
    """The extras of the project (`pip install -e '.[a,b]'`) a shell command installs."""
    m = re.search(r"pip install (?:-\w+ )*'?\.\[([\w,]+)\]'?", command)
    assert m, f"no project install in {command!r}"
    return set(m.group(1).split(","))


def closure(reqs: list[str]) -> set[str]:
    """Every distribution `reqs` pulls in, read from the installed packages' metadata."""
    seen: dict[str, set[str]] = {}
    todo = [Requirement(r) for r in reqs]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen and req.extras <= seen[name]:
            continue
        extras = seen.setdefault(name, set())
        extras.update(req.extras)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for text in requires:
            sub = Requirement(text)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras | {""}):
                todo.append(sub)
    return set(seen)


def test_readme_commands_install_what_serve_and_the_tests_need():
    from gradtune.extras import EXTRA_MODULES

    start, ci = readme_command(None), readme_command("<!-- ci:test -->")
    assert start.endswith("gradtune serve") and installed_extras(start) >= set(EXTRA_MODULES) == {"api", "worker"}
    extras = installed_extras(ci)
    assert extras == {"api", "worker", "test"} and "pytest" in ci
    reqs = [*PROJECT["dependencies"], *(r for e in extras for r in PROJECT["optional-dependencies"][e])]
    have = closure(reqs)
    files = [p for top in ("tests", "service", "worker", "gradtune", "migrations") for p in (ROOT / top).rglob("*.py")]
    files += [ROOT / "benchmarks" / "digits_grid.py"]  # tests/worker/engine/test_quality.py imports it
    owners = md.packages_distributions()
    missing = {}
    for module, where in third_party_imports(files).items():
        dists = {canonicalize_name(d) for d in owners.get(module, [])}
        if not dists & have:
            missing[module] = sorted(where)[:2]
    assert not missing, f"imported but not installed by README's test command: {missing}"


def test_the_closure_follows_extras_markers():
    # celery[redis] brings the redis client; plain celery does not
    assert "redis" in closure(["celery[redis]"]) and "redis" not in closure(["celery"])
    assert "kombu" in closure(["celery"])
