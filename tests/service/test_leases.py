"""One lease per delivery, poison jobs, and at most one outstanding message per job.

On SQLite and PostgreSQL (db_url). The API stores jobs and sends their first message to the
filesystem broker (counted in its queue folder); the worker's side (claims, chunks, the sweep)
runs in-process with its messages counted at runner.enqueue. The sweep simulation moves the
database's clock forward by handing ``now`` to the sweep.
"""

from __future__ import annotations

import threading
from collections import Counter
from datetime import timedelta

import pytest

from service import lifecycle
from service.db import session as db_session
from service.db.clock import database_now
from service.db.models import Job
from service.settings import get_settings
from tests.e2e.conftest import small_job
from tests.helpers.support import queued_messages
from tests.service.conftest import job_body
from worker import engine, runner


@pytest.fixture
def env(runner_env):
    """The API and the runner on one database (tests/conftest.py: runner_env)."""
    return runner_env


def _row(job_id: str) -> Job:
    with db_session.session_scope() as db:
        job = db.get(Job, job_id)
        db.expunge(job)
        return job


def _update(job_id: str, **values) -> None:
    with db_session.session_scope() as db:
        job = db.get(Job, job_id)
        for k, v in values.items():
            setattr(job, k, v)


def _claim(job_id: str, iteration: int | None = 0, stale: float = 30.0, attempts: int = 3):
    with db_session.session_scope() as db:
        return lifecycle.claim_job(db, job_id=job_id, iteration=iteration, stale_after_s=stale, max_attempts=attempts)


def _die(job_id: str) -> None:
    """The lease's worker stopped beating a minute ago (by the database's clock)."""
    with db_session.session_scope() as db:
        job = db.get(Job, job_id)
        job.heartbeat_at = database_now(db) - timedelta(seconds=60)


def _submit(client, body=None) -> str:
    r = client.post("/v1/jobs", json=body or job_body())
    assert r.status_code == 202, r.text
    return r.json()["id"]


# --------------------------------------------------------------------------- one lease per delivery


def test_a_redelivered_message_cannot_take_a_live_lease(env, monkeypatch):
    """Redis redelivers a message after its visibility timeout with the same task id: while the
    first delivery still runs the chunk, the second finds the lease held and does nothing."""
    _, client = env.start(chunk_iterations=2)
    jid = _submit(client, small_job(iterations=2, tasks=1, steps=10))
    inside, release = threading.Event(), threading.Event()
    real = engine.run_meta

    def held(*args, **kwargs):
        inside.set()
        assert release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "run_meta", held)
    first: list[str] = []
    worker = threading.Thread(target=lambda: first.append(runner.run_chunk(jid, 0, owner="celery-task-1")))
    worker.start()
    assert inside.wait(30)
    token = _row(jid).lease_owner
    assert token and token != "celery-task-1"  # the lease is not the task id
    assert runner.run_chunk(jid, 0, owner="celery-task-1") == "skipped"  # the redelivery
    assert runner.run_chunk(jid, 0, owner="celery-task-2") == "skipped"  # a duplicate from the sweep
    assert _row(jid).lease_owner == token and _row(jid).attempts == 1
    release.set()
    worker.join(30)
    assert first == ["committed"] and env.sent == [(jid, 2)]
    job = _row(jid)
    assert job.iteration == 2 and (job.chunks_started, job.chunks_committed) == (1, 1)


def test_a_message_redelivered_after_its_worker_died_takes_over_with_a_new_token(env):
    _, client = env.start()
    jid = _submit(client)
    dead = _claim(jid)
    assert _claim(jid) is None  # alive: refused
    _die(jid)
    heir = _claim(jid)
    assert heir is not None and heir.token != dead.token and heir.attempts == 2
    with db_session.session_scope() as db:
        assert lifecycle.heartbeat(db, job_id=jid, token=dead.token) is False
        rec = {"iteration": 1, "meta_loss": 0.5, "lr": 0.1, "momentum": 0.5}
        assert (
            lifecycle.commit_chunk(db, job_id=jid, token=dead.token, start_iteration=0, records=[rec], checkpoint={})
            is None
        )
        assert lifecycle.heartbeat(db, job_id=jid, token=heir.token) is True


