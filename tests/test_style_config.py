"""The style checks: pyproject's ruff and mypy configuration, .ci/run running them before the tests and
failing on findings, and .pre-commit-config.yaml running the same three commands."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CI_RUN = (ROOT / ".ci" / "run").read_text()
PRE_COMMIT = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())

# The three checks, as each tool is invoked (the venv prefix left out).
STYLE_COMMANDS = [["ruff", "check", "."], ["ruff", "format", "--check", "."], ["mypy"]]


def _tool_command(line: str) -> list[str] | None:
    """`.venv/bin/ruff check . || failed=1` -> ["ruff", "check", "."]; None for a line running no checker."""
    words = shlex.split(line.split("||")[0].split("#")[0])
    if not words or not re.fullmatch(r"(\.venv/bin/)?(ruff|mypy)", words[0]):
        return None
    return [words[0].rsplit("/", 1)[-1], *words[1:]]


def test_ruff_configuration():
    ruff = PYPROJECT["tool"]["ruff"]
    assert ruff["line-length"] == 120
    assert ruff["target-version"] == "py311"
    lint = ruff["lint"]
    assert {"E", "F", "W", "I", "B", "UP", "C90"} <= set(lint["select"])
    assert lint["mccabe"]["max-complexity"] == 15
    # Nothing switches the families or the complexity check back off wholesale.
    assert not {"E", "F", "W", "I", "B", "UP", "C90", "C901"} & set(lint.get("ignore", []))
    assert ruff["format"]["quote-style"] == "double"


def test_mypy_configuration():
    mypy = PYPROJECT["tool"]["mypy"]
    assert {"service", "gradtune"} <= set(mypy["files"])
    assert (ROOT / "gradtune" / "spec" / "__init__.py").exists()  # so "gradtune" covers the spec package
    assert mypy["python_version"] == "3.11"
    assert mypy["check_untyped_defs"] is True
    assert mypy["warn_unused_ignores"] is True
    spec = [o for o in mypy["overrides"] if "gradtune.spec" in o["module"]]
    assert spec and spec[0]["disallow_untyped_defs"] is True
    # The lenient overrides name libraries or the out-of-scope engine, never the checked packages.
    for override in mypy["overrides"]:
        if override.get("ignore_missing_imports") or override.get("follow_imports") == "skip":
            assert not any(m.split(".")[0] in ("service", "gradtune") for m in override["module"])


def test_dev_extra_pins_the_checkers():
    dev = PYPROJECT["project"]["optional-dependencies"]["dev"]
    pinned = dict(req.split("==") for req in dev if "==" in req)
    assert {"ruff", "mypy", "pre-commit"} <= set(pinned)


def test_ci_runs_the_style_checks_before_the_tests():
    lines = CI_RUN.splitlines()
    body_start = lines.index("check_style() {")
    body_end = lines.index("}", body_start)
    body = lines[body_start + 1 : body_end]
    commands = [c for c in map(_tool_command, body) if c]
    assert commands == STYLE_COMMANDS
    assert any("pip install" in line and "dev" in line for line in body)
    # Called at the top level, after the services start and before README's test command runs.
    top = [line.strip() for line in lines]
    assert top.index("start_services") < top.index("check_style") < top.index('bash -c "$cmd"')


def _run_check_style(tmp_path: Path, fail: str | None) -> tuple[int, list[str]]:
    """Run .ci/run's check_style with stand-in python3, pip, ruff and mypy that log their arguments;
    the tool named by `fail` exits 1."""
    lines = CI_RUN.splitlines()
    start = lines.index("check_style() {")
    func = "\n".join(lines[start : lines.index("}", start) + 1])
    log = tmp_path / "log"
    fake_bin = tmp_path / "bin"
    venv_bin = tmp_path / ".venv" / "bin"
    for folder, name in [(fake_bin, "python3"), (venv_bin, "pip"), (venv_bin, "ruff"), (venv_bin, "mypy")]:
        folder.mkdir(parents=True, exist_ok=True)
        status = 1 if name == fail else 0
        script = folder / name
        script.write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\nexit {status}\n')
        script.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(
        ["bash", "-c", f"set -euo pipefail\n{func}\ncheck_style\necho reached-tests >> {log}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc.returncode, log.read_text().splitlines()


def test_ci_style_step_passes_clean_and_fails_on_any_finding(tmp_path):
    status, log = _run_check_style(tmp_path / "clean", fail=None)
    assert status == 0
    runs = [line for line in log if line.split()[0] in ("ruff", "mypy")]
    assert [line.split() for line in runs] == STYLE_COMMANDS
    assert log[-1] == "reached-tests"
    for tool in ("ruff", "mypy"):
        status, log = _run_check_style(tmp_path / tool, fail=tool)
        assert status != 0, f"a failing {tool} did not fail the run"
        assert "reached-tests" not in log
        # Every check still ran, so one run reports all the findings.
        assert len([line for line in log if line.split()[0] in ("ruff", "mypy")]) == 3


def test_pre_commit_runs_the_same_commands():
    hooks = [hook for repo in PRE_COMMIT["repos"] for hook in repo["hooks"]]
    assert all(repo["repo"] == "local" for repo in PRE_COMMIT["repos"])  # nothing to download
    assert all(hook["language"] == "system" and hook["pass_filenames"] is False for hook in hooks)
    assert [_tool_command(hook["entry"]) for hook in hooks] == STYLE_COMMANDS
