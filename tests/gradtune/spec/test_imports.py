"""gradtune.spec is standard library only: the API, the engine and the client all import it."""

from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[3]
SPEC = ROOT / "gradtune" / "spec"
HEAVY = ("torch", "numpy", "pydantic", "httpx", "fastapi", "sqlalchemy")


def _heavy_loaded(imports: str) -> set[str]:
    """The HEAVY packages (top-level names) a fresh interpreter holds after ``imports``."""
    code = (
        "import json, sys\n"
        f"{imports}\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules if m.split('.')[0] in {HEAVY!r}}})))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout))


def test_importing_the_spec_loads_no_third_party_package():
    spec = "import gradtune.spec, gradtune.spec.costs, gradtune.spec.shapes, gradtune.spec.vocab, gradtune.spec.hyper"
    assert _heavy_loaded(spec) == set()


def test_the_check_above_can_fail():
    """The same probe sees a third-party package when one is imported (here pydantic, which the
    API's schemas import)."""
    assert "pydantic" in _heavy_loaded("import service.schemas")


def test_every_spec_module_imports_only_the_standard_library():
    for path in sorted(SPEC.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top in sys.stdlib_module_names or name.startswith("gradtune.spec") or top == "__future__", (
                    f"{path.name} imports {name}"
                )
