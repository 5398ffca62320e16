"""worker.engine is a pure library: torch and the standard library only (plus gradtune.spec and
gradtune.torch_utils, which it shares with the client, not the client's HTTP stack), no CUDA at
import."""

import ast
import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[3]
ENGINE = ROOT / "worker" / "engine"
# The only gradtune modules the engine may import: the shared spec (standard library only) and the
# optimizer helpers the client gives users (torch imported inside them).
SHARED = ("gradtune.spec", "gradtune.torch_utils")
FORBIDDEN = (
    "numpy",
    "sklearn",
    "scipy",
    "celery",
    "sqlalchemy",
    "fastapi",
    "pydantic",
    "service",
    "httpx",
    "typer",
    "rich",
)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_engine_sources_import_only_torch_and_the_standard_library():
    for path in sorted(ENGINE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level > 0:
                    continue
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                shared = any(name == m or name.startswith(m + ".") for m in SHARED)
                assert top == "torch" or top in sys.stdlib_module_names or top == "__future__" or shared, (
                    f"{path.name} imports {name}"
                )


def test_engine_works_with_forbidden_modules_blocked():
    # torch itself imports numpy when it is installed, so block it (and the rest) outright: the
    # engine must import and run without them.
    result = _run(
        f"""
        import sys, warnings
        warnings.simplefilter("ignore")
        for name in {FORBIDDEN!r}:
            sys.modules[name] = None
        import torch
        import worker.engine as e
        assert not torch.cuda.is_initialized()
        x = torch.randn(40, 3, generator=torch.Generator().manual_seed(0))
        y = (x[:, 0] > 0).long()
        t = e.Task("t", x[:30], y[:30], x[30:], y[30:], (4,), "tanh", "cross_entropy", 2, 5, 10, 0)
        assert e.train_sgd(t, 0.1, 0.9) > 0
        cfg = e.MetaConfig(iterations=2)
        s = e.run_meta([t], cfg, e.init_state(cfg, 0.1, 0.9), 2)
        assert e.state_iteration(s) == 2
        # forward mode (torch.func) and the richer settings need nothing else either
        cfg = e.MetaConfig(iterations=3, method="forward", per_layer=True, schedule_segments=2, constant_fraction=0.34)
        s = e.run_meta([t], cfg, e.init_state(cfg, 0.1, 0.9), 3)
        assert s["method"] == "forward" and "param_groups" in e.best_settings(s)
        loaded = [m for m in {FORBIDDEN!r} if sys.modules.get(m) is not None]
        assert not loaded, loaded
        assert not torch.cuda.is_initialized()
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_importing_the_engine_leaves_service_stack_out():
    result = _run(
        """
        import sys
        import worker.engine
        stack = ("sklearn", "celery", "sqlalchemy", "fastapi", "pydantic", "service", "httpx", "typer")
        print(sorted(m for m in stack if m in sys.modules))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
