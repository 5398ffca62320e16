"""The claim protocol that makes redelivered, duplicated and orphaned chunks harmless.

Runs against SQLite and PostgreSQL (the db_url fixture), on migrated databases. Liveness goes by
the database's clock, whatever the hosts' clocks say (the tests at the end).
"""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from service import lifecycle
from service.db.models import Job, JobIteration, utcnow
from service.db.session import make_engine
from tests.service.test_repository_clock import db_clock, near_db_clock, python_clock_shifter


@pytest.fixture
def Session(db_url):
    engine = make_engine(db_url)
    yield sessionmaker(bind=engine, expire_on_commit=False)
    engine.dispose()


def _job(Session, iterations=4, **kw) -> str:
    jid = str(uuid.uuid4())
    with Session.begin() as s:
        s.add(Job(id=jid, name="t", status="queued", spec={"x": 1}, iterations=iterations, **kw))
    return jid


def _rec(i):
    return {
        "iteration": i,
        "meta_loss": 1.0 / i,
        "lr": 0.1 * i,
        "momentum": 0.5,
        "accepted": True,
        "step_size": 0.5,
        "hypergradient": [0.1, -0.2],
    }


def _claim(Session, jid, iteration=0, stale=30.0, attempts=3):
    with Session.begin() as s:
        return lifecycle.claim_job(s, job_id=jid, iteration=iteration, stale_after_s=stale, max_attempts=attempts)


def _token(Session, jid, iteration=0, stale=30.0) -> str:
    claim = _claim(Session, jid, iteration=iteration, stale=stale)
    assert claim is not None
    return claim.token


def _commit(Session, jid, token, start, n, **kw):
    with Session.begin() as s:
        return lifecycle.commit_chunk(
            s,
            job_id=jid,
            token=token,
            start_iteration=start,
            records=[_rec(i) for i in range(start + 1, start + 1 + n)],
            checkpoint={"it": start + n},
            **kw,
        )


def _get(Session, jid) -> Job:
    with Session() as s:
        return s.get(Job, jid)


def test_claim_runs_then_commit_writes_history_and_releases(Session):
    jid = _job(Session)
    c = _claim(Session, jid)
    assert c is not None and c.iteration == 0 and c.checkpoint is None and c.spec == {"x": 1}
    assert c.attempts == 1 and c.elapsed_seconds == 0.0 and c.stopped is None
    job = _get(Session, jid)
    assert job.status == "running" and job.lease_owner == c.token and job.started_at is not None
    assert job.attempts == 1 and job.enqueued_at is None  # the message is consumed
    assert _commit(Session, jid, c.token, 0, 2, elapsed_seconds=1.5) == "running"
    job = _get(Session, jid)
    assert (job.iteration, job.lease_owner, job.checkpoint) == (2, None, {"it": 2})
    assert job.lr == pytest.approx(0.2) and job.meta_loss == pytest.approx(0.5)
    assert (job.chunks_started, job.chunks_committed) == (1, 1)
    # A commit resets the attempts, adds the chunk's time and announces the next message.
    assert job.attempts == 0 and job.elapsed_seconds == pytest.approx(1.5) and job.enqueued_at is not None
    with Session() as s:
        its = s.execute(select(JobIteration).where(JobIteration.job_id == jid)).scalars().all()
    assert [r.iteration for r in its] == [1, 2]
    assert its[0].extra == {"hypergradient": [0.1, -0.2]}


def test_each_claim_gets_a_fresh_token(Session):
    jid = _job(Session)
    first = _token(Session, jid)
    assert _commit(Session, jid, first, 0, 1) == "running"
    second = _token(Session, jid, iteration=1)
    assert first != second and len(first) == len(second) == 32
    assert _commit(Session, jid, first, 1, 1) is None  # the old token holds nothing


def test_second_claim_refused_while_owner_alive_and_stale_message_dropped(Session):
    jid = _job(Session)
    a = _token(Session, jid)
    assert _claim(Session, jid) is None  # a's heartbeat is fresh: the same message again is refused
    assert _commit(Session, jid, a, 0, 2)
    assert _claim(Session, jid, iteration=0) is None  # duplicate of the first message
    c = _claim(Session, jid, iteration=2)
    assert c is not None and c.checkpoint == {"it": 2}


def test_dead_owner_is_taken_over_and_its_late_commit_is_refused(Session):
    jid = _job(Session)
    dead = _token(Session, jid)
    # "dead" stops beating; with a zero staleness window the next claim takes over.
    b = _token(Session, jid, stale=0.0)
    assert _commit(Session, jid, dead, 0, 2) is None  # its work is discarded
    with Session.begin() as s:
        assert lifecycle.heartbeat(s, job_id=jid, token=dead) is False
        assert lifecycle.heartbeat(s, job_id=jid, token=b) is True
    assert _commit(Session, jid, b, 0, 2) == "running"
    job = _get(Session, jid)
    assert job.iteration == 2 and (job.chunks_started, job.chunks_committed) == (2, 1)


def test_commit_rejects_a_gap(Session):
    jid = _job(Session)
    a = _token(Session, jid)
    with pytest.raises(ValueError, match="do not follow"):
        with Session.begin() as s:
            lifecycle.commit_chunk(s, job_id=jid, token=a, start_iteration=0, records=[_rec(2)], checkpoint={})
    assert _get(Session, jid).iteration == 0


