"""The job's life on the worker side: claim, heartbeat, commit a chunk, finish.

Invariants (every function here keeps them; tests/worker and tests/service/test_leases.py check them):
- A job is worked on by at most one lease at a time. ``claim_job`` takes the row lock (SELECT ...
  FOR UPDATE; BEGIN IMMEDIATE on SQLite), refuses while any lease's heartbeat is fresh, and else
  hands out a fresh random token: one lease per delivery. The Celery task id is not the token: a
  message Redis redelivers after the visibility timeout carries the same task id, and must not
  pass for the worker still running it.
- A chunk message names the iteration it starts at; a message whose iteration is not the job's
  current one is stale (a duplicate or a redelivery) and does nothing.
- A chunk's history rows, checkpoint and progress are written in one transaction, and only by the
  lease that still holds the job, so history has no gap and no duplicate iteration whatever
  crashes in between.
- ``attempts`` counts the claims of the current iteration since the last commit; at
  ``max_attempts`` the job fails ("worker lost 3 times at iteration 4") instead of being claimed
  again: a chunk that kills its worker is not retried forever.
- A cancel request wins: a job whose cancel was requested ends ``cancelled`` at its next commit
  or finish, never ``succeeded``; both take the row lock the cancel request takes too.
- ``enqueued_at`` says a chunk message is outstanding (sent and not yet claimed): the sweep sends
  another only when there is none, or when the outstanding one is older than the visibility
  timeout (then it is presumed lost), so a job waiting for a free worker gets one message.
- Finished jobs (succeeded, failed, cancelled) never change again.
- Liveness is judged by the database's clock only (service.db.clock): a transaction reads the
  database's now once and writes and compares with it; a heartbeat writes ``db_now()`` itself.
  The hosts' clocks never enter, so workers and API processes with drifting clocks agree.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, select, update
from sqlalchemy.orm import Session

from gradtune.spec import TERMINAL_STATUSES, JobStatus
from service.db.clock import as_utc, database_now, db_now
from service.db.models import Job, JobIteration

QUEUED, RUNNING = JobStatus.QUEUED.value, JobStatus.RUNNING.value
CANCELLED, SUCCEEDED, FAILED = JobStatus.CANCELLED.value, JobStatus.SUCCEEDED.value, JobStatus.FAILED.value

# Why a search ended before its iterations (jobs.stopped, the job body's and the settings' "stopped").
DEADLINE = "deadline"


@dataclass(frozen=True)
class Claim:
    job_id: str
    token: str  # the lease: every later call of this chunk names it
    iteration: int
    iterations: int
    spec: dict[str, Any]
    checkpoint: dict[str, Any] | None
    cancel_requested: bool
    attempts: int = 1  # claims of this iteration so far, this one included
    max_seconds: float | None = None  # the job's deadline (None: the settings' default)
    elapsed_seconds: float = 0.0  # chunk wall time spent before this claim
    stopped: str | None = None  # the search already ended early ("deadline"): evaluate and finish
    tenant: str = "default"  # whose job: the datasets and models it names must be this tenant's


def new_token() -> str:
    """A lease token: random, never reused, whatever message or worker asks."""
    return secrets.token_hex(16)


def lost_error(attempts: int, iteration: int) -> str:
    return (
        f"worker lost {attempts} times at iteration {iteration}: each claim of this chunk ended without a "
        "commit (the worker was killed, ran out of memory or lost the database); the job is not retried again."
    )


def _lock(session: Session, job_id: str) -> Job | None:
    return session.execute(select(Job).where(Job.id == job_id).with_for_update()).scalar_one_or_none()


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def _live(job: Job, now: datetime, stale_after_s: float) -> bool:
    """Does a lease hold the job, with a heartbeat younger than ``stale_after_s``?"""
    if not job.lease_owner or job.heartbeat_at is None:
        return False
    return now - as_utc(job.heartbeat_at) < timedelta(seconds=stale_after_s)


def _end(job: Job, now: datetime, status: str, **values: Any) -> None:
    job.status = status
    for k, v in values.items():
        setattr(job, k, v)
    job.finished_at = now
    job.updated_at = now
    job.lease_owner = None
    job.enqueued_at = None


def claim_job(
    session: Session, *, job_id: str, iteration: int | None, stale_after_s: float, max_attempts: int = 3
) -> Claim | None:
    """Take the job for one chunk under a fresh lease token, or return None when the message has
    nothing to do: the job is finished, the message is stale, or a live lease holds the job.

    A lease stands while its heartbeat is younger than ``stale_after_s`` by the database's clock,
    whoever asks. A job already claimed ``max_attempts`` times at this iteration without a commit
    fails here rather than run again (a job whose cancel was requested is handed out to be cancelled).
    """
    job = _lock(session, job_id)
    if job is None or job.status in TERMINAL_STATUSES:
        return None
    if iteration is not None and iteration != job.iteration:
        return None  # a stale or duplicate message
    now = database_now(session)
    if _live(job, now, stale_after_s):
        return None  # someone alive is on it: a redelivered message cannot take over
    if job.attempts >= max_attempts and not job.cancel_requested:
        _end(job, now, FAILED, error=lost_error(job.attempts, job.iteration))
        session.flush()
        return None
    token = new_token()
    job.status = RUNNING
    job.started_at = job.started_at or now
    job.lease_owner = token
    job.heartbeat_at = now
    job.updated_at = now
    job.enqueued_at = None  # the message is consumed
    job.attempts = (job.attempts or 0) + 1
    if not job.cancel_requested and job.iteration < job.iterations:
        job.chunks_started += 1
    session.flush()
    return Claim(
        job_id=job.id,
        token=token,
        iteration=job.iteration,
        iterations=job.iterations,
        spec=job.spec,
        checkpoint=job.checkpoint,
        cancel_requested=job.cancel_requested,
        attempts=job.attempts,
        max_seconds=job.max_seconds,
        elapsed_seconds=float(job.elapsed_seconds or 0.0),
        stopped=job.stopped,
        tenant=job.tenant,
    )


def heartbeat(session: Session, *, job_id: str, token: str) -> bool:
    """Refresh the lease; False means it was lost (the chunk's work will be discarded).

    The new heartbeat is the database's time, written by the UPDATE itself.
    """
    res = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == token, Job.status == RUNNING)
        .values(heartbeat_at=db_now())
        .execution_options(synchronize_session=False)
    )
    return cast("CursorResult[Any]", res).rowcount == 1


def cancel_requested(session: Session, *, job_id: str) -> bool:
    """Has a cancel been requested (or has the job ended meanwhile)? Read by each heartbeat."""
    row = session.execute(select(Job.cancel_requested, Job.status).where(Job.id == job_id)).one_or_none()
    return row is None or bool(row[0]) or row[1] in TERMINAL_STATUSES


def set_device(session: Session, *, job_id: str, token: str, device: str) -> None:
    session.execute(update(Job).where(Job.id == job_id, Job.lease_owner == token).values(device=device))


def _add_history(session: Session, job_id: str, records: list[dict[str, Any]], now: datetime) -> None:
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


def commit_chunk(
    session: Session,
    *,
    job_id: str,
    token: str,
    start_iteration: int,
    records: list[dict[str, Any]],
    checkpoint: dict[str, Any],
    elapsed_seconds: float = 0.0,
    stopped: str | None = None,
) -> str | None:
    """Write a chunk's history, checkpoint and progress at once, and release the lease.

    Returns None (writing nothing) when the lease was lost meanwhile; else the job's status:
    ``"running"`` (the caller sends the next chunk's message, which ``enqueued_at`` already
    announces) or ``"cancelled"`` (a cancel was requested: the chunk's work is kept, the job ends).
    ``stopped`` ("deadline") ends the search: the next chunk evaluates and finishes.
    """
    job = _lock(session, job_id)
    if job is None or job.status != RUNNING or job.lease_owner != token or job.iteration != start_iteration:
        return None
    expected = list(range(start_iteration + 1, start_iteration + 1 + len(records)))
    got = [int(r["iteration"]) for r in records]
    if got != expected:
        raise ValueError(f"chunk iterations {got} do not follow iteration {start_iteration}")
    now = database_now(session)
    _add_history(session, job_id, records, now)
    if records:
        last = records[-1]
        job.iteration = int(last["iteration"])
        job.meta_loss = _finite(last.get("meta_loss"))
        job.lr = float(last["lr"])
        job.momentum = float(last["momentum"])
    job.checkpoint = checkpoint
    job.chunks_committed += 1
    job.attempts = 0
    job.elapsed_seconds = float(job.elapsed_seconds or 0.0) + max(0.0, float(elapsed_seconds))
    job.stopped = job.stopped or stopped
    job.heartbeat_at = now
    if job.cancel_requested:
        _end(job, now, CANCELLED)
    else:
        job.lease_owner = None
        job.updated_at = now
        job.enqueued_at = now
    session.flush()
    return job.status


def clear_enqueued(session: Session, *, job_id: str, iteration: int) -> None:
    """The message announced for ``iteration`` could not be sent: the sweep may send one (once
    the job is stale) rather than wait for the visibility timeout."""
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.iteration == iteration, Job.lease_owner.is_(None))
        .values(enqueued_at=None)
        .execution_options(synchronize_session=False)
    )


def forget_messages(session: Session) -> int:
    """The broker connection was lost and is back: the broker may have restarted and lost the
    messages it held (Redis without persistence does). Forget every outstanding message of a job no
    lease holds, so that the sweep sends one as soon as the job is stale instead of waiting for the
    visibility timeout; a message that did survive becomes a harmless duplicate (stale, or refused
    by the live lease). Returns how many jobs were touched."""
    res = session.execute(
        update(Job)
        .where(Job.status.in_((QUEUED, RUNNING)), Job.lease_owner.is_(None), Job.enqueued_at.is_not(None))
        .values(enqueued_at=None)
        .execution_options(synchronize_session=False)
    )
    return int(cast("CursorResult[Any]", res).rowcount or 0)


def _held(session: Session, job_id: str, token: str) -> Job | None:
    """The job, under its row lock, if it is unfinished and ``token``'s lease holds it."""
    job = _lock(session, job_id)
    if job is None or job.status in TERMINAL_STATUSES or job.lease_owner != token:
        return None
    return job


def _finish(session: Session, job: Job, elapsed_seconds: float, status: str, **values: Any) -> str:
    job.elapsed_seconds = float(job.elapsed_seconds or 0.0) + max(0.0, float(elapsed_seconds))
    _end(job, database_now(session), status, **values)
    session.flush()
    return status


def finish_job(
    session: Session, *, job_id: str, token: str, result: dict[str, Any], elapsed_seconds: float = 0.0
) -> str | None:
    """End the job with its settings: ``"succeeded"``, or ``"cancelled"`` when a cancel was
    requested meanwhile (a cancelled job never ends succeeded); None when the lease was lost.
    A search stopped early says why in the result (``"stopped": "deadline"``)."""
    job = _held(session, job_id, token)
    if job is None:
        return None
    if job.cancel_requested:
        return _finish(session, job, elapsed_seconds, CANCELLED)
    if job.stopped:
        result = {**result, "stopped": job.stopped}
    return _finish(
        session, job, elapsed_seconds, SUCCEEDED, result=result, lr=result["lr"], momentum=result["momentum"]
    )


def fail_job(session: Session, *, job_id: str, token: str, error: str, elapsed_seconds: float = 0.0) -> bool:
    job = _held(session, job_id, token)
    return job is not None and bool(_finish(session, job, elapsed_seconds, FAILED, error=error))


def cancel_job(session: Session, *, job_id: str, token: str, elapsed_seconds: float = 0.0) -> bool:
    job = _held(session, job_id, token)
    return job is not None and bool(_finish(session, job, elapsed_seconds, CANCELLED))


def sweep(
    session: Session,
    *,
    stale_after_s: float,
    visibility_timeout_s: float = 3600.0,
    max_attempts: int = 3,
    now: datetime | None = None,
) -> list[tuple[str, int]]:
    """Jobs to send a chunk message for: their worker died (stale heartbeat) or they wait with no
    message outstanding. Returns (job_id, iteration) pairs to enqueue once this transaction commits.

    A job is stale when its lease's heartbeat (running) or its last change (queued) is older than
    ``stale_after_s``; it gets a message only when none is outstanding (``enqueued_at`` unset, or
    older than ``visibility_timeout_s``: presumed lost). Each found job is marked as just seen and
    as having a message outstanding, so no sweep (on this worker or another) sends a second one. A
    stale job whose cancel was requested is cancelled here; one claimed ``max_attempts`` times at
    its iteration without a commit fails here. ``now`` defaults to the database's clock (tests
    simulate the passing of time with it); the cutoffs are computed from it and compared in SQL.
    """
    now = now or database_now(session)
    cutoff = now - timedelta(seconds=stale_after_s)
    presumed_lost = now - timedelta(seconds=visibility_timeout_s)
    stmt = (
        select(Job)
        .where(
            ((Job.status == RUNNING) & (Job.heartbeat_at.is_(None) | (Job.heartbeat_at < cutoff)))
            | ((Job.status == QUEUED) & (Job.updated_at < cutoff)),
            Job.enqueued_at.is_(None) | (Job.enqueued_at < presumed_lost),
        )
        .order_by(Job.created_at)
        .limit(100)
        .with_for_update(skip_locked=True)
    )
    out = []
    for job in session.execute(stmt).scalars():
        if job.status == RUNNING and job.cancel_requested:
            _end(job, now, CANCELLED)
            continue
        if job.status == RUNNING and (job.attempts or 0) >= max_attempts:
            _end(job, now, FAILED, error=lost_error(job.attempts, job.iteration))
            continue
        if job.status == RUNNING:
            job.lease_owner = None
            job.heartbeat_at = now
        job.updated_at = now
        job.enqueued_at = now
        out.append((job.id, job.iteration))
    session.flush()
    return out
