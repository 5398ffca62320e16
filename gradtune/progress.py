"""A job's progress on standard error: a bar on a terminal (iterations, meta-loss, current lr and
momentum), plain lines otherwise (a pipe, a file, CI's log), one per change of status or iteration."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any


def _info(job: dict[str, Any]) -> str:
    p = job["progress"]
    info = str(job["status"])
    if p.get("meta_loss") is not None:
        info += f"  meta-loss {p['meta_loss']:.4g}"
    if p.get("lr") is not None:
        info += f"  lr {p['lr']:.4g}  momentum {p['momentum']:.4g}"
    return info


@contextmanager
def job_progress(job_id: str, stream: IO[str] | None = None) -> Iterator[Callable[[dict[str, Any]], None]]:
    """Yields a callback that shows a job body (as GET /v1/jobs/{id} returns it) on ``stream``
    (default: standard error): a redrawn bar when it is a terminal, else a line when the status or
    the iteration changed."""
    out = sys.stderr if stream is None else stream
    isatty = getattr(out, "isatty", None)
    if not (callable(isatty) and isatty()):
        yield _lines(job_id, out)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        console=Console(file=out),
    ) as bar:
        task = bar.add_task(job_id[:8], total=None, info="")

        def show(job: dict[str, Any]) -> None:
            p = job["progress"]
            bar.update(task, total=p["iterations"], completed=p["iteration"], info=_info(job))

        yield show


def _lines(job_id: str, out: IO[str]) -> Callable[[dict[str, Any]], None]:
    last: list[tuple[Any, Any]] = []

    def show(job: dict[str, Any]) -> None:
        p = job["progress"]
        state = (job["status"], p["iteration"])
        if last and last[0] == state:
            return
        last[:] = [state]
        print(f"{job_id[:8]}  {p['iteration']}/{p['iterations']}  {_info(job)}", file=out, flush=True)

    return show
