"""Where a job's chunks go, and whether a live worker takes them (gradtune/spec/devices.py).

A job asks for a device (``auto``, ``cpu`` or ``cuda``; the ``requested_device`` column, copied from
its spec when it is created). Every chunk message of the job goes to that device's queue: the first
one (POST /v1/jobs), each next one (worker/runner.py after a commit) and the sweep's re-sends. A job
that has not ended and is not under a worker's lease says in ``waiting`` when no live worker
(service/workers.py, by the database's clock) consumes its queue: for a ``cuda`` job with no GPU
worker, "waiting for a GPU worker: ...". An ``auto`` job's queue is consumed by every worker, so it
waits only while no worker at all is live.

Nothing here imports torch or the worker package.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import Connection, select
from sqlalchemy.orm import Session

from gradtune.spec import TERMINAL_STATUSES, JobStatus
from gradtune.spec.devices import job_queue, waiting_message
from service.db.clock import as_utc, db_now
from service.db.models import Job, Worker
from service.repository import to_public
from service.schemas import JobPublic
from service.settings import Settings


def queue_for(settings: Settings, device: str | None) -> str:
    """The broker queue of a job asking for ``device`` (None: auto)."""
    return job_queue(settings.queue_name, device)


def live_queues(db: Session | Connection, *, stale_after_s: float) -> set[str]:
    """The queues that at least one live worker consumes (one query: the rows and the database's now)."""
    rows = db.execute(select(Worker.queues, Worker.last_seen, db_now())).all()
    if not rows:
        return set()
    cutoff = as_utc(rows[0][2]) - timedelta(seconds=stale_after_s)
    return {q for queues, seen, _now in rows if as_utc(seen) >= cutoff for q in (queues or [])}


def _may_wait(job: Any) -> bool:
    """Not ended, and not being run under a lease (a chunk in progress, or one whose worker died
    and which the sweep has not yet re-sent)."""
    if job.status in TERMINAL_STATUSES:
        return False
    return not (job.status == JobStatus.RUNNING.value and job.lease_owner is not None)


def waiting(job: Any, settings: Settings, live: set[str]) -> str | None:
    """What ``job`` (a Job or a repository.get_job_status row) waits for, given the live queues."""
    if not _may_wait(job):
        return None
    queue = queue_for(settings, job.requested_device)
    return None if queue in live else waiting_message(job.requested_device, queue)


def public_jobs(db: Session | Connection, jobs: Iterable[Any], settings: Settings) -> list[JobPublic]:
    """``repository.to_public`` of each job, with ``waiting`` set; the registry is read once, and only
    when a job may be waiting."""
    jobs = list(jobs)
    live: set[str] | None = None
    out = []
    for job in jobs:
        public = to_public(job)
        if _may_wait(job):
            if live is None:
                live = live_queues(db, stale_after_s=settings.worker_stale_seconds)
            public.waiting = waiting(job, settings, live)
        out.append(public)
    return out


def public_job(db: Session | Connection, job: Any, settings: Settings) -> JobPublic:
    return public_jobs(db, [job], settings)[0]


def requested_devices(db: Session, job_ids: Sequence[str]) -> dict[str, str]:
    """job id -> the device it asked for, for the sweep's re-sends."""
    if not job_ids:
        return {}
    rows = db.execute(select(Job.id, Job.requested_device).where(Job.id.in_(list(job_ids))))
    return {job_id: device or "auto" for job_id, device in rows}
