"""A study's update message is re-sent by the workers' sweep until the update is recorded.

On SQLite and PostgreSQL (db_url), the runner in-process (no Celery): the update messages a worker
sends (worker.study_runner.send_update) are captured, or raise as with the broker down. The sweep
simulation moves the database's clock forward by handing ``now`` to runner.sweep_once, as
tests/service/test_leases.py does for the jobs' messages.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

import pytest
from sqlalchemy.orm import Session

from service import studies
from service.db import session as db_session
from service.db.clock import as_utc
from service.db.models import Job, StudyJob
from service.settings import get_settings
from tests.worker.test_runner import _drain, env  # noqa: F401 - the fixture
from tests.worker.test_studies import _job
from worker import runner, study_runner


def _broker_down(study_id: str, job_id: str) -> None:
    raise ConnectionError("broker is down")


@pytest.fixture
def updates(monkeypatch) -> list[tuple[str, str]]:
    """The update messages sent (study_id, job_id); none is delivered unless the test runs it."""
    sent: list[tuple[str, str]] = []
    monkeypatch.setattr(study_runner, "send_update", lambda s, j: sent.append((s, j)))
    return sent


def _succeeded(env, monkeypatch, *, send) -> tuple[str, str, datetime]:  # noqa: F811
    """A study and one job of it run to success, its update message sent by ``send``: (study id,
    job id, when the job finished by the database's clock)."""
    client, sent = env
    sid = client.post("/v1/studies", json={"meta": {"rounds": 1, "iterations": 1}}).json()["id"]
    jid = client.post("/v1/jobs", json=_job(sid, 0, tasks=2)).json()["id"]
    with monkeypatch.context() as m:
        m.setattr(study_runner, "send_update", send)
        sent.append((jid, 0))
        assert _drain(sent)[-1] == "succeeded"
    with db_session.session_scope() as db:
        job = db.get(Job, jid)
        assert job is not None and job.finished_at is not None
        return sid, jid, as_utc(job.finished_at)


def _link(job_id: str) -> StudyJob:
    with db_session.session_scope() as db:
        row = db.get(StudyJob, job_id)
        assert row is not None
        db.expunge(row)
        return row


def _history(client, sid: str) -> list[dict]:
    return client.get(f"/v1/studies/{sid}/history").json()["items"]


def test_a_failed_send_is_resent_by_the_sweep_after_the_cutoff_and_not_before(env, monkeypatch, updates, caplog):  # noqa: F811
    sid, jid, finished = _succeeded(env, monkeypatch, send=_broker_down)
    assert updates == [] and (_link(jid).update_sent_at, _link(jid).update_attempts) == (None, 0)  # withdrawn
    stale = get_settings().stale_after_seconds
    runner.sweep_once(now=finished + timedelta(seconds=stale - 1))
    assert updates == []  # not before the cutoff
    with caplog.at_level(logging.WARNING, logger="gradtune.worker"):
        runner.sweep_once(now=finished + timedelta(seconds=stale + 1))
    assert updates == [(sid, jid)] and _link(jid).update_attempts == 1
    assert f"study {sid}: update after job {jid} re-sent" in caplog.text

    # That message is lost too, and the broker is down when the sweep sends again: the failed send
    # does not count, and the next sweep tries again.
    lost = finished + timedelta(seconds=stale + 1 + get_settings().visibility_timeout_seconds() + 10)
    monkeypatch.setattr(study_runner, "send_update", _broker_down)
    runner.sweep_once(now=lost)
    assert (_link(jid).update_sent_at, _link(jid).update_attempts) == (None, 1)
    monkeypatch.setattr(study_runner, "send_update", lambda s, j: updates.append((s, j)))
    runner.sweep_once(now=lost + timedelta(seconds=10))
    assert updates == [(sid, jid)] * 2 and _link(jid).update_attempts == 2


def test_a_fresh_mark_is_sent_once_and_a_lost_message_again_after_the_visibility_timeout(env, monkeypatch, updates):  # noqa: F811
    sid, jid, finished = _succeeded(env, monkeypatch, send=lambda s, j: updates.append((s, j)))
    assert updates == [(sid, jid)] and _link(jid).update_attempts == 1  # sent at the finish: never delivered
    visibility = get_settings().visibility_timeout_seconds()
    for seconds in (60, 600, visibility - 10):  # the message is outstanding: no sweep sends another
        runner.sweep_once(now=finished + timedelta(seconds=seconds))
    assert updates == [(sid, jid)]
    later = finished + timedelta(seconds=visibility + 10)  # presumed lost: one more, by one of two sweeps
    runner.sweep_once(now=later)
    runner.sweep_once(now=later)
    assert updates == [(sid, jid)] * 2 and _link(jid).update_attempts == 2
    if db_session.get_engine().dialect.name == "postgresql":  # two sweeps at once: the second skips the row
        lost = later + timedelta(seconds=visibility + 10)
        with Session(db_session.get_engine()) as a, Session(db_session.get_engine()) as b:
            assert studies.sweep_updates(a, stale_after_s=30, visibility_timeout_s=visibility, now=lost) == [(sid, jid)]
            assert (
                studies.sweep_updates(b, stale_after_s=30, visibility_timeout_s=visibility, now=lost) == []
            )  # locked by a: skipped
            a.commit()
            b.rollback()
            assert (
                studies.sweep_updates(b, stale_after_s=30, visibility_timeout_s=visibility, now=lost) == []
            )  # a's mark is fresh
            b.rollback()


def test_after_a_broker_reconnection_the_outstanding_update_is_resent_without_counting(env, monkeypatch, updates):  # noqa: F811
    """worker/celery_app.py BrokerReconnected: the broker may have lost the message sent at the
    finish; forgetting it lets the next sweep send it at once, not after the visibility timeout, and
    the lost one does not count towards max_attempts. A recorded update is left alone."""
    sid, jid, finished = _succeeded(env, monkeypatch, send=lambda s, j: updates.append((s, j)))
    assert updates == [(sid, jid)] and _link(jid).update_attempts == 1
    soon = finished + timedelta(seconds=get_settings().stale_after_seconds + 1)
    runner.sweep_once(now=soon)
    assert updates == [(sid, jid)]  # outstanding: nothing re-sent before the visibility timeout
    with db_session.session_scope() as db:
        assert studies.forget_update_messages(db) == 1
    assert (_link(jid).update_sent_at, _link(jid).update_attempts) == (None, 0)
    runner.sweep_once(now=soon)
    assert updates == [(sid, jid)] * 2 and _link(jid).update_attempts == 1
    assert study_runner.update_study(sid, jid, runner.build_tasks) == "recorded"
    with db_session.session_scope() as db:
        assert studies.forget_update_messages(db) == 0  # recorded: nothing outstanding to forget
    assert _link(jid).version == 1


def test_a_recorded_update_is_never_resent(env, monkeypatch, updates):  # noqa: F811
    sid, jid, finished = _succeeded(env, monkeypatch, send=lambda s, j: updates.append((s, j)))
    assert study_runner.update_study(sid, jid, runner.build_tasks) == "recorded"
    visibility = get_settings().visibility_timeout_seconds()
    for k in range(1, 6):
        runner.sweep_once(now=finished + timedelta(seconds=k * (visibility + 10)))
    assert updates == [(sid, jid)]  # the finish's only
    with db_session.session_scope() as db:  # nor is a recorded update marked again
        assert studies.mark_update_sent(db, job_id=jid) is False
    assert [h["job_id"] for h in _history(env[0], sid)] == [jid]


@pytest.mark.parametrize("max_attempts", [1, 3])
def test_the_sweep_stops_at_max_attempts_and_says_why(env, monkeypatch, updates, caplog, max_attempts):  # noqa: F811
    monkeypatch.setenv("GRADTUNE_MAX_ATTEMPTS", str(max_attempts))
    get_settings.cache_clear()
    sid, jid, finished = _succeeded(env, monkeypatch, send=lambda s, j: updates.append((s, j)))
    step = timedelta(seconds=get_settings().visibility_timeout_seconds() + 10)
    with caplog.at_level(logging.WARNING, logger="gradtune.studies"):
        for k in range(1, max_attempts + 4):  # every message is lost
            runner.sweep_once(now=finished + k * step)
    assert updates == [(sid, jid)] * max_attempts
    link = _link(jid)
    assert (link.version, link.update_attempts, link.update_sent_at) == (None, max_attempts, None)
    assert link.update is not None and "no more are sent" in link.update["not_updated"]
    assert f"update after job {jid} given up after {max_attempts} messages" in caplog.text
    assert _history(env[0], sid) == []  # the note is no update: the history stays empty
    # A message that was only late still records the update, which replaces the note.
    assert study_runner.update_study(sid, jid, runner.build_tasks) == "recorded"
    assert "not_updated" not in _link(jid).update and [h["job_id"] for h in _history(env[0], sid)] == [jid]


def test_a_resent_update_is_run_and_recorded_in_the_history(env, monkeypatch, updates):  # noqa: F811
    """End to end but for Celery: the broker is down when the job succeeds; after the cutoff the
    sweep sends the update again, a worker runs that message, and the history has the entry."""
    sid, jid, finished = _succeeded(env, monkeypatch, send=_broker_down)
    assert _history(env[0], sid) == [] and env[0].get(f"/v1/studies/{sid}").json()["version"] == 0
    runner.sweep_once(now=finished + timedelta(seconds=get_settings().stale_after_seconds + 1))
    assert updates == [(sid, jid)]
    outcomes = [study_runner.update_study(s, j, runner.build_tasks) for s, j in updates]  # the worker's delivery
    assert outcomes == ["recorded"]
    history = _history(env[0], sid)
    assert [(h["version"], h["job_id"]) for h in history] == [(1, jid)]
    assert history[0]["pool"]["training"] == 2
    assert env[0].get(f"/v1/studies/{sid}").json()["version"] == 1
    runner.sweep_once(now=finished + timedelta(days=1))
    assert updates == [(sid, jid)]  # recorded: never sent again
    assert study_runner.update_study(sid, jid, runner.build_tasks) == "skipped"  # a duplicate records nothing
