"""The ``gradtune`` command: serve (API + embedded worker), worker, migrate."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Optional

import typer

cli = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


def worker_argv(queue: str, loglevel: str = "INFO") -> list[str]:
    """The command line of one worker process (solo pool: one chunk at a time, one device)."""
    return [
        sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
        "--pool", "solo", "--concurrency", "1", "-Q", queue,
        "--without-mingle", "--without-gossip", "--loglevel", loglevel,
    ]


@cli.command()
def migrate() -> None:
    """Create or upgrade the database schema (alembic upgrade head)."""
    from service.db.migrate import upgrade
    from service.settings import get_settings

    settings = get_settings()
    settings.ensure_dirs()
    upgrade(settings.resolved_database_url())
    typer.echo(f"database at head: {_redact(settings.resolved_database_url())}")


@cli.command()
def worker(loglevel: str = typer.Option("INFO", help="Celery log level.")) -> None:
    """Run one worker process: it drains the queue, one chunk at a time, on CUDA when present."""
    from service.settings import get_settings

    settings = get_settings()
    settings.ensure_dirs()
    argv = worker_argv(settings.queue_name, loglevel)
    os.execv(argv[0], argv)


@cli.command()
def serve(
    host: Optional[str] = typer.Option(None, help="Bind address (default GRADTUNE_HOST, 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, help="Port (default GRADTUNE_PORT, 8000)."),
    workers: int = typer.Option(1, min=0, help="Embedded worker processes to start (0: none)."),
) -> None:
    """API on :8000 plus embedded workers; SQLite and a server-less broker unless configured."""
    import uvicorn

    from service.db.migrate import upgrade
    from service.main import create_app
    from service.settings import get_settings

    settings = get_settings()
    settings.ensure_dirs()
    upgrade(settings.resolved_database_url())
    procs = [subprocess.Popen(worker_argv(settings.queue_name)) for _ in range(workers)]
    typer.echo(
        f"gradtune: database {_redact(settings.resolved_database_url())}, "
        f"broker {_redact(settings.resolved_broker_url())}, {workers} embedded worker(s)"
    )
    try:
        uvicorn.run(create_app(settings), host=host or settings.host, port=port or settings.port)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()


def _redact(url: str) -> str:
    """Hide a password in a URL before printing it."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in creds else url
    return url


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
