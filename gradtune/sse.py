"""Following GET /v1/jobs/{id}/events (Server-Sent Events) with httpx: a minimal SSE parser, the
stream as a generator, and ``follow``, what ``Client.wait`` does before it falls back to polling.

The server sends ``event: iteration`` (id ``N``) per committed meta-iteration, ``event: status``
(id ``N:status``, data: the job's body) per status change, comment lines as keep-alive pings every
15 s, and ends the stream after a finished job's status event.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import ExitStack, closing
from dataclasses import dataclass
from typing import Any

import httpx

from gradtune.errors import GradtuneError, refused
from gradtune.spec import TERMINAL_STATUSES

READ_SECONDS = 60.0  # longest wait for a line: well beyond the server's 15 s pings
FALLBACK_STATUSES = (0, 404, 405)  # unreachable, or a server without the route: poll instead


@dataclass
class ServerEvent:
    """One dispatched event: ``event`` (``message`` when the server named none), ``id`` (the last id
    the stream set, as SSE defines it; None before any) and ``data`` (parsed JSON, else the text)."""

    event: str
    id: str | None
    data: Any


class SSEParser:
    """Feed it the stream's lines (without their line ending), one at a time: ``feed`` returns the
    event a blank line dispatches, else None. Fields ``event``, ``id`` and ``data`` (several data
    lines joined by "\\n"); comments (":") and other fields are ignored; a block without data
    dispatches nothing (its id still counts for the events after it)."""

    def __init__(self) -> None:
        self.last_id: str | None = None
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: str) -> ServerEvent | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self.last_id = value
        return None

    def _dispatch(self) -> ServerEvent | None:
        event, data = self._event or "message", self._data
        self._event, self._data = "", []
        if not data:
            return None
        text = "\n".join(data)
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = text
        return ServerEvent(event, self.last_id, parsed)


def parse_sse(lines: Iterable[str]) -> Iterator[ServerEvent]:
    """The events of an SSE stream's lines (an unfinished last event is dropped, as SSE says)."""
    parser = SSEParser()
    for line in lines:
        event = parser.feed(line)
        if event is not None:
            yield event


def stream_lines(
    http: httpx.Client, job_id: str, last_event_id: str | None = None, read: float | None = READ_SECONDS
) -> Generator[ServerEvent | None, None, None]:
    """GET /v1/jobs/{id}/events: per line read, the event it dispatched or None (a ping, a field), so
    that a caller can look at the clock between events. GradtuneError when the server refuses (its
    status and message) or cannot be reached (status 0); httpx.TransportError if the connection
    drops mid-stream. ``read``: the longest wait for a line, in seconds (None: no limit)."""
    base = http.timeout
    timeout = httpx.Timeout(connect=base.connect, read=read, write=base.write, pool=base.pool)
    headers = {"Accept": "text/event-stream", "Cache-Control": "no-store"}
    if last_event_id:
        headers["Last-Event-ID"] = last_event_id
    with ExitStack() as stack:
        try:
            response = stack.enter_context(
                http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=timeout)
            )
        except httpx.HTTPError as exc:
            raise GradtuneError(0, f"cannot reach {str(http.base_url).rstrip('/')}: {exc}") from exc
        if response.status_code != 200:
            response.read()
            raise refused(response)
        parser = SSEParser()
        for line in response.iter_lines():
            yield parser.feed(line)


def with_iteration(job: dict[str, Any], it: dict[str, Any]) -> dict[str, Any]:
    """The job's body with its progress moved to the iteration event ``it``."""
    progress = dict(job.get("progress") or {})
    progress.update({k: it.get(k) for k in ("iteration", "meta_loss", "lr", "momentum")})
    return {**job, "progress": progress}


def follow(
    http: httpx.Client,
    job_id: str,
    *,
    fetch: Callable[[], dict[str, Any]],
    deadline: float | None,
    timeout: float | None,
    on_progress: Callable[[dict[str, Any]], None] | None,
) -> dict[str, Any] | None:
    """Follows the job's events until its final status event and returns that body; None when the
    caller should poll instead: the server has no events route (404/405: an older server; a job that
    does not exist is then told by polling), cannot be reached, or the stream dropped twice (it is
    resumed once with Last-Event-ID). ``fetch`` gets the job's body (GET /v1/jobs/{id}), needed
    only when a stream starts with iterations before its status event. TimeoutError once past
    ``deadline`` (time.monotonic(); ``timeout`` is for the message), looked at after each line (an
    event or a ping); a read waits at most until the deadline (or READ_SECONDS)."""
    job: dict[str, Any] | None = None
    last_id: str | None = None

    def check_deadline() -> None:
        if deadline is not None and time.monotonic() > deadline:
            status = job["status"] if job else "not finished"
            raise TimeoutError(f"job {job_id} still {status} after {timeout}s")

    for _attempt in range(2):  # the stream, then once resumed after a drop
        read = READ_SECONDS if deadline is None else min(READ_SECONDS, max(deadline - time.monotonic(), 0.1))
        try:
            with closing(stream_lines(http, job_id, last_id, read=read)) as lines:
                for event in lines:
                    if event is not None and isinstance(event.data, dict):
                        last_id = event.id or last_id
                        if event.event == "status":
                            job = event.data
                        elif event.event == "iteration":
                            job = with_iteration(job if job is not None else fetch(), event.data)
                        else:
                            continue
                        if on_progress:
                            on_progress(job)
                        if event.event == "status" and job["status"] in TERMINAL_STATUSES:
                            return job  # the stream's last event
                    check_deadline()
        except GradtuneError as exc:
            if exc.status_code in FALLBACK_STATUSES:
                return None
            raise
        except httpx.TransportError:  # dropped (or silent for READ_SECONDS): resume once, then poll
            pass
        check_deadline()
    return None
