"""The claim protocol that makes redelivered, duplicated and orphaned chunks harmless.

Runs against SQLite and PostgreSQL (the db_url fixture), on migrated databases.
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
    return {"iteration": i, "meta_loss": 1.0 / i, "lr": 0.1 * i, "momentum": 0.5,
            "accepted": True, "step_size": 0.5, "hypergradient": [0.1, -0.2]}


def _claim(Session, jid, owner, iteration=0, stale=30.0):
    with Session.begin() as s:
        return lifecycle.claim_job(s, job_id=jid, owner=owner, iteration=iteration, stale_after_s=stale)


def _commit(Session, jid, owner, start, n):
    with Session.begin() as s:
        return lifecycle.commit_chunk(
            s, job_id=jid, owner=owner, start_iteration=start,
            records=[_rec(i) for i in range(start + 1, start + 1 + n)], checkpoint={"it": start + n},
        )


def _get(Session, jid) -> Job:
    with Session() as s:
        return s.get(Job, jid)


def test_claim_runs_then_commit_writes_history_and_releases(Session):
    jid = _job(Session)
    c = _claim(Session, jid, "a")
    assert c is not None and c.iteration == 0 and c.checkpoint is None and c.spec == {"x": 1}
    job = _get(Session, jid)
    assert job.status == "running" and job.lease_owner == "a" and job.started_at is not None
    assert _commit(Session, jid, "a", 0, 2) is True
    job = _get(Session, jid)
    assert (job.iteration, job.lease_owner, job.checkpoint) == (2, None, {"it": 2})
    assert job.lr == pytest.approx(0.2) and job.meta_loss == pytest.approx(0.5)
    assert (job.chunks_started, job.chunks_committed) == (1, 1)
    with Session() as s:
        its = s.execute(select(JobIteration).where(JobIteration.job_id == jid)).scalars().all()
    assert [r.iteration for r in its] == [1, 2]
    assert its[0].extra == {"hypergradient": [0.1, -0.2]}


def test_second_claim_refused_while_owner_alive_and_stale_message_dropped(Session):
    jid = _job(Session)
    assert _claim(Session, jid, "a") is not None
    assert _claim(Session, jid, "b") is None  # a's heartbeat is fresh
    assert _commit(Session, jid, "a", 0, 2)
    assert _claim(Session, jid, "dup", iteration=0) is None  # duplicate of the first message
    c = _claim(Session, jid, "b", iteration=2)
    assert c is not None and c.checkpoint == {"it": 2}


def test_dead_owner_is_taken_over_and_its_late_commit_is_refused(Session):
    jid = _job(Session)
    assert _claim(Session, jid, "dead") is not None
    # "dead" stops beating; with a zero staleness window the next claim takes over.
    assert _claim(Session, jid, "b", stale=0.0) is not None
    assert _commit(Session, jid, "dead", 0, 2) is False  # its work is discarded
    with Session.begin() as s:
        assert lifecycle.heartbeat(s, job_id=jid, owner="dead") is False
        assert lifecycle.heartbeat(s, job_id=jid, owner="b") is True
    assert _commit(Session, jid, "b", 0, 2) is True
    job = _get(Session, jid)
    assert job.iteration == 2 and (job.chunks_started, job.chunks_committed) == (2, 1)


def test_commit_rejects_a_gap(Session):
    jid = _job(Session)
    _claim(Session, jid, "a")
    with pytest.raises(ValueError, match="do not follow"):
        with Session.begin() as s:
            lifecycle.commit_chunk(s, job_id=jid, owner="a", start_iteration=0,
                                   records=[_rec(2)], checkpoint={})
    assert _get(Session, jid).iteration == 0


def test_finished_jobs_never_change(Session):
    jid = _job(Session, iterations=2)
    _claim(Session, jid, "a")
    _commit(Session, jid, "a", 0, 2)
    _claim(Session, jid, "b", iteration=2)
    with Session.begin() as s:
        assert lifecycle.finish_job(s, job_id=jid, owner="b", result={"lr": 0.3, "momentum": 0.8})
    with Session.begin() as s:
        assert not lifecycle.fail_job(s, job_id=jid, owner="b", error="late")
        assert not lifecycle.cancel_job(s, job_id=jid, owner="b")
    assert _claim(Session, jid, "c", iteration=None) is None
    job = _get(Session, jid)
    assert (job.status, job.error, job.lr) == ("succeeded", None, 0.3)
    assert job.finished_at is not None


def test_sweep_finds_stale_running_and_old_queued_jobs_once(Session):
    old = utcnow() - timedelta(seconds=120)
    fresh_q = _job(Session)
    old_q = _job(Session, updated_at=old)
    run = _job(Session)
    _claim(Session, run, "dead")
    with Session.begin() as s:
        s.get(Job, run).heartbeat_at = old
    alive = _job(Session)
    _claim(Session, alive, "alive")
    with Session.begin() as s:
        found = dict(lifecycle.sweep(s, stale_after_s=30))
    assert found == {old_q: 0, run: 0}
    assert fresh_q not in found and alive not in found
    assert _get(Session, run).lease_owner is None
    with Session.begin() as s:  # marked as seen: not found again right away
        assert lifecycle.sweep(s, stale_after_s=30) == []
    assert _claim(Session, run, "new", iteration=0) is not None
