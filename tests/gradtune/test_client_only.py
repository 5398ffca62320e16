"""The client and the CLI work with the base install alone: no torch, no server stack, no service/ or
worker/ code.

A subprocess installs a ``sys.meta_path`` finder that refuses (ImportError) everything the base
install lacks, then imports the client, runs the CLI and builds a Client. The sources are checked
too: gradtune/ never imports service/ or worker/, except the server-side commands of cli.py.
An optional test (GRADTUNE_TEST_FRESH_VENV=1, about 30 s) pip-installs the project into a fresh
virtual environment and runs the same checks there.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BLOCKED = (
    "torch",
    "fastapi",
    "sqlalchemy",
    "celery",
    "starlette",
    "psycopg",
    "numpy",
    "service",
    "worker",
    "uvicorn",
    "alembic",
    "pydantic_settings",
    "kombu",
    "sklearn",
    "pyarrow",
    "boto3",
    "multipart",
    "python_multipart",
)
SERVE_MESSAGE = "gradtune serve needs the api and worker extras: pip install 'gradtune[api,worker]'"

BLOCKER = f"""
import importlib.abc, sys

BLOCKED = {BLOCKED!r}


class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"blocked for this test: {{name}}", name=name)
        return None


sys.meta_path.insert(0, Blocker())
for name in list(sys.modules):
    assert name.split(".")[0] not in BLOCKED, name
"""

CHECKS = """
import json

try:
    import torch  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("the blocker lets torch through")

import gradtune
import gradtune.cli
import gradtune.client
import gradtune.progress
import gradtune.spec
import gradtune.torch_utils
import httpx
from typer.testing import CliRunner

runner = CliRunner()
out = {}
for args in (["--help"], ["submit", "--help"], ["settings", "--help"], ["serve"], ["serve", "--workers", "0"],
             ["worker"], ["migrate"]):
    r = runner.invoke(gradtune.cli.cli, args)
    out[" ".join(args)] = [r.exit_code, r.output]

body = {"lr": 0.1, "momentum": 0.5, "evaluation": {}, "param_groups": [
    {"params": ["0.weight", "0.bias"], "lr": [0.1, 0.05], "momentum": [0.5, 0.6]}], "boundaries": [0, 10]}


def handler(request):
    if request.url.path == "/v1/jobs/j1/settings":
        return httpx.Response(200, json=body)
    return httpx.Response(404, json={"detail": "no such job"})


with gradtune.Client("http://gradtune.test", transport=httpx.MockTransport(handler)) as client:
    settings = client.settings("j1")
    try:
        client.job("j2")
    except gradtune.GradtuneError as exc:
        out["error"] = str(exc)
out["python"] = settings.python()
out["segment"] = gradtune.torch_utils.segment_at([0, 10], 12)
out["loaded"] = sorted({m.split(".")[0] for m in sys.modules} & set(BLOCKED))
print(json.dumps(out))
"""


def _run_checks(python: str, cwd: Path, env: dict[str, str] | None = None) -> dict:
    code = BLOCKER + CHECKS
    result = subprocess.run([python, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr + result.stdout
    import json

    return json.loads(result.stdout.strip().splitlines()[-1])


def _assert_client_works(out: dict) -> None:
    code, text = out["--help"]
    assert code == 0 and "submit" in text and "serve" in text
    assert out["submit --help"][0] == 0 and out["settings --help"][0] == 0
    code, text = out["serve"]
    assert code == 1 and SERVE_MESSAGE in text and "torch" in text
    code, text = out["serve --workers 0"]
    assert code == 1 and "gradtune serve needs the api extra: pip install 'gradtune[api]'" in text
    code, text = out["worker"]
    assert code == 1 and "gradtune worker needs the worker extra: pip install 'gradtune[worker]'" in text
    code, text = out["migrate"]
    assert code == 1 and "gradtune migrate needs the api extra: pip install 'gradtune[api]'" in text
    assert out["error"] == "404: no such job"
    assert "param_groups = [" in out["python"] and "boundaries = [0, 10]" in out["python"]
    assert out["segment"] == 1
    assert out["loaded"] == []


def test_client_and_cli_work_without_torch_or_the_server_stack():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    _assert_client_works(_run_checks(sys.executable, ROOT, env))


def test_the_blocker_blocks():
    code = BLOCKER + "import worker.engine\n"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "blocked for this test: worker" in result.stderr


def test_server_commands_see_installed_extras():
    from typer.testing import CliRunner

    from gradtune import cli, extras

    assert extras.installed("torch") and not extras.installed("gradtune_no_such_module")
    result = CliRunner().invoke(cli.cli, ["serve", "--help"])
    assert result.exit_code == 0  # --help never reaches the check


def test_client_sources_never_import_service_or_worker():
    """gradtune/ (client, CLI, progress, torch_utils, spec) imports service/ or worker/ only inside
    functions that first check their extras (``require(...)``): the server-side commands of cli.py
    and keys_cli.py."""
    server_side = {"cli.py": {"migrate", "worker", "serve"}, "keys_cli.py": {"create", "list_", "revoke", "quota"}}
    for path in sorted((ROOT / "gradtune").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        allowed: set[int] = set()
        checked = set()
        for fn in tree.body:
            if isinstance(fn, ast.FunctionDef):
                body = fn.body[1:] if isinstance(fn.body[0], ast.Expr) else fn.body  # past a docstring
                if body and ast.unparse(body[0]).startswith("require("):
                    checked.add(fn.name)
                    allowed.update(id(n) for n in ast.walk(fn))
        missing = server_side.get(path.name, set()) - checked
        assert not missing, f"{path.name}: {sorted(missing)} must check their extras first (require(...))"
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                if name.split(".")[0] in ("service", "worker"):
                    assert id(node) in allowed, f"{path.relative_to(ROOT)}:{node.lineno} imports {name}"


@pytest.mark.skipif(os.environ.get("GRADTUNE_TEST_FRESH_VENV") != "1", reason="set GRADTUNE_TEST_FRESH_VENV=1")
def test_a_fresh_venv_gets_the_client_only(tmp_path):
    """pip install <project> in an empty venv: no torch, fastapi or sqlalchemy; the client works."""
    src = tmp_path / "src"  # pip builds in the tree: a copy keeps build/ and *.egg-info out of the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("gradtune", "service", "worker", "migrations"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", str(src)], check=True, timeout=600)
    listed = subprocess.run(
        [python, "-m", "pip", "list", "--format", "freeze"], capture_output=True, text=True, check=True
    ).stdout.lower()
    installed = {line.split("==")[0] for line in listed.splitlines()}
    assert {"gradtune", "httpx", "typer", "rich"} <= installed
    assert not installed & {"torch", "fastapi", "sqlalchemy", "celery", "psycopg", "numpy", "uvicorn", "alembic"}
    # outside the checkout, so the installed package is imported (not the sources)
    _assert_client_works(_run_checks(python, tmp_path))
    serve = subprocess.run([str(venv / "bin" / "gradtune"), "serve"], capture_output=True, text=True, timeout=60)
    assert serve.returncode == 1 and SERVE_MESSAGE in serve.stderr
