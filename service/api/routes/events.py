"""GET /v1/jobs/{id}/events: live progress as Server-Sent Events (sse-starlette).

One ``iteration`` event per committed meta-iteration (id ``N``, data: iteration, meta_loss, lr,
momentum, accepted, step_size) and one ``status`` event per change of the job's status (id
``N:status`` with N the job's iteration then, data: the job's body as GET /v1/jobs/{id} gives it).
A new stream starts with every iteration so far and the current status; the stream ends after the
status event of a finished job, or with an ``error`` event once the stream's key is revoked (checked
at every poll). Resumable: with ``Last-Event-ID`` the stream sends only iterations
after the one named, and the current status unless the last event seen was that status.

Each stream reads the job through the read engine (no write lock on SQLite) every
``GRADTUNE_EVENTS_POLL_SECONDS``; a comment line keeps idle connections open.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Path, Request
from sqlalchemy import Engine, select
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from gradtune.spec import TERMINAL_STATUSES
from service import placement, repository
from service.api.auth import PrincipalDep
from service.api.deps import ReaderDep
from service.api.errors import Message
from service.db.models import ApiKey
from service.keys import Principal
from service.schemas import Text
from service.settings import Settings

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

PING_SECONDS = 15
_LAST_ID = re.compile(r"^(\d{1,9})(?::([a-z]{1,16}))?$")


def _resume_point(last_event_id: str | None) -> tuple[int, str | None]:
    """(last iteration seen, last status seen) from a Last-Event-ID; (0, None) when absent or not ours."""
    match = _LAST_ID.fullmatch((last_event_id or "").strip())
    if match is None:
        return 0, None
    return int(match.group(1)), match.group(2)


def _iteration(row: Any) -> dict[str, Any]:
    return {
        "iteration": row.iteration,
        "meta_loss": repository.finite_or_none(row.meta_loss),
        "lr": row.lr,
        "momentum": row.momentum,
        "accepted": row.accepted,
        "step_size": repository.finite_or_none(row.step_size),
    }


def _read(reader: Engine, job_id: str, tenant: str | None, after: int) -> tuple[Any, list[Any]]:
    """The job's public row and its iterations after ``after``, read in one transaction (so a
    finished job comes with all its iterations)."""
    with reader.connect() as conn, conn.begin():
        job = repository.get_job_status(conn, job_id=job_id, tenant=tenant)
        rows = repository.history_after(conn, job_id=job_id, after=after) if job is not None else []
    return job, rows


def _key_refused(reader: Engine, key_id: str) -> str | None:
    """Why the stream's key can no longer be used (revoked, or gone), or None: checked at every poll,
    so revoking a key ends its open streams within GRADTUNE_EVENTS_POLL_SECONDS."""
    with reader.connect() as conn:
        row = conn.execute(select(ApiKey.revoked_at).where(ApiKey.id == key_id)).first()
    if row is None:
        return f"the API key {key_id} no longer exists"
    if row.revoked_at is not None:
        return f"the API key {key_id} was revoked; ask an admin for a new one"
    return None


def _body(reader: Engine, settings: Settings, job: Any) -> str:
    """The job's body as GET /v1/jobs/{id} gives it (``waiting``: the worker registry read now)."""
    with reader.connect() as conn:
        return placement.public_job(conn, job, settings).model_dump_json()


async def _events(
    request: Request, reader: Engine, principal: Principal, job_id: str, after: int, seen: str | None, first: Any
) -> AsyncIterator[ServerSentEvent]:
    poll = request.app.state.settings.events_poll_seconds
    tenant = principal.scope()
    job, rows = first
    while True:
        for row in rows:
            yield ServerSentEvent(json.dumps(_iteration(row)), event="iteration", id=str(row.iteration))
            after = row.iteration
        if job.status != seen:
            body = await run_in_threadpool(_body, reader, request.app.state.settings, job)
            yield ServerSentEvent(body, event="status", id=f"{job.iteration}:{job.status}")
            seen = job.status
        if job.status in TERMINAL_STATUSES or await request.is_disconnected():
            return
        await asyncio.sleep(poll)
        refused = await run_in_threadpool(_key_refused, reader, principal.key_id)
        if refused is not None:  # the stream ends; a resumed one gets the 401
            yield ServerSentEvent(json.dumps({"detail": refused}), event="error")
            return
        job, rows = await run_in_threadpool(_read, reader, job_id, tenant, after)
        if job is None:  # deleted meanwhile
            return


@router.get(
    "/{job_id}/events",
    summary="Live progress (Server-Sent Events)",
    response_class=EventSourceResponse,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "`event: iteration` per committed meta-iteration (`id: N`), `event: status` per "
            "status change (`id: N:status`, data: the job's body); ends after a finished job's status, or "
            "with `event: error` (data: `detail`) once the key is revoked. Send `Last-Event-ID` to resume.",
        },
        404: {"model": Message, "description": "No job with that id."},
    },
)
async def job_events(
    job_id: Annotated[Text, Path(description="The job id returned by POST /v1/jobs.")],
    request: Request,
    reader: ReaderDep,
    principal: PrincipalDep,
    last_event_id: Annotated[str | None, Header(max_length=64)] = None,
) -> EventSourceResponse:
    after, seen = _resume_point(last_event_id)
    first = await run_in_threadpool(_read, reader, job_id, principal.scope(), after)
    if first[0] is None:
        raise HTTPException(status_code=404, detail=f"job {job_id} not found")
    stream = _events(request, reader, principal, job_id, after, seen, first)
    return EventSourceResponse(stream, ping=PING_SECONDS, headers={"Cache-Control": "no-store"})
