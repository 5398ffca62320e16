"""A terminal progress bar for a job: iterations, meta-loss, current lr and momentum."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def job_progress(job_id: str) -> Iterator[Callable[[dict[str, Any]], None]]:
    """Yields a callback that redraws the bar from a job body (as GET /v1/jobs/{id} returns it)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
    ) as bar:
        task = bar.add_task(job_id[:8], total=None, info="")

        def show(job: dict[str, Any]) -> None:
            p = job["progress"]
            info = job["status"]
            if p.get("meta_loss") is not None:
                info += f"  meta-loss {p['meta_loss']:.4g}"
            if p.get("lr") is not None:
                info += f"  lr {p['lr']:.4g}  momentum {p['momentum']:.4g}"
            bar.update(task, total=p["iterations"], completed=p["iteration"], info=info)

        yield show
