"""Chaos on real PostgreSQL and Redis: workers killed, the broker and the database restarted.

Each test is bounded in time and prints its counts (``pytest -s`` shows them; ``-rA`` too). The
servers restarted here are the tests' own (tests/helpers/servers.py), never the machine's shared
ones. Settings are small so that a dead worker's lease goes stale in seconds (``CHAOS_ENV``).
"""

from __future__ import annotations

import os
import re
import signal
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service import lifecycle, repository
from service.db.models import Job, JobIteration, Worker
from service.db.session import make_engine
from service.main import create_app
from service.settings import Settings
from tests.e2e.conftest import logs, small_job, wait_for, worker_env
from tests.helpers.support import keyed_client

# A dead worker's lease is stale after 2 s (heartbeats every 0.2 s), and each live worker sweeps
# twice a second: a kill costs about three seconds of waiting.
CHAOS_ENV = {
    "GRADTUNE_HEARTBEAT_SECONDS": "0.2",
    "GRADTUNE_STALE_AFTER_SECONDS": "2",
    "GRADTUNE_SWEEP_SECONDS": "0.5",
}


def _client(env) -> Any:
    settings = Settings(
        data_dir=env["GRADTUNE_DATA_DIR"],
        database_url=env["GRADTUNE_DATABASE_URL"],
        broker_url=env["GRADTUNE_BROKER_URL"],
        queue_name=env["GRADTUNE_QUEUE_NAME"],
        allowed_hosts=["testserver"],
    )
    return keyed_client(create_app(settings))


def _digits_job(iterations: int, steps: int) -> dict:
    """A job whose meta-iterations compute for a while (digits, ``steps`` inner steps per task)."""
    job = small_job(iterations=iterations, steps=steps)
    # the line search: its iterations keep computing here, where the stencil (the pair's default) may
    # converge early and record its remaining iterations at no cost, leaving no chunk to kill
    job["meta"]["search"] = "line"
    for task in job["tasks"]:
        task["data"] = {"source": "builtin", "name": "digits", "seed": 0}
        task["batch_size"] = 32
    return job


