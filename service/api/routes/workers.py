"""/v1/workers: the worker processes that registered, and which of them are live."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import select

from service import workers
from service.api.auth import PrincipalDep
from service.api.deps import SessionDep, SettingsDep
from service.db.clock import as_utc
from service.db.models import Job
from service.schemas import WorkerPublic, WorkersPublic

router = APIRouter(prefix="/v1/workers", tags=["workers"])


@router.get(
    "",
    response_model=WorkersPublic,
    summary="Registered workers, most recently seen first",
    description="Each worker process registers when it starts and refreshes `last_seen` every few "
    "seconds (GRADTUNE_HEARTBEAT_SECONDS); `live` is false once it has not been seen for "
    "GRADTUNE_WORKER_STALE_SECONDS (by the database's clock). `current_job` is the job whose chunk it "
    "runs now: shown only when it is one of the key's tenant's jobs (or to an admin key).",
)
def list_workers(
    session: SessionDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=100, description="Page size.")] = 100,
    offset: Annotated[int, Query(ge=0, le=1_000_000, description="Workers to skip.")] = 0,
) -> WorkersPublic:
    stale = settings.worker_stale_seconds
    rows, total, live = workers.list_workers(session, stale_after_s=stale, limit=limit, offset=offset)
    running = {w.current_job for w, _ in rows if w.current_job}
    if not principal.admin and running:  # another tenant's job id is not this key's to see
        running = set(session.scalars(select(Job.id).where(Job.id.in_(running), Job.tenant == principal.tenant)))
    items = [
        WorkerPublic(
            id=w.id,
            host=w.host,
            pid=w.pid,
            device=w.device,
            queues=list(w.queues or []),
            started_at=as_utc(w.started_at),
            last_seen=as_utc(w.last_seen),
            current_job=w.current_job if w.current_job in running else None,
            live=is_live,
        )
        for w, is_live in rows
    ]
    return WorkersPublic(items=items, total=total, live=live, stale_after_seconds=stale, limit=limit, offset=offset)
