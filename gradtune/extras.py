"""Which extras a server-side command needs, and the check it makes before importing them."""

from __future__ import annotations

import importlib.util
from typing import NoReturn

import typer

# The client commands need the base install only (httpx, typer, rich). The server-side commands
# import service/ and worker/ inside their bodies, after require has checked that the extras they
# need are installed: these modules (import names) stand for each extra.
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "api": ("fastapi", "uvicorn", "sqlalchemy", "alembic", "pydantic_settings", "celery"),
    "worker": ("torch", "numpy", "sqlalchemy", "pydantic_settings", "celery"),
}


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(command: str, *extras: str) -> None:
    """Exit 1, naming the extras and the pip command, when `command` needs an extra not installed."""
    missing = sorted({m for extra in extras for m in EXTRA_MODULES[extra] if not installed(m)})
    if missing:
        what = " and ".join(extras) + (" extras" if len(extras) > 1 else " extra")
        fail(
            f"gradtune {command} needs the {what}: pip install 'gradtune[{','.join(extras)}]' "
            f"(not installed: {', '.join(missing)})"
        )


def fail(message: str) -> NoReturn:
    """Exit 1 with ``error: <message>`` on standard error."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)
