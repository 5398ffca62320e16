"""Stopping a search: the engine's should_stop between evaluations, deadlines (meta.max_seconds),
each chunk's share of time, and cancel within one heartbeat, including a cancel during the last
chunk (a cancelled job never ends succeeded).

The runner tests run on SQLite and PostgreSQL (db_url). Where time matters they replace the chunk
clock (runner._clock) with a simulated one that advances one second per evaluation, so deadlines
and shares are exact; the cancel tests run in real time and print what they measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import select

from service.db import session as db_session
from service.db.models import Job, JobIteration
from service.settings import Settings
from tests.e2e.conftest import small_job
from tests.helpers.tasks import synthetic_task
from worker import engine, runner
from worker.engine import LINE_SEARCH, MetaConfig, best_settings, init_state, run_meta, state_iteration
from worker.engine.meta import evaluate as meta_evaluate

ROOT = Path(__file__).resolve().parents[2]

# --------------------------------------------------------------------------- the engine


def _tasks():
    return [synthetic_task(seed=s, n=48, steps=10) for s in range(2)]


CONFIGS = {
    "stencil": MetaConfig(iterations=4),
    "line": MetaConfig(iterations=4, **LINE_SEARCH),
    "per_layer": MetaConfig(iterations=4, per_layer=True, constant_fraction=0.5),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_should_stop_that_never_fires_changes_nothing(name):
    tasks, config = _tasks(), CONFIGS[name]
    start = init_state(config, 0.01, 0.5)
    plain_records, checked_records, asked = [], [], []
    plain = run_meta(tasks, config, start, 4, on_iteration=plain_records.append)
    checked = run_meta(
        tasks, config, start, 4, on_iteration=checked_records.append, should_stop=lambda: asked.append(1) is not None
    )
    assert checked == plain and checked_records == plain_records
    # asked before each iteration and before each evaluation within one
    assert len(asked) > 2 * 4


def test_a_stop_between_evaluations_drops_only_the_iteration_under_way():
    """Stop at the k-th question, for every k of a whole run: the state returned is exactly the
    state after the iterations reported, whether the stop came before an iteration or inside one."""
    tasks, config = _tasks(), CONFIGS["stencil"]
    start = init_state(config, 0.01, 0.5)
    full_records: list[dict] = []
    asked = []
    run_meta(tasks, config, start, 4, on_iteration=full_records.append, should_stop=lambda: asked.append(1) is not None)
    inside = 0
    for k in range(1, len(asked) + 1):
        records: list[dict] = []
        seen = {"questions": 0, "pre": True, "last": None}

        def note(record, records=records, seen=seen):
            records.append(record)
            seen["pre"] = True  # the next question is asked before an iteration

        def stop(k=k, seen=seen):
            seen["questions"] += 1
            seen["last"] = "before an iteration" if seen["pre"] else "between evaluations"
            seen["pre"] = False
            return seen["questions"] >= k

        state = run_meta(tasks, config, start, 4, on_iteration=note, should_stop=stop)
        done = len(records)
        assert records == full_records[:done]
        assert state_iteration(state) == done
        if done:
            assert state == run_meta(tasks, config, start, done), f"stopped at question {k} ({seen['last']})"
        else:
            assert best_settings(state) == best_settings(start)
        inside += seen["last"] == "between evaluations"
    assert inside > 0, "no stop ever came between two evaluations of one iteration"


# --------------------------------------------------------------------------- the chunk's stop rule


class _Beat:
    def __init__(self):
        self.lost = self.cancel = False

    def stop_reason(self):
        return "lost" if self.lost else "cancel" if self.cancel else None


def _stop(clock, *, max_seconds=None, elapsed=0.0, chunk_seconds=10.0, default=100.0):
    settings = Settings(chunk_seconds=chunk_seconds, default_job_seconds=default, max_job_seconds=1000.0)
    claim = SimpleNamespace(max_seconds=max_seconds, elapsed_seconds=elapsed)
    return runner._Stop(_Beat(), claim, settings, clock=lambda: clock[0])


def test_the_share_stops_between_iterations_predicted_from_the_longest():
    clock = [0.0]
    stop = _stop(clock, chunk_seconds=10.0)
    done = 0
    for duration in [3.0] * 10:
        if stop():
            break
        clock[0] += duration
        stop.iteration_done()
        done += 1
    assert done == 3 and stop.reason == "share" and stop.elapsed() == 9.0  # a fourth would end at 12 > 10
    clock = [0.0]
    stop = _stop(clock, chunk_seconds=10.0)
    assert not stop()
    clock[0] += 25.0  # one iteration longer than the share: it still counts, then the chunk ends
    stop.iteration_done()
    assert stop() and stop.reason == "share"


def test_the_deadline_counts_earlier_chunks_and_stops_between_evaluations():
    clock = [0.0]
    stop = _stop(clock, max_seconds=30.0, elapsed=25.0, chunk_seconds=100.0)
    assert not stop()
    clock[0] += 4.9
    assert not stop()  # no iteration finished: share untouched; 29.9 s spent
    clock[0] += 0.1
    assert stop() and stop.reason == "deadline"
    # no deadline given: the settings' default
    clock = [0.0]
    stop = _stop(clock, default=50.0, chunk_seconds=1000.0)
    clock[0] += 49.0
    assert not stop()
    clock[0] += 1.0
    assert stop() and stop.reason == "deadline"


def test_cancel_and_a_lost_lease_stop_at_once():
    clock = [0.0]
    stop = _stop(clock)
    assert not stop()
    stop.heartbeat.cancel = True
    assert stop() and stop.reason == "cancel"
    stop.heartbeat.lost = True
    assert stop() and stop.reason == "lost"


# --------------------------------------------------------------------------- the runner


@pytest.fixture
def env(runner_env):
    """The API and the runner on one database (tests/conftest.py: runner_env)."""
    return runner_env


@pytest.fixture
def sim_clock(monkeypatch):
    """runner._clock advances one second per evaluation of the search (and by nothing else)."""
    now = [0.0]
    monkeypatch.setattr(runner, "_clock", lambda: now[0])
    for cls in (meta_evaluate.PairEvaluator, meta_evaluate.TableEvaluator):
        for name in ("forward", "value_and_grad"):
            real = getattr(cls, name)

            def ticking(self, *args, _real=real, **kwargs):
                now[0] += 1.0
                return _real(self, *args, **kwargs)

            monkeypatch.setattr(cls, name, ticking)
    return now


def _drain(sent, limit=100):
    outcomes = []
    while sent and len(outcomes) < limit:
        job_id, it = sent.pop(0)
        outcomes.append(runner.run_chunk(job_id, it, owner=f"t-{job_id}-{it}"))
    return outcomes


def _row(job_id) -> Job:
    with db_session.session_scope() as db:
        job = db.get(Job, job_id)
        db.expunge(job)
        return job


def _history(job_id) -> list[int]:
    with db_session.session_scope() as db:
        return list(
            db.scalars(
                select(JobIteration.iteration).where(JobIteration.job_id == job_id).order_by(JobIteration.iteration)
            )
        )


def _submit(client, spec) -> str:
    r = client.post("/v1/jobs", json=spec)
    assert r.status_code == 202, r.text
    return r.json()["id"]


@pytest.mark.parametrize("chunk_iterations", [2, 100])
def test_at_the_deadline_the_job_succeeds_with_the_best_point_so_far(env, sim_clock, chunk_iterations):
    _, client = env.start(chunk_iterations=chunk_iterations, chunk_seconds=10_000)
    spec = small_job(iterations=40, tasks=1, steps=10)
    spec["meta"]["max_seconds"] = 7
    jid = _submit(client, spec)
    body = client.get(f"/v1/jobs/{jid}").json()
    assert body["max_seconds"] == 7 and body["stopped"] is None and body["elapsed_seconds"] == 0
    env.sent.append((jid, 0))
    outcomes = _drain(env.sent)
    assert outcomes[-1] == "succeeded" and set(outcomes[:-1]) == {"committed"}
    job = client.get(f"/v1/jobs/{jid}").json()
    assert job["status"] == "succeeded" and job["stopped"] == "deadline"
    done = job["progress"]["iteration"]
    assert 0 < done < 40 and _history(jid) == list(range(1, done + 1))
    # seven evaluations: the stop came at the first question after the seventh, never later
    assert job["elapsed_seconds"] == pytest.approx(7.0)
    settings = client.get(f"/v1/jobs/{jid}/settings").json()
    assert settings["stopped"] == "deadline"
    best = best_settings(_row(jid).checkpoint)
    assert (settings["lr"], settings["momentum"]) == (best["lr"], best["momentum"])


def test_a_deadline_before_the_first_iteration_ends_succeeded_with_the_start(env, sim_clock):
    _, client = env.start(chunk_iterations=100, chunk_seconds=10_000)
    spec = small_job(iterations=10, tasks=1, steps=10)
    spec["meta"]["max_seconds"] = 0.5  # passes during the first evaluation
    jid = _submit(client, spec)
    env.sent.append((jid, 0))
    assert _drain(env.sent) == ["committed", "succeeded"]
    job = client.get(f"/v1/jobs/{jid}").json()
    assert job["status"] == "succeeded" and job["stopped"] == "deadline" and job["progress"]["iteration"] == 0
    assert _history(jid) == [] and job["elapsed_seconds"] == pytest.approx(1.0)
    settings = client.get(f"/v1/jobs/{jid}/settings").json()
    assert (settings["lr"], settings["momentum"]) == pytest.approx((0.01, 0.9)) and settings["stopped"] == "deadline"


def test_a_job_without_max_seconds_gets_the_default_and_a_job_in_time_is_not_stopped(env, sim_clock):
    _, client = env.start(chunk_iterations=100, default_job_seconds=10_000)
    jid = _submit(client, small_job(iterations=3, tasks=1, steps=10))
    assert client.get(f"/v1/jobs/{jid}").json()["max_seconds"] == 10_000
    env.sent.append((jid, 0))
    assert _drain(env.sent) == ["committed", "succeeded"]
    job = client.get(f"/v1/jobs/{jid}").json()
    assert job["stopped"] is None and job["progress"]["iteration"] == 3 and job["elapsed_seconds"] > 0
    assert "stopped" not in client.get(f"/v1/jobs/{jid}/settings").json()


def test_no_chunk_runs_longer_than_its_share_and_chunking_changes_no_result(env, sim_clock):
    share = 6.0
    _, client = env.start(chunk_iterations=100, chunk_seconds=share)
    spec = small_job(iterations=12, tasks=1, steps=10)
    jid = _submit(client, spec)
    env.sent.append((jid, 0))
    durations, sizes = [], []
    while env.sent:
        job_id, it = env.sent.pop(0)
        before = _row(job_id)
        outcome = runner.run_chunk(job_id, it)
        after = _row(job_id)
        if outcome == "committed":
            durations.append(after.elapsed_seconds - before.elapsed_seconds)
            sizes.append(after.iteration - before.iteration)
    print(f"\nshare {share:g} s: chunks of {sizes} iterations lasting {durations} simulated seconds")
    assert sum(sizes) == 12 and len(sizes) > 2 and max(sizes) < 12
    for duration, size in zip(durations, sizes, strict=True):
        assert duration <= share or size == 1  # only a single iteration longer than the share overruns it
    assert max(durations) < Settings(chunk_seconds=share).visibility_timeout_seconds()
    # stopping between iterations loses nothing: the same settings as one uninterrupted run
    from service.schemas import JobCreate

    job = JobCreate.model_validate(spec)
    config = runner.meta_config(job)
    tasks = runner.build_tasks(job)
    direct = best_settings(run_meta(tasks, config, init_state(config, 0.01, 0.9), 12))
    settings = client.get(f"/v1/jobs/{jid}/settings").json()
    assert (settings["lr"], settings["momentum"]) == (direct["lr"], direct["momentum"])
    assert client.get(f"/v1/jobs/{jid}").json()["stopped"] is None


def test_the_visibility_timeout_outlasts_the_longest_chunk():
    for share in (1.0, 300.0, 900.0, 3600.0, 10_000.0):
        s = Settings(chunk_seconds=share)
        # a chunk lasts its share plus at most one iteration; iterations up to three shares are covered
        assert s.visibility_timeout_seconds() >= share + 3 * share
        assert s.visibility_timeout_seconds() >= 3600.0


def test_the_worker_gives_redis_the_derived_visibility_timeout(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADTUNE_")}
    env.update(
        GRADTUNE_BROKER_URL="redis://127.0.0.1:6379/10",
        GRADTUNE_CHUNK_SECONDS="2500",
        GRADTUNE_DATA_DIR=str(tmp_path),
        PYTHONPATH=str(ROOT),
    )
    code = "import json; from worker.celery_app import app; print(json.dumps(app.conf.broker_transport_options))"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["visibility_timeout"] == 10_000.0


# --------------------------------------------------------------------------- cancel


@pytest.fixture
def slow_evaluations(monkeypatch):
    """Each evaluation of the search takes at least 50 ms, and so does each iteration (one that
    records convergence evaluates nothing)."""
    from worker.engine.meta import loop

    real_iterate = loop._iterate
    iterations = [0]

    def slow_iterate(*args, **kwargs):
        time.sleep(0.05)
        out = real_iterate(*args, **kwargs)
        iterations[0] += 1
        return out

    monkeypatch.setattr(loop, "_iterate", slow_iterate)
    for name in ("forward", "value_and_grad"):
        real = getattr(meta_evaluate.PairEvaluator, name)

        def slow(self, *args, _real=real, **kwargs):
            time.sleep(0.05)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(meta_evaluate.PairEvaluator, name, slow)
    return iterations


def _wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("timed out")


def test_cancel_shows_at_once_and_stops_the_chunk_within_one_heartbeat(env, slow_evaluations):
    beat = 0.2
    _, client = env.start(chunk_iterations=1000, heartbeat_seconds=beat)
    jid = _submit(client, small_job(iterations=500, tasks=1, steps=10))
    outcome: list[str] = []
    worker = threading.Thread(target=lambda: outcome.append(runner.run_chunk(jid, 0)))
    worker.start()
    _wait_for(lambda: slow_evaluations[0] >= 3)  # some iterations in
    t0 = time.monotonic()
    r = client.post(f"/v1/jobs/{jid}/cancel")
    assert r.status_code == 202 and r.json()["cancel_requested"] is True and r.json()["status"] == "running"
    assert client.get(f"/v1/jobs/{jid}").json()["cancel_requested"] is True
    worker.join(timeout=30)
    latency = time.monotonic() - t0
    print(f"\ncancel -> chunk ended in {latency:.3f} s (heartbeat {beat} s, evaluations >= 50 ms)")
    assert outcome == ["cancelled"]
    assert latency < beat + 1.0, "the chunk ran on after the cancel"
    job = client.get(f"/v1/jobs/{jid}").json()
    assert job["status"] == "cancelled" and job["finished_at"]
    done = job["progress"]["iteration"]
    assert 0 < done < 500 and _history(jid) == list(range(1, done + 1))  # what it finished is kept
    assert env.sent == []  # no next chunk
    assert client.get(f"/v1/jobs/{jid}/settings").status_code == 409


def test_a_lost_lease_stops_the_chunk_within_one_heartbeat(env, slow_evaluations):
    beat = 0.2
    _, client = env.start(chunk_iterations=1000, heartbeat_seconds=beat)
    jid = _submit(client, small_job(iterations=500, tasks=1, steps=10))
    outcome: list[str] = []
    worker = threading.Thread(target=lambda: outcome.append(runner.run_chunk(jid, 0)))
    worker.start()
    _wait_for(lambda: slow_evaluations[0] >= 2)
    t0 = time.monotonic()
    with db_session.session_scope() as db:
        db.get(Job, jid).lease_owner = "someone-else"
    worker.join(timeout=30)
    latency = time.monotonic() - t0
    print(f"\nlease lost -> chunk ended in {latency:.3f} s")
    assert outcome == ["lost"] and latency < beat + 1.0
    assert _history(jid) == [] and env.sent == []


def test_cancel_during_the_evaluation_of_the_last_chunk_ends_cancelled(env, monkeypatch):
    _, client = env.start(chunk_iterations=100)
    jid = _submit(client, small_job(iterations=2, tasks=1, steps=10))
    assert runner.run_chunk(jid, 0) == "committed"
    real = runner.evaluate_settings

    def cancelled_meanwhile(*args, **kwargs):
        result = real(*args, **kwargs)
        assert client.post(f"/v1/jobs/{jid}/cancel").status_code == 202
        return result

    monkeypatch.setattr(runner, "evaluate_settings", cancelled_meanwhile)
    assert runner.run_chunk(jid, 2) == "cancelled"
    job = client.get(f"/v1/jobs/{jid}").json()
    assert job["status"] == "cancelled" and job["cancel_requested"] is True
    assert _row(jid).result is None
    assert client.get(f"/v1/jobs/{jid}/settings").status_code == 409


def test_cancel_during_the_last_iterations_unnoticed_by_a_heartbeat_ends_cancelled(env, monkeypatch):
    """The heartbeat is too slow to notice: the chunk runs to its end, and its commit ends the job."""
    _, client = env.start(chunk_iterations=100, heartbeat_seconds=3600)
    jid = _submit(client, small_job(iterations=3, tasks=1, steps=10))
    real = engine.run_meta

    def cancelled_meanwhile(*args, **kwargs):
        assert client.post(f"/v1/jobs/{jid}/cancel").status_code == 202
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "run_meta", cancelled_meanwhile)
    assert runner.run_chunk(jid, 0) == "cancelled"
    job = client.get(f"/v1/jobs/{jid}").json()
    assert job["status"] == "cancelled" and job["progress"]["iteration"] == 3 and _history(jid) == [1, 2, 3]
    assert env.sent == []  # no evaluation chunk: the job is over


def test_cancel_racing_the_last_chunk_never_ends_succeeded(env, monkeypatch):
    """The last chunk (evaluate, taking 0.1 s more here, and finish) in one thread, the cancel
    request in another, at staggered moments (before the claim, during the evaluation, after the
    finish): whichever takes the row lock first wins, and a cancel that was accepted (202) always
    ends cancelled; a cancel refused (409) found the job already succeeded."""
    _, client = env.start(chunk_iterations=100, heartbeat_seconds=0.05)
    real = runner.evaluate_settings

    def slower(*args, **kwargs):
        time.sleep(0.1)
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "evaluate_settings", slower)
    outcomes = []
    for trial in range(10):
        jid = _submit(client, small_job(iterations=1, tasks=1, steps=10))
        assert runner.run_chunk(jid, 0) == "committed"
        result: list[str] = []
        worker = threading.Thread(target=lambda jid=jid, result=result: result.append(runner.run_chunk(jid, 1)))
        worker.start()
        time.sleep(0.03 * trial)
        code = client.post(f"/v1/jobs/{jid}/cancel").status_code
        worker.join(timeout=60)
        status = client.get(f"/v1/jobs/{jid}").json()["status"]
        outcomes.append((code, result[0], status))
        if code == 202:
            assert status == "cancelled" and result[0] == "cancelled", outcomes
        else:
            assert code == 409 and status == "succeeded" and result[0] == "succeeded", outcomes
    print(f"\ncancel races (cancel answer, chunk outcome, final status): {outcomes}")
    assert any(code == 202 for code, _, _ in outcomes)