class _Watch:
    """Reads the job's row (and the history) straight from the database."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)

    def row(self, jid: str) -> Job:
        with Session(self.engine) as s:
            job = s.get(Job, jid)
            assert job is not None
            return job

    def history(self, jid: str) -> list[int]:
        with Session(self.engine) as s:
            q = select(JobIteration.iteration).where(JobIteration.job_id == jid).order_by(JobIteration.iteration)
            return list(s.execute(q).scalars())

    def holder_pid(self, jid: str, pids: set[int]) -> int | None:
        """The pid of the live worker process that says it runs a chunk of ``jid``."""
        with Session(self.engine) as s:
            rows = s.execute(select(Worker.pid).where(Worker.current_job == jid)).scalars()
            found = [pid for pid in rows if pid in pids]
        return found[0] if len(found) == 1 else None

    def wait_done(self, jid: str, timeout: float, procs) -> Job:
        try:
            wait_for(lambda: self.row(jid).status in ("succeeded", "failed", "cancelled"), timeout, "the job to end")
        except AssertionError as exc:
            raise AssertionError(f"{self._state(jid)}\n{logs(procs)}") from exc
        return self.row(jid)

    def _state(self, jid: str) -> str:
        r = self.row(jid)
        return f"status={r.status} iteration={r.iteration} lease={r.lease_owner} error={r.error}"

    def close(self) -> None:
        self.engine.dispose()


def _count(procs, pattern: str) -> int:
    return sum(len(re.findall(pattern, Path(p.log_path).read_text(errors="replace"))) for p in procs)


def _report(name: str, started: float, row: Job, procs, **counts: object) -> float:
    wall = time.monotonic() - started
    fields = {
        **counts,
        "iterations": row.iteration,
        "chunks_started": row.chunks_started,
        "chunks_committed": row.chunks_committed,
        "chunks_redone": row.chunks_started - row.chunks_committed,
        "messages_received": _count(procs, r"Task gradtune\.run_chunk\[[^\]]+\] received"),
        "sweep_reenqueued": _count(procs, r"re-enqueued at iteration"),
        "wall_s": round(wall, 1),
    }
    print(f"\nCHAOS {name}: " + " ".join(f"{k}={v}" for k, v in fields.items()))
    return wall


def _kill(proc) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def test_ten_kill_dash_nines_in_a_row_mid_chunk(tmp_path, pg_url, redis_url, spawn_worker):
    """kill -9 the worker running the job's chunk, ten times, each time at a later iteration (after
    the redone chunk committed, so no iteration is claimed three times without a commit and the
    poison-job limit stays at its default of 3). A second worker is always up to take over; a new
    one is started after each kill. The job completes with a gapless history and at most one chunk
    redone per kill."""
    started = time.monotonic()
    kills_wanted, iterations = 10, 20
    env = worker_env(tmp_path, pg_url, redis_url, GRADTUNE_CHUNK_ITERATIONS="1", **CHAOS_ENV)
    watch = _Watch(pg_url)
    alive = [spawn_worker(env, "w"), spawn_worker(env, "w")]
    everyone = list(alive)
    kills: list[int] = []  # the iteration each kill interrupted
    missed = 0  # kills that landed just after the chunk committed (not mid-chunk)
    with _client(env) as client:
        jid = client.post("/v1/jobs", json=_digits_job(iterations, steps=400)).json()["id"]
        seen: dict[str, float] = {}  # lease token -> when first seen
        trace: list[str] = []
        deadline = time.monotonic() + 110
        while len(kills) < kills_wanted:
            assert time.monotonic() < deadline, f"{len(kills)} kills in 110 s\n{logs(everyone)}"
            row = watch.row(jid)
            assert row.status in ("queued", "running"), f"{row.status} {row.error} {kills} {missed} {trace}"
            it, token = row.iteration, row.lease_owner
            # A chunk with work (not the final evaluation), later than the last kill's, under way 0.25 s.
            if token is None or it >= iterations or (kills and it <= kills[-1]):
                time.sleep(0.03)
                continue
            if time.monotonic() - seen.setdefault(token, time.monotonic()) < 0.1:
                time.sleep(0.03)
                continue
            pid = watch.holder_pid(jid, {p.pid for p in alive})
            victim = next((p for p in alive if p.pid == pid), None)
            if victim is None:
                trace.append(f"{time.monotonic() - started:.2f} it={it} no holder")
                time.sleep(0.03)
                continue
            _kill(victim)
            alive.remove(victim)
            after = watch.row(jid)
            trace.append(f"{time.monotonic() - started:.2f} kill it={it} after={after.iteration}")
            if after.lease_owner == token and after.iteration == it:
                kills.append(it)
            else:
                missed += 1
            replacement = spawn_worker(env, "w")
            alive.append(replacement)
            everyone.append(replacement)
        row = watch.wait_done(jid, 60, everyone)
        history = watch.history(jid)
    watch.close()
    print("\nkill trace (s since start): " + "; ".join(trace))
    wall = _report(
        "ten_kills", started, row, everyone, kills=len(kills) + missed, mid_chunk_kills=len(kills), killed_at=kills
    )
    assert row.status == "succeeded", (row.error, logs(everyone))
    assert history == list(range(1, iterations + 1))  # no gap, no duplicate
    assert len(set(kills)) == kills_wanted  # ten different iterations
    # Each mid-chunk kill redid its chunk, and nothing else was redone.
    assert row.chunks_started - row.chunks_committed <= len(kills) + missed
    assert row.chunks_started - row.chunks_committed >= len(kills)
    assert row.chunks_committed == iterations
    assert wall < 150


def _mid_chunk(watch: _Watch, jid: str, procs) -> None:
    """Wait until a chunk has committed and the next one is under way."""
    try:
        wait_for(
            lambda: (r := watch.row(jid)).chunks_committed >= 1 and r.lease_owner is not None and r.status == "running",
            60,
            "a chunk under way after a commit",
            interval=0.03,
        )
    except AssertionError as exc:
        raise AssertionError(logs(procs)) from exc


def test_redis_restarted_mid_job(tmp_path, pg_url, own_redis, spawn_worker):
    """The broker dies (SIGKILL, no persistence: every message in it is lost) while a chunk computes,
    with the other job's message waiting in its queue, and comes back two seconds later: both jobs
    complete (the waiting job's lost message is sent again, not after the hour-long visibility
    timeout)."""
    started = time.monotonic()
    iterations = 6
    own_redis.start()
    env = worker_env(tmp_path, pg_url, own_redis.url, GRADTUNE_CHUNK_ITERATIONS="2", **CHAOS_ENV)
    watch = _Watch(pg_url)
    procs = [spawn_worker(env)]
    with _client(env) as client:
        jids = [client.post("/v1/jobs", json=_digits_job(iterations, steps=400)).json()["id"] for _ in range(2)]

    def one_running_one_waiting() -> bool:
        rows = [watch.row(j) for j in jids]
        running = [r for r in rows if r.lease_owner is not None and r.status == "running"]
        waiting = [r for r in rows if r.lease_owner is None and r.enqueued_at is not None and r.status != "succeeded"]
        return len(running) == 1 and len(waiting) == 1 and sum(r.chunks_committed for r in rows) >= 1

    try:
        wait_for(one_running_one_waiting, 60, "a chunk under way and the other job's message queued", interval=0.03)
    except AssertionError as exc:
        raise AssertionError(logs(procs)) from exc
    at = [watch.row(j).iteration for j in jids]
    own_redis.restart(down_seconds=2.0)
    rows = [watch.wait_done(j, 80, procs) for j in jids]
    histories = [watch.history(j) for j in jids]
    watch.close()
    other = rows[1]
    wall = _report(
        "redis_restart",
        started,
        rows[0],
        procs,
        restarts=own_redis.starts - 1,
        restarted_at=at,
        jobs=len(jids),
        other_job_chunks=f"{other.chunks_started}/{other.chunks_committed}",
    )
    for row, history in zip(rows, histories, strict=True):
        assert row.status == "succeeded", (row.error, logs(procs))
        assert history == list(range(1, iterations + 1))
        assert row.chunks_started - row.chunks_committed <= 1
    assert wall < 90


def test_postgres_restarted_mid_job(tmp_path, redis_url, own_postgres, spawn_worker):
    """The database stops at once (``pg_ctl stop -m immediate``: every connection cut, as in a crash)
    while a chunk computes, and comes back two seconds later: the job completes."""
    started = time.monotonic()
    iterations = 8
    url = own_postgres.app_url
    env = worker_env(tmp_path, url, redis_url, GRADTUNE_CHUNK_ITERATIONS="2", **CHAOS_ENV)
    watch = _Watch(url)
    procs = [spawn_worker(env)]
    with _client(env) as client:
        jid = client.post("/v1/jobs", json=_digits_job(iterations, steps=400)).json()["id"]
    _mid_chunk(watch, jid, procs)
    at = watch.row(jid).iteration
    own_postgres.restart(down_seconds=2.0)
    row = watch.wait_done(jid, 80, procs)
    history = watch.history(jid)
    watch.close()
    wall = _report("postgres_restart", started, row, procs, restarts=own_postgres.starts - 1, restarted_at=at)
    assert row.status == "succeeded", (row.error, logs(procs))
    assert history == list(range(1, iterations + 1))
    assert row.chunks_started - row.chunks_committed <= 1
    assert wall < 90


def test_broker_down_at_submit_runs_once_it_is_back(tmp_path, pg_url, own_redis, spawn_worker):
    """The job is submitted while the broker is down: the API stores it (202, queued) without its
    message; the worker, started while the broker is still down, connects once it is back and its
    sweep sends the missing message: the job runs to the end."""
    started = time.monotonic()
    iterations = 4
    env = worker_env(tmp_path, pg_url, own_redis.url, GRADTUNE_CHUNK_ITERATIONS="2", **CHAOS_ENV)
    watch = _Watch(pg_url)
    with _client(env) as client:
        t = time.monotonic()
        r = client.post("/v1/jobs", json=small_job(iterations=iterations))
        submit_s = time.monotonic() - t
        assert r.status_code == 202, r.text
        jid = r.json()["id"]
        assert r.json()["status"] == "queued"
    procs = [spawn_worker(env)]
    time.sleep(1.0)
    assert watch.row(jid).status == "queued"
    own_redis.start()
    back = time.monotonic()
    row = watch.wait_done(jid, 80, procs)
    history = watch.history(jid)
    watch.close()
    wall = _report(
        "broker_down_at_submit",
        started,
        row,
        procs,
        submit_s=round(submit_s, 2),
        broker_back_to_done_s=round(time.monotonic() - back, 1),
    )
    assert row.status == "succeeded", (row.error, logs(procs))
    assert history == list(range(1, iterations + 1))
    assert submit_s < 15
    assert wall < 90


def test_forget_messages_after_a_broker_reconnection(db_url):
    """What a worker does when its broker connection comes back (worker/celery_app.py's
    BrokerReconnected): the outstanding messages of jobs no lease holds are forgotten, so the sweep
    resends them at once once stale; a job under a lease, or finished, keeps its state."""
    engine = make_engine(db_url)
    with Session(engine) as s:
        spec = {"name": "x"}
        waiting, held, done = (repository.create_job(s, spec=spec, name="x", iterations=4) for _ in range(3))
        s.flush()
        assert lifecycle.claim_job(s, job_id=held.id, iteration=0, stale_after_s=30) is not None
        done.status, done.enqueued_at = "succeeded", waiting.enqueued_at
        s.commit()
        assert lifecycle.forget_messages(s) == 1
        s.commit()
        s.expire_all()
        assert s.get(Job, waiting.id).enqueued_at is None
        assert s.get(Job, done.id).enqueued_at is not None
        assert s.get(Job, held.id).lease_owner is not None
        # Stale now: the sweep sends the forgotten message (and only that one).
        later = lifecycle.database_now(s) + timedelta(seconds=60)
        assert [j for j, _ in lifecycle.sweep(s, stale_after_s=30, now=later) if j == waiting.id] == [waiting.id]
    engine.dispose()