def test_finished_jobs_never_change(Session):
    jid = _job(Session, iterations=2)
    _commit(Session, jid, _token(Session, jid), 0, 2)
    b = _token(Session, jid, iteration=2)
    with Session.begin() as s:
        assert lifecycle.finish_job(s, job_id=jid, token=b, result={"lr": 0.3, "momentum": 0.8}) == "succeeded"
    with Session.begin() as s:
        assert not lifecycle.fail_job(s, job_id=jid, token=b, error="late")
        assert not lifecycle.cancel_job(s, job_id=jid, token=b)
        assert lifecycle.finish_job(s, job_id=jid, token=b, result={"lr": 0.1, "momentum": 0.1}) is None
    assert _claim(Session, jid, iteration=None) is None
    job = _get(Session, jid)
    assert (job.status, job.error, job.lr) == ("succeeded", None, 0.3)
    assert job.finished_at is not None and job.result == {"lr": 0.3, "momentum": 0.8}


def test_sweep_finds_stale_running_and_old_queued_jobs_once(Session):
    old = utcnow() - timedelta(seconds=120)
    fresh_q = _job(Session)
    old_q = _job(Session, updated_at=old)
    run = _job(Session)
    _claim(Session, run)
    with Session.begin() as s:
        s.get(Job, run).heartbeat_at = old
    alive = _job(Session)
    _claim(Session, alive)
    with Session.begin() as s:
        found = dict(lifecycle.sweep(s, stale_after_s=30))
    assert found == {old_q: 0, run: 0}
    assert fresh_q not in found and alive not in found
    assert _get(Session, run).lease_owner is None
    assert _get(Session, run).enqueued_at is not None and _get(Session, old_q).enqueued_at is not None
    with Session.begin() as s:  # marked as seen: not found again right away
        assert lifecycle.sweep(s, stale_after_s=30) == []
    assert _claim(Session, run, iteration=0) is not None


# ---------------------------------------------------------------- liveness by the database's clock
# The host clock service code could read is moved far away (shift_python_clock); claims,
# heartbeats and the sweep must not notice, because they read and write the database's time.


@pytest.fixture
def shift_python_clock(monkeypatch):
    return python_clock_shifter(monkeypatch)


def _set_heartbeat(Session, jid, seconds_ago: float) -> None:
    """The job's heartbeat ``seconds_ago`` by the database's clock (read with plain SQL)."""
    beat = db_clock(Session) - timedelta(seconds=seconds_ago)
    with Session.begin() as s:
        s.get(Job, jid).heartbeat_at = beat


def test_claim_heartbeat_commit_and_finish_write_the_database_clock(Session, shift_python_clock):
    jid = _job(Session, iterations=2)
    shift_python_clock(timedelta(days=3))
    a = _token(Session, jid)
    job = _get(Session, jid)
    assert near_db_clock(Session, job.heartbeat_at) and near_db_clock(Session, job.started_at)
    _set_heartbeat(Session, jid, 600)
    with Session.begin() as s:
        assert lifecycle.heartbeat(s, job_id=jid, token=a) is True
    assert near_db_clock(Session, _get(Session, jid).heartbeat_at)
    assert _commit(Session, jid, a, 0, 2) == "running"
    assert near_db_clock(Session, _get(Session, jid).enqueued_at)
    with Session() as s:
        created = [r.created_at for r in s.execute(select(JobIteration).where(JobIteration.job_id == jid)).scalars()]
    assert len(created) == 2 and all(near_db_clock(Session, c) for c in created)
    b = _token(Session, jid, iteration=2)
    with Session.begin() as s:
        assert lifecycle.finish_job(s, job_id=jid, token=b, result={"lr": 0.3, "momentum": 0.8})
    job = _get(Session, jid)
    assert near_db_clock(Session, job.finished_at) and near_db_clock(Session, job.updated_at)


@pytest.mark.parametrize("offset", [timedelta(hours=1), timedelta(hours=-1)])
def test_staleness_is_judged_by_the_database_clock(Session, shift_python_clock, offset):
    """With the host clock an hour ahead a fresh job would look dead, an hour behind a dead one
    alive; by the database's clock, the one 120 s silent is stale and the one just beating is not."""
    dead, alive, waiting = _job(Session), _job(Session), _job(Session)
    shift_python_clock(offset)
    assert _claim(Session, dead) is not None and _claim(Session, alive) is not None
    _set_heartbeat(Session, dead, 120)
    with Session.begin() as s:
        found = dict(lifecycle.sweep(s, stale_after_s=30))
    assert found == {dead: 0}, "the sweep went by the host's clock"
    assert near_db_clock(Session, _get(Session, dead).heartbeat_at)  # marked as seen, by the database

    _set_heartbeat(Session, dead, 120)
    assert _claim(Session, alive, stale=30.0) is None  # alive by the database's clock
    assert _claim(Session, dead, stale=30.0) is not None  # dead by it: taken over
    # A queued job 120 s untouched by the database's clock is found, one just touched is not.
    with Session.begin() as s:
        s.get(Job, waiting).updated_at = db_clock(Session) - timedelta(seconds=120)
    with Session.begin() as s:
        assert dict(lifecycle.sweep(s, stale_after_s=30)) == {waiting: 0}
    with Session.begin() as s:
        assert lifecycle.sweep(s, stale_after_s=30) == []
