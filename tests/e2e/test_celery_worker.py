"""End to end on real components: API -> PostgreSQL + Redis -> a real Celery worker process."""

from __future__ import annotations

import os
import signal
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.models import Job, JobIteration
from service.db.session import make_engine
from service.main import create_app
from service.settings import Settings
from tests.e2e.conftest import logs, small_job, wait_for, worker_env
from tests.helpers.support import keyed_client


def _client(env) -> Any:
    settings = Settings(
        data_dir=env["GRADTUNE_DATA_DIR"],
        database_url=env["GRADTUNE_DATABASE_URL"],
        broker_url=env["GRADTUNE_BROKER_URL"],
        queue_name=env["GRADTUNE_QUEUE_NAME"],
        allowed_hosts=["testserver"],
    )
    return keyed_client(create_app(settings))


def _status(client, jid):
    r = client.get(f"/v1/jobs/{jid}")
    assert r.status_code == 200, r.text
    return r.json()


def test_job_runs_to_settings_on_postgres_and_redis(tmp_path, pg_url, redis_url, spawn_worker):
    env = worker_env(tmp_path, pg_url, redis_url)
    w = spawn_worker(env)
    with _client(env) as client:
        r = client.post("/v1/jobs", json=small_job(iterations=5))
        assert r.status_code == 202, r.text
        jid = r.json()["id"]
        assert r.headers["location"] == f"/v1/jobs/{jid}"
        r = client.get(f"/v1/jobs/{jid}/settings")
        assert r.status_code == 409
        assert any(word in r.json()["detail"] for word in ("queued", "running")), r.text
        try:
            job = wait_for(
                lambda: (j := _status(client, jid))["status"] in ("succeeded", "failed") and j, 120, "the job to finish"
            )
        except AssertionError as exc:
            raise AssertionError(logs([w])) from exc
        assert job["status"] == "succeeded", (job, logs([w]))
        assert job["progress"]["iteration"] == 5 and job["progress"]["iterations"] == 5
        assert job["started_at"] and job["finished_at"]
        s = client.get(f"/v1/jobs/{jid}/settings")
        assert s.status_code == 200
        body = s.json()
        assert body["optimizer"] == "SGD"
        assert 1e-5 <= body["lr"] <= 10 and 0 <= body["momentum"] < 1
        ev = body["evaluation"]
        assert [t["name"] for t in ev["tasks"]] == ["t0", "t1"]
        assert ev["initial"] == {"lr": 0.01, "momentum": 0.9}
        assert ev["mean_learned_val_loss"] <= ev["mean_initial_val_loss"]
        hist = client.get(f"/v1/jobs/{jid}/history").json()["items"]
        assert [h["iteration"] for h in hist] == [1, 2, 3, 4, 5]
    engine = make_engine(pg_url)
    with Session(engine) as s:
        row = s.get(Job, jid)
        assert row.device == "cpu" and row.lease_owner is None
        # 5 iterations in chunks of 2: 3 chunks, none redone.
        assert (row.chunks_started, row.chunks_committed) == (3, 3)
    engine.dispose()


def test_kill_dash_nine_mid_chunk_then_another_worker_finishes(tmp_path, pg_url, redis_url, spawn_worker):
    iterations = 10
    env = worker_env(tmp_path, pg_url, redis_url, GRADTUNE_CHUNK_ITERATIONS="3")
    # Digits, 500 steps: a chunk of 3 meta-iterations computes for about a second, a wide
    # enough window to kill the worker inside it.
    job = small_job(iterations=iterations, steps=500)
    for task in job["tasks"]:
        task["data"] = {"source": "builtin", "name": "digits", "seed": 0}
        task["batch_size"] = 32
    engine = make_engine(pg_url)

    def row(jid):
        with Session(engine) as s:
            return s.get(Job, jid)

    first = spawn_worker(env, "first")
    with _client(env) as client:
        jid = client.post("/v1/jobs", json=job).json()["id"]
        # Kill once a chunk has been committed and the next one is half way.
        try:
            wait_for(
                lambda: (
                    (r := row(jid)).chunks_committed >= 1
                    and r.chunks_started == r.chunks_committed + 1
                    and r.status == "running"
                ),
                120,
                "the second chunk to start",
                interval=0.05,
            )
        except AssertionError as exc:
            raise AssertionError(logs([first])) from exc
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
        before = row(jid)
        assert before.iteration < iterations and before.lease_owner is not None
        second = spawn_worker(env, "second")
        done = wait_for(
            lambda: (j := _status(client, jid))["status"] in ("succeeded", "failed") and j,
            180,
            "the job to finish after the kill",
        )
        assert done["status"] == "succeeded", logs([first, second])
        assert client.get(f"/v1/jobs/{jid}/settings").status_code == 200
    with Session(engine) as s:
        its = (
            s.execute(select(JobIteration.iteration).where(JobIteration.job_id == jid).order_by(JobIteration.iteration))
            .scalars()
            .all()
        )
        final = s.get(Job, jid)
    engine.dispose()
    assert its == list(range(1, iterations + 1))  # no gap, no duplicate
    # Exactly the killed chunk was redone: started one more time than committed.
    assert final.chunks_started - final.chunks_committed == 1
    assert "re-enqueued" in logs([second])


def test_two_workers_drain_one_queue_without_duplicating_work(tmp_path, pg_url, redis_url, spawn_worker):
    """Several jobs, two worker processes on one Redis queue: every job completes once, with a
    gapless history and no chunk run twice."""
    env = worker_env(tmp_path, pg_url, redis_url)
    workers = [spawn_worker(env, "a"), spawn_worker(env, "b")]
    with _client(env) as client:
        ids = [client.post("/v1/jobs", json=small_job(iterations=6, steps=40)).json()["id"] for _ in range(4)]
        try:
            wait_for(lambda: all(_status(client, j)["status"] == "succeeded" for j in ids), 180, "all jobs to succeed")
        except AssertionError as exc:
            raise AssertionError([_status(client, j)["status"] for j in ids], logs(workers)) from exc
    engine = make_engine(pg_url)
    with Session(engine) as s:
        for jid in ids:
            its = (
                s.execute(
                    select(JobIteration.iteration).where(JobIteration.job_id == jid).order_by(JobIteration.iteration)
                )
                .scalars()
                .all()
            )
            job = s.get(Job, jid)
            assert its == list(range(1, 7)), (jid, its)
            assert (job.chunks_started, job.chunks_committed) == (3, 3), jid
    engine.dispose()
    # Both processes did some of the work.
    text = [open(w.log_path).read() for w in workers]
    assert all("succeeded" in t or "Task gradtune.run_chunk" in t for t in text), logs(workers)