# --------------------------------------------------------------------------- poison jobs


def test_a_job_claimed_three_times_at_one_iteration_without_a_commit_fails(env):
    app, client = env.start()
    jid = _submit(client)
    for attempt in (1, 2, 3):
        claim = _claim(jid)
        assert claim is not None and claim.attempts == attempt
        _die(jid)
    assert _claim(jid) is None  # the fourth delivery fails the job instead
    body = client.get(f"/v1/jobs/{jid}").json()
    assert body["status"] == "failed" and body["finished_at"]
    assert body["error"].startswith("worker lost 3 times at iteration 0")
    assert _claim(jid, iteration=None, stale=0.0) is None  # and it stays failed


def test_a_commit_resets_the_attempts(env):
    _, client = env.start()
    jid = _submit(client)
    _claim(jid)
    _die(jid)
    claim = _claim(jid)
    assert claim.attempts == 2
    rec = {"iteration": 1, "meta_loss": 0.5, "lr": 0.1, "momentum": 0.5}
    with db_session.session_scope() as db:
        assert (
            lifecycle.commit_chunk(db, job_id=jid, token=claim.token, start_iteration=0, records=[rec], checkpoint={})
            == "running"
        )
    assert _row(jid).attempts == 0
    for attempt in (1, 2, 3):  # three more at iteration 1 are allowed
        assert _claim(jid, iteration=1).attempts == attempt
        _die(jid)
    assert _claim(jid, iteration=1) is None
    assert _row(jid).error.startswith("worker lost 3 times at iteration 1")


@pytest.mark.parametrize("max_attempts", [1, 3])
def test_the_sweep_fails_a_job_whose_worker_was_lost_max_attempts_times(env, max_attempts):
    _, client = env.start(max_attempts=max_attempts)
    jid = _submit(client)
    rounds = 0
    while True:
        claim = _claim(jid, iteration=None, attempts=max_attempts)
        if claim is None:
            break
        rounds += 1
        _die(jid)
        found = runner.sweep_once()
        if _row(jid).status == "failed":
            assert found == []
            break
        assert found == [(jid, 0)]
    job = _row(jid)
    assert rounds == max_attempts and job.status == "failed" and job.lease_owner is None
    assert job.error.startswith(f"worker lost {max_attempts} times at iteration 0")
    assert [m for m in env.sent if m[0] == jid] == [(jid, 0)] * (max_attempts - 1)


def test_the_sweep_cancels_a_job_whose_worker_died_after_a_cancel_request(env):
    _, client = env.start()
    jid = _submit(client)
    _claim(jid)
    assert client.post(f"/v1/jobs/{jid}/cancel").json()["cancel_requested"] is True
    _die(jid)
    assert runner.sweep_once() == []
    assert client.get(f"/v1/jobs/{jid}").json()["status"] == "cancelled" and env.sent == []


# --------------------------------------------------------------------------- one outstanding message


def _messages(app, sent) -> Counter:
    """Chunk messages per job: those the API put in the broker, and those the worker sent."""
    counts = Counter(m["args"][0] for m in queued_messages(app.state.settings))
    counts.update(job_id for job_id, _ in sent)
    return counts


