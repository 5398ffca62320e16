"""Keyword-only data functions for the API side.

Every function takes an open ``Session`` and leaves committing to the caller, so that a
request does its writes in one transaction and can enqueue work only after that commit.
Nothing here returns a job's ``spec`` to a client: ``to_public`` builds the public view from
the progress columns only (a spec can hold megabytes of inline arrays).
"""

from __future__ import annotations

import math
import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, defer

from service.db.models import Job, JobIteration, utcnow
from service.schemas import TERMINAL_STATUSES, JobPublic, Progress


class NotFound(LookupError):
    """No job with that id."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id} not found")
        self.job_id = job_id


class Conflict(Exception):
    """The request does not fit the job's current status."""


# Columns a listing never needs: the body (inline arrays), engine state, the result.
_HEAVY = (defer(Job.spec), defer(Job.checkpoint), defer(Job.result))


def create_job(session: Session, *, spec: dict[str, Any], name: str, iterations: int) -> Job:
    """Insert a queued job. ``spec`` is the validated body (``JobCreate.model_dump(mode="json")``).

    Progress starts at iteration 0 with the starting lr and momentum, so a client polling a
    queued job already sees the values the tuning begins from.
    """
    hyper = spec.get("hyperparameters") or {}
    now = utcnow()
    job = Job(
        id=str(uuid.uuid4()),
        name=name,
        status="queued",
        spec=spec,
        created_at=now,
        updated_at=now,
        iteration=0,
        iterations=iterations,
        lr=hyper.get("lr"),
        momentum=hyper.get("momentum"),
        cancel_requested=False,
        chunks_started=0,
        chunks_committed=0,
    )
    session.add(job)
    session.flush()
    return job


def get_job(session: Session, *, job_id: str) -> Job | None:
    """The job, or None. Its spec and checkpoint load only if accessed."""
    return session.scalar(
        select(Job).where(Job.id == job_id).options(defer(Job.spec), defer(Job.checkpoint))
    )


def list_jobs(
    session: Session, *, status: str | None = None, limit: int = 20, offset: int = 0
) -> tuple[list[Job], int]:
    """A page of jobs, newest first, and the total count matching the filter."""
    where = [Job.status == status] if status else []
    total = session.scalar(select(func.count()).select_from(Job).where(*where)) or 0
    items = session.scalars(
        select(Job)
        .where(*where)
        .options(*_HEAVY)
        .order_by(Job.created_at.desc(), Job.id.desc())
        .limit(limit)
        .offset(offset)
    ).all()
    return list(items), total


def request_cancel(session: Session, *, job_id: str) -> Job:
    """Cancel a job, under its row lock (on SQLite the write lock of BEGIN IMMEDIATE).

    queued -> cancelled at once (finished_at set); running -> ``cancel_requested`` and the job
    stays running until its current chunk ends; a finished job raises ``Conflict``.
    Requesting again for a running job is harmless.
    """
    job = session.scalar(
        select(Job).where(Job.id == job_id).options(*_HEAVY).with_for_update()
    )
    if job is None:
        raise NotFound(job_id)
    now = utcnow()
    if job.status == "queued":
        job.status = "cancelled"
        job.finished_at = now
        job.updated_at = now
    elif job.status == "running":
        job.cancel_requested = True
        job.updated_at = now
    elif job.status in TERMINAL_STATUSES:
        raise Conflict(
            f"job {job_id} is already {job.status}; only queued or running jobs can be cancelled"
        )
    else:  # pragma: no cover - a status the schema does not know
        raise Conflict(f"job {job_id} has status {job.status!r} and cannot be cancelled")
    session.flush()
    return job


def list_history(session: Session, *, job_id: str) -> list[JobIteration]:
    """The job's meta-iterations in order (empty for an unknown job: check with get_job)."""
    return list(
        session.scalars(
            select(JobIteration)
            .where(JobIteration.job_id == job_id)
            .order_by(JobIteration.iteration)
        ).all()
    )


def _aware(value: datetime | None) -> datetime | None:
    """SQLite hands datetimes back without a zone; every stored time is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


def finite_or_none(value: float | None) -> float | None:
    """JSON has no NaN or Infinity: a diverged value reads as null."""
    if value is None or not math.isfinite(value):
        return None
    return value


def to_public(job: Job) -> JobPublic:
    return JobPublic(
        id=job.id,
        name=job.name,
        status=job.status,  # type: ignore[arg-type]
        progress=Progress(
            iteration=job.iteration or 0,
            iterations=job.iterations,
            meta_loss=finite_or_none(job.meta_loss),
            lr=finite_or_none(job.lr),
            momentum=finite_or_none(job.momentum),
        ),
        created_at=_aware(job.created_at),
        started_at=_aware(job.started_at),
        finished_at=_aware(job.finished_at),
        error=job.error,
    )
