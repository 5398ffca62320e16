"""The job's life on the worker side: claim, heartbeat, commit a chunk, finish.

Invariants (every function here keeps them; tests/worker checks them):
- A job is worked on by at most one claim at a time: ``claim_job`` takes the row
  lock (SELECT ... FOR UPDATE; BEGIN IMMEDIATE on SQLite) and refuses while another
  owner's heartbeat is fresh.
- A chunk message names the iteration it starts at; a message whose iteration is
  not the job's current one is stale (a duplicate or a redelivery) and does nothing.
- A chunk's history rows, checkpoint and progress are written in one transaction,
  and only by the owner that still holds the claim, so history has no gap and no
  duplicate iteration whatever crashes in between.
- Finished jobs (succeeded, failed, cancelled) never change again.
- Liveness is judged by the database's clock only (service.db.clock): a transaction reads the
  database's now once and writes and compares with it; a heartbeat writes ``db_now()`` itself.
  The hosts' clocks never enter, so workers and API processes with drifting clocks agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, select, update
from sqlalchemy.orm import Session

from gradtune.spec import TERMINAL_STATUSES, JobStatus
from service.db.clock import as_utc, database_now, db_now
from service.db.models import Job, JobIteration

QUEUED, RUNNING = JobStatus.QUEUED.value, JobStatus.RUNNING.value


@dataclass(frozen=True)
class Claim:
    job_id: str
    owner: str
    iteration: int
    iterations: int
    spec: dict[str, Any]
    checkpoint: dict[str, Any] | None
    cancel_requested: bool


def _lock(session: Session, job_id: str) -> Job | None:
    return session.execute(select(Job).where(Job.id == job_id).with_for_update()).scalar_one_or_none()


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def claim_job(
    session: Session, *, job_id: str, owner: str, iteration: int | None, stale_after_s: float
) -> Claim | None:
    """Take the job for one chunk, or return None when the message has nothing to do.

    Another owner's claim stands while its heartbeat is younger than ``stale_after_s`` by the
    database's clock.
    """
    job = _lock(session, job_id)
    if job is None or job.status in TERMINAL_STATUSES:
        return None
    if iteration is not None and iteration != job.iteration:
        return None  # a stale or duplicate message
    now = database_now(session)
    if job.lease_owner and job.lease_owner != owner and job.heartbeat_at is not None:
        if now - as_utc(job.heartbeat_at) < timedelta(seconds=stale_after_s):
            return None  # someone alive is on it
    job.status = RUNNING
    job.started_at = job.started_at or now
    job.lease_owner = owner
    job.heartbeat_at = now
    job.updated_at = now
    if not job.cancel_requested and job.iteration < job.iterations:
        job.chunks_started += 1
    session.flush()
    return Claim(
        job_id=job.id,
        owner=owner,
        iteration=job.iteration,
        iterations=job.iterations,
        spec=job.spec,
        checkpoint=job.checkpoint,
        cancel_requested=job.cancel_requested,
    )


def heartbeat(session: Session, *, job_id: str, owner: str) -> bool:
    """Refresh the claim; False means it was lost (the chunk's work will be discarded).

    The new heartbeat is the database's time, written by the UPDATE itself.
    """
    res = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == owner, Job.status == RUNNING)
        .values(heartbeat_at=db_now())
        .execution_options(synchronize_session=False)
    )
    return cast("CursorResult[Any]", res).rowcount == 1


def set_device(session: Session, *, job_id: str, owner: str, device: str) -> None:
    session.execute(update(Job).where(Job.id == job_id, Job.lease_owner == owner).values(device=device))


def commit_chunk(
    session: Session,
    *,
    job_id: str,
    owner: str,
    start_iteration: int,
    records: list[dict[str, Any]],
    checkpoint: dict[str, Any],
) -> bool:
    """Write a chunk's history, checkpoint and progress at once, and release the claim.

    Returns False (writing nothing) when the claim was lost meanwhile.
    """
    job = _lock(session, job_id)
    if job is None or job.status != RUNNING or job.lease_owner != owner or job.iteration != start_iteration:
        return False
    expected = list(range(start_iteration + 1, start_iteration + 1 + len(records)))
    got = [int(r["iteration"]) for r in records]
    if got != expected:
        raise ValueError(f"chunk iterations {got} do not follow iteration {start_iteration}")
    now = database_now(session)
    core = {"iteration", "meta_loss", "lr", "momentum", "accepted", "step_size"}
    for r in records:
        session.add(
            JobIteration(
                job_id=job_id,
                iteration=int(r["iteration"]),
                meta_loss=_finite(r.get("meta_loss")),
                lr=float(r["lr"]),
                momentum=float(r["momentum"]),
                accepted=bool(r.get("accepted", True)),
                step_size=_finite(r.get("step_size")),
                extra={k: v for k, v in r.items() if k not in core} or None,
                created_at=now,
            )
        )
    if records:
        last = records[-1]
        job.iteration = int(last["iteration"])
        job.meta_loss = _finite(last.get("meta_loss"))
        job.lr = float(last["lr"])
        job.momentum = float(last["momentum"])
    job.checkpoint = checkpoint
    job.chunks_committed += 1
    job.lease_owner = None
    job.heartbeat_at = now
    job.updated_at = now
    session.flush()
    return True


def _finish(session: Session, job_id: str, owner: str, **values: Any) -> bool:
    job = _lock(session, job_id)
    if job is None or job.status in TERMINAL_STATUSES or job.lease_owner != owner:
        return False
    now = database_now(session)
    for k, v in values.items():
        setattr(job, k, v)
    job.finished_at = now
    job.updated_at = now
    job.lease_owner = None
    session.flush()
    return True


def finish_job(session: Session, *, job_id: str, owner: str, result: dict[str, Any]) -> bool:
    return _finish(
        session,
        job_id,
        owner,
        status=JobStatus.SUCCEEDED.value,
        result=result,
        lr=result["lr"],
        momentum=result["momentum"],
    )


def fail_job(session: Session, *, job_id: str, owner: str, error: str) -> bool:
    return _finish(session, job_id, owner, status=JobStatus.FAILED.value, error=error)


def cancel_job(session: Session, *, job_id: str, owner: str) -> bool:
    return _finish(session, job_id, owner, status=JobStatus.CANCELLED.value)


def sweep(session: Session, *, stale_after_s: float) -> list[tuple[str, int]]:
    """Jobs whose worker died (stale heartbeat) or whose message was lost (queued too long).

    Marks each as just seen, so the next sweep waits another ``stale_after_s``,
    and returns (job_id, iteration) pairs to enqueue once this transaction commits.
    "Stale" is older than ``stale_after_s`` by the database's clock: the cutoff is computed from
    one read of it and compared in SQL.
    """
    now = database_now(session)
    cutoff = now - timedelta(seconds=stale_after_s)
    stmt = (
        select(Job)
        .where(
            ((Job.status == RUNNING) & (Job.heartbeat_at.is_(None) | (Job.heartbeat_at < cutoff)))
            | ((Job.status == QUEUED) & (Job.updated_at < cutoff))
        )
        .order_by(Job.created_at)
        .limit(100)
        .with_for_update(skip_locked=True)
    )
    out = []
    for job in session.execute(stmt).scalars():
        if job.status == RUNNING:
            job.lease_owner = None
            job.heartbeat_at = now
        job.updated_at = now
        out.append((job.id, job.iteration))
    session.flush()
    return out