def _sweeps(start, seconds: float, every: float = 10.0) -> int:
    """Sweeps every ``every`` simulated seconds from ``start`` over ``seconds``; returns how many."""
    n = int(seconds // every) + 1
    for k in range(n):
        runner.sweep_once(now=start + timedelta(seconds=k * every))
    return n


def test_the_sweep_keeps_at_most_one_outstanding_message_per_job(env, capsys):
    """200 jobs waiting for a free worker, 10 simulated minutes of sweeps every 10 s: each has the
    one message the API sent. Jobs whose message could not be sent, and jobs whose worker died, get
    exactly one from the sweep; jobs between chunks none. Past the visibility timeout an
    outstanding message is presumed lost: one more each, then none again for 10 minutes."""
    app, client = env.start(stale_after_seconds=30, chunk_seconds=300, tenant_max_active_jobs=1000)
    visibility = get_settings().visibility_timeout_seconds()
    waiting = [_submit(client) for _ in range(200)]

    def broker_down(*args, **kwargs):
        raise ConnectionError("broker is down")

    real_enqueue = app.state.producer.enqueue_chunk
    app.state.producer.enqueue_chunk = broker_down
    unsent = [_submit(client) for _ in range(10)]
    app.state.producer.enqueue_chunk = real_enqueue
    dead = [_submit(client) for _ in range(10)]
    between = [_submit(client) for _ in range(10)]
    for jid in dead:
        assert _claim(jid) is not None  # claimed, then the worker never beats again
    for jid in between:
        claim = _claim(jid)
        rec = {"iteration": 1, "meta_loss": 0.5, "lr": 0.1, "momentum": 0.5}
        with db_session.session_scope() as db:
            lifecycle.commit_chunk(db, job_id=jid, token=claim.token, start_iteration=0, records=[rec], checkpoint={})
    with db_session.session_scope() as db:
        t0 = database_now(db)
    api = _messages(app, [])
    assert all(api[j] == 1 for j in waiting + dead + between) and all(api[j] == 0 for j in unsent)

    n = _sweeps(t0, 600)
    counts = _messages(app, env.sent)
    per_job = {name: [counts[j] for j in jobs] for name, jobs in [("waiting", waiting), ("unsent", unsent)]}
    per_job["dead"] = [counts[j] - 1 for j in dead]  # the API's message was consumed by the dead claim
    per_job["between"] = [counts[j] - 1 for j in between]  # the next chunk's message is the worker's, not sent here
    with capsys.disabled():
        print(
            f"\n{n} sweeps over 600 simulated s: messages per job "
            + ", ".join(f"{k} {min(v)}..{max(v)} (total {sum(v)})" for k, v in per_job.items())
        )
    assert per_job["waiting"] == [1] * 200
    assert per_job["unsent"] == [1] * 10
    assert per_job["dead"] == [1] * 10
    assert per_job["between"] == [0] * 10

    # Past the visibility timeout every outstanding message is presumed lost: one more each.
    before = _messages(app, env.sent)
    _sweeps(t0 + timedelta(seconds=visibility + 10), 600)
    again = _messages(app, env.sent) - before
    with capsys.disabled():
        print(f"next 600 s after the visibility timeout ({visibility:g} s): {sum(again.values())} messages")
    assert all(again[j] == 1 for j in waiting + unsent + dead + between), again


def test_without_the_marker_the_sweep_would_resend_every_stale_sweep(env):
    """The same waiting jobs, with a visibility timeout of 0 (every outstanding message presumed
    lost at once, which is what the sweep did before): a message each time the job is stale, so
    the test above can fail."""
    app, client = env.start(stale_after_seconds=30)
    jobs = [_submit(client) for _ in range(5)]
    with db_session.session_scope() as db:
        t0 = database_now(db)
    for k in range(61):
        with db_session.session_scope() as db:
            for job_id, it in lifecycle.sweep(
                db, stale_after_s=30, visibility_timeout_s=0.0, now=t0 + timedelta(seconds=10 * k)
            ):
                env.sent.append((job_id, it))
    counts = _messages(app, env.sent)
    # 1 from the API, then one per 40 s (stale after 30 s, swept every 10 s): at 30, 70, ..., 590 s
    assert [counts[j] for j in jobs] == [1 + 15] * 5
