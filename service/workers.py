"""Which worker processes are alive, where, on what device, and what they run.

A worker process registers when Celery says it is ready (worker/celery_app.py starts a
``WorkerBeat``): one row in ``workers`` with its host, pid, device and queues. A thread refreshes
``last_seen`` every ``heartbeat_seconds``; worker/runner.py calls ``record_current_job`` when a chunk
starts and the Celery ``task_postrun`` signal clears it; a clean shutdown deletes the row. A worker
killed outright leaves its row behind, no longer refreshed.

Liveness is decided by the database's clock (service/db/clock.py), like the jobs' leases: a worker is
live when its ``last_seen`` is within ``worker_stale_seconds`` of the database's now. ``GET
/v1/workers`` lists the rows with that verdict and ``/readyz`` needs one live worker (unless
``ready_needs_worker`` is false). Rows not seen for ``PRUNE_AFTER_S`` are deleted when a worker
registers.

Nothing here imports torch or the worker package.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from service.db.clock import as_utc, database_now
from service.db.models import Worker
from service.logs import set_worker_id

log = logging.getLogger("gradtune.worker.registry")

PRUNE_AFTER_S = 24 * 3600.0
_KEEP: Any = object()


def new_worker_id() -> str:
    return uuid.uuid4().hex


def register(session: Session, *, worker_id: str, host: str, pid: int, device: str, queues: Sequence[str]) -> Worker:
    """Write (or rewrite) the worker's row, started and seen now (database clock)."""
    now = database_now(session)
    session.execute(delete(Worker).where(Worker.last_seen < now - timedelta(seconds=PRUNE_AFTER_S)))
    row = session.get(Worker, worker_id)
    if row is None:
        row = Worker(id=worker_id, started_at=now)
        session.add(row)
    row.host, row.pid, row.device, row.queues = host[:255], pid, device[:64], list(queues)
    row.last_seen, row.current_job = now, None
    session.flush()
    return row


def beat(session: Session, *, worker_id: str, current_job: str | None = _KEEP) -> bool:
    """Refresh ``last_seen`` (and set ``current_job`` when given); False when the row is gone."""
    values: dict[str, Any] = {"last_seen": database_now(session)}
    if current_job is not _KEEP:
        values["current_job"] = current_job
    result = session.execute(update(Worker).where(Worker.id == worker_id).values(**values))
    return bool(getattr(result, "rowcount", 0))


def deregister(session: Session, *, worker_id: str) -> None:
    session.execute(delete(Worker).where(Worker.id == worker_id))


def live_cutoff(session: Session, stale_after_s: float) -> datetime:
    """Workers seen at or after this (database clock) are live."""
    return database_now(session) - timedelta(seconds=stale_after_s)


def list_workers(
    session: Session, *, stale_after_s: float, limit: int = 100, offset: int = 0
) -> tuple[list[tuple[Worker, bool]], int, int]:
    """``([(worker, live), ...], total, live_total)``: most recently seen first."""
    cutoff = live_cutoff(session, stale_after_s)
    total = session.scalar(select(func.count()).select_from(Worker)) or 0
    live = session.scalar(select(func.count()).select_from(Worker).where(Worker.last_seen >= cutoff)) or 0
    rows = session.scalars(select(Worker).order_by(Worker.last_seen.desc(), Worker.id).limit(limit).offset(offset))
    return [(w, as_utc(w.last_seen) >= cutoff) for w in rows], total, live


def any_live(session: Session, *, stale_after_s: float) -> bool:
    cutoff = live_cutoff(session, stale_after_s)
    return session.scalar(select(Worker.id).where(Worker.last_seen >= cutoff).limit(1)) is not None


def _default_scope() -> AbstractContextManager[Session]:
    from service.db.session import session_scope

    return session_scope()


class WorkerBeat:
    """This process's registration: the row, and the thread that keeps it fresh."""

    def __init__(
        self,
        *,
        device: str,
        queues: Sequence[str],
        every: float,
        scope: Callable[[], AbstractContextManager[Session]] = _default_scope,
        host: str | None = None,
        pid: int | None = None,
    ) -> None:
        self.worker_id = new_worker_id()
        self.host = host or socket.gethostname()
        self.pid = pid if pid is not None else os.getpid()
        self.device, self.queues, self.every = device, list(queues), every
        self.current_job: str | None = None
        self._scope = scope
        self._lock = threading.Lock()  # one write at a time from this process
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gradtune-worker-beat", daemon=True)

    def _register(self, db: Session) -> None:
        register(db, worker_id=self.worker_id, host=self.host, pid=self.pid, device=self.device, queues=self.queues)
        if self.current_job is not None:
            beat(db, worker_id=self.worker_id, current_job=self.current_job)

    def beat_once(self, current_job: str | None = _KEEP) -> None:
        """One refresh (re-registering when the row is gone); errors are logged, not raised."""
        with self._lock:
            if current_job is not _KEEP:
                self.current_job = current_job
            try:
                with self._scope() as db:
                    if not beat(db, worker_id=self.worker_id, current_job=self.current_job):
                        self._register(db)
            except Exception:  # the next beat may work; a worker is not stopped by its registry
                log.exception("worker %s: could not refresh its registration", self.worker_id)

    def _run(self) -> None:
        while not self._done.wait(self.every):
            self.beat_once()

    def start(self) -> WorkerBeat:
        self.beat_once()
        self._thread.start()
        log.info(
            "worker %s registered: %s pid %d, %s, queues %s",
            self.worker_id,
            self.host,
            self.pid,
            self.device,
            ",".join(self.queues),
        )
        return self

    def stop(self) -> None:
        """Stop refreshing and delete the row (a clean shutdown)."""
        self._done.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.every + 5)
        with self._lock:
            try:
                with self._scope() as db:
                    deregister(db, worker_id=self.worker_id)
            except Exception:
                log.exception("worker %s: could not remove its registration", self.worker_id)


_active: WorkerBeat | None = None


def start_registration(*, device: str, queues: Sequence[str], every: float) -> WorkerBeat:
    """Register this process as a worker and keep the row fresh (worker/celery_app.py, on ready)."""
    global _active
    if _active is not None:
        _active.stop()
    _active = WorkerBeat(device=device, queues=queues, every=every)
    set_worker_id(_active.worker_id)  # this process's log lines carry it from now on
    return _active.start()


def stop_registration() -> None:
    global _active
    if _active is not None:
        _active.stop()
        _active = None
        set_worker_id(None)


def record_current_job(job_id: str | None) -> None:
    """The job whose chunk this worker runs now (None: none). A no-op outside a registered worker
    (tests that call the runner directly); never raises."""
    if _active is not None:
        _active.beat_once(current_job=job_id)
