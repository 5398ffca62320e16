"""The repository on a real database (SQLite and PostgreSQL): the times it writes come from the
database's clock, not the host's, and a job's status is one of gradtune.spec's, which the
database itself enforces (ck_jobs_status).

``shift_python_clock`` moves the host clock that service code could read (``datetime`` and
``utcnow`` in its modules) days away; ``db_clock`` reads the database's own time with plain SQL.
tests/service/test_lifecycle.py uses both for the worker's side (claims, heartbeats, the sweep).
"""

from __future__ import annotations

import re
import typing
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

import service.db.models
import service.lifecycle
import service.repository
from gradtune.spec import ACTIVE_STATUSES, STATUSES, TERMINAL_STATUSES, JobStatus
from service import repository, schemas
from service.db.clock import as_utc, database_now, db_now
from service.db.models import Job
from service.db.session import make_engine

SERVICE_MODULES = (service.db.models, service.repository, service.lifecycle)
CLOCK_SLACK = timedelta(seconds=2)  # SQLite's CURRENT_TIMESTAMP has whole seconds


def db_clock(Session) -> datetime:
    """The database's current time, read with plain SQL (not through service.db.clock)."""
    with Session() as s:
        value = s.execute(text("SELECT CURRENT_TIMESTAMP")).scalar()
    if isinstance(value, str):  # SQLite: 'YYYY-MM-DD HH:MM:SS', UTC
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def near_db_clock(Session, value: datetime | None) -> bool:
    assert value is not None
    return abs(as_utc(value) - db_clock(Session)) < CLOCK_SLACK


def python_clock_shifter(monkeypatch) -> Callable[[timedelta], None]:
    """``shift(offset)``: from then on, the service modules' ``datetime.now`` and ``utcnow`` run
    ``offset`` away from the real time (undone with ``monkeypatch``)."""

    def shift(offset: timedelta) -> None:
        real = datetime

        class Shifted(real):
            @classmethod
            def now(cls, tz=None):
                return real.now(tz) + offset

            @classmethod
            def utcnow(cls):
                return real.utcnow() + offset

        for module in SERVICE_MODULES:
            if hasattr(module, "datetime"):
                monkeypatch.setattr(module, "datetime", Shifted)
            if hasattr(module, "utcnow"):
                monkeypatch.setattr(module, "utcnow", lambda: real.now(UTC) + offset)

    return shift


@pytest.fixture
def shift_python_clock(monkeypatch) -> Callable[[timedelta], None]:
    return python_clock_shifter(monkeypatch)


@pytest.fixture
def Session(db_url):
    engine = make_engine(db_url)
    yield sessionmaker(bind=engine, expire_on_commit=False)
    engine.dispose()


def test_the_shift_does_move_the_service_clock(shift_python_clock):
    shift_python_clock(timedelta(days=3))
    assert service.db.models.utcnow() - datetime.now(UTC) > timedelta(days=2)


def test_db_now_renders_each_dialects_clock():
    def sql(dialect) -> str:
        return str(select(db_now()).compile(dialect=dialect))

    assert sql(postgresql.dialect()) == "SELECT now() AS db_now_1"
    assert sql(sqlite.dialect()) == "SELECT strftime('%Y-%m-%d %H:%M:%f000', 'now') AS db_now_1"


def test_database_now_is_the_database_clock_in_utc_with_subsecond_resolution(Session, shift_python_clock):
    shift_python_clock(timedelta(days=-3))
    with Session() as s:
        values = [database_now(s) for _ in range(2)]
        s.rollback()  # PostgreSQL's now() is the transaction's start: take a new one
        values.append(database_now(s))
    assert all(v.utcoffset() == timedelta(0) for v in values)
    assert near_db_clock(Session, values[-1])
    # SQLite's CURRENT_TIMESTAMP would have whole seconds; db_now() keeps milliseconds at least.
    assert any(v.microsecond for v in values) or values[0] == values[-1]


def test_create_and_cancel_write_the_database_clock(Session, shift_python_clock):
    shift_python_clock(timedelta(days=3))
    with Session.begin() as s:
        job = repository.create_job(s, spec={"hyperparameters": {"lr": 0.1}}, name="t", iterations=3)
        public = repository.to_public(job).model_dump(mode="json")
    assert near_db_clock(Session, job.created_at) and job.created_at == job.updated_at
    # The API's JSON times keep their form: ISO 8601 in UTC.
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z", public["created_at"]), public
    with Session.begin() as s:
        cancelled = repository.request_cancel(s, job_id=job.id)
    assert cancelled.status == "cancelled" and near_db_clock(Session, cancelled.finished_at)
    with Session() as s:  # (one session at a time: on SQLite each holds the write lock)
        stored = s.get(Job, job.id)
    assert near_db_clock(Session, stored.updated_at) and near_db_clock(Session, stored.created_at)


def test_uploaded_files_get_the_database_clock(Session, shift_python_clock):
    shift_python_clock(timedelta(days=-3))
    with Session.begin() as s:
        dataset = repository.create_dataset(
            s, filename="a.npz", format="npz", sha256=uuid.uuid4().hex, size=3, facts={"items": []}
        )
        model = repository.create_model(s, filename="m.pt2", sha256=uuid.uuid4().hex, size=4, program={})
    assert near_db_clock(Session, dataset.created_at) and near_db_clock(Session, model.created_at)


def test_the_status_vocabulary_is_the_specs():
    assert typing.get_args(schemas.Status) == STATUSES
    assert schemas.STATUSES == STATUSES and schemas.TERMINAL_STATUSES == TERMINAL_STATUSES
    assert repository.ACTIVE_STATUSES == ACTIVE_STATUSES == ("queued", "running")
    assert set(TERMINAL_STATUSES) | set(ACTIVE_STATUSES) == {s.value for s in JobStatus}


def test_statuses_are_stored_as_plain_strings_and_the_database_refuses_others(Session):
    with Session.begin() as s:
        job = repository.create_job(s, spec={}, name="t", iterations=1)
    with Session() as s:
        stored = s.get(Job, job.id)
        assert type(stored.status) is str and stored.status == JobStatus.QUEUED
    for bad in ("paused", "QUEUED", ""):
        with pytest.raises(IntegrityError, match="ck_jobs_status|CHECK constraint"):
            with Session.begin() as s:
                s.add(Job(id=str(uuid.uuid4()), name="bad", status=bad, spec={}, iterations=1))
        with pytest.raises(IntegrityError):
            with Session.begin() as s:
                s.get(Job, job.id).status = bad
    with Session() as s:
        assert s.get(Job, job.id).status == "queued"
