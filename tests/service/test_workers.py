"""Worker registration on a real database (SQLite and PostgreSQL): rows written and refreshed by the
database's clock, GET /v1/workers with ``live``, /readyz's "no live worker", and the quiet /readyz
(what is down, never the error's text). Plus job errors without store URLs or credentials."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text, update
from sqlalchemy.orm import sessionmaker

import service.db.models
import service.workers
from service import workers
from service.db.clock import as_utc, database_now
from service.db.models import Worker
from service.db.session import make_engine
from service.main import create_app
from service.redaction import redact
from tests.helpers.support import keyed_client, make_settings
from tests.worker.test_runner import env  # noqa: F401  (the fixture: worker settings from the environment)


@pytest.fixture
def Session(db_url):
    engine = make_engine(db_url)
    yield sessionmaker(bind=engine, expire_on_commit=False)
    engine.dispose()


def scope_of(Session):
    """A session_scope on this test's database, for WorkerBeat."""
    from contextlib import contextmanager

    @contextmanager
    def scope():
        s = Session()
        try:
            yield s
            s.commit()
        except BaseException:
            s.rollback()
            raise
        finally:
            s.close()

    return scope


def age(Session, worker_id: str, seconds: float) -> None:
    """Make the worker last seen ``seconds`` ago by the database's clock."""
    with Session() as s:
        then = database_now(s) - timedelta(seconds=seconds)
        s.execute(update(Worker).where(Worker.id == worker_id).values(last_seen=then))
        s.commit()


def add(Session, worker_id: str, *, seen_ago: float = 0.0, job: str | None = None) -> None:
    with Session() as s:
        workers.register(s, worker_id=worker_id, host="gpu-1", pid=4242, device="cuda:0 (H200)", queues=["gradtune"])
        if job:
            workers.beat(s, worker_id=worker_id, current_job=job)
        s.commit()
    if seen_ago:
        age(Session, worker_id, seen_ago)


def row(Session, worker_id: str) -> Worker | None:
    with Session() as s:
        return s.get(Worker, worker_id)


# ---------------------------------------------------------------- the registry


def test_register_beat_and_live_by_the_database_clock(Session, monkeypatch):
    # The host's clock is days off: liveness must not notice (it reads the database's clock).
    real = datetime

    class Shifted(real):
        @classmethod
        def now(cls, tz=None):
            return real.now(tz) + timedelta(days=3)

    monkeypatch.setattr(service.db.models, "utcnow", lambda: real.now(UTC) - timedelta(days=3))
    monkeypatch.setattr(service.workers, "datetime", Shifted, raising=False)
    add(Session, "w1")
    with Session() as s:
        w = s.get(Worker, "w1")
        now = database_now(s)
        assert w is not None and abs(as_utc(w.last_seen) - now) < timedelta(seconds=2)
        assert as_utc(w.started_at) == as_utc(w.last_seen)
        assert (w.host, w.pid, w.device, w.queues, w.current_job) == (
            "gpu-1",
            4242,
            "cuda:0 (H200)",
            ["gradtune"],
            None,
        )
        assert workers.any_live(s, stale_after_s=60)
    age(Session, "w1", 61)
    with Session() as s:
        assert not workers.any_live(s, stale_after_s=60)
        assert workers.any_live(s, stale_after_s=120)
        assert workers.beat(s, worker_id="w1", current_job="job-1")
        s.commit()
    with Session() as s:
        assert workers.any_live(s, stale_after_s=60)
        items, total, live = workers.list_workers(s, stale_after_s=60)
        assert total == live == 1 and items[0][0].current_job == "job-1" and items[0][1] is True
        assert workers.beat(s, worker_id="w1")  # current_job kept when not given
        assert s.get(Worker, "w1").current_job == "job-1"
        assert not workers.beat(s, worker_id="nobody")
        workers.deregister(s, worker_id="w1")
        s.commit()
    assert row(Session, "w1") is None


def test_registering_prunes_rows_not_seen_for_a_day(Session):
    add(Session, "old", seen_ago=workers.PRUNE_AFTER_S + 60)
    add(Session, "dead", seen_ago=3600)
    add(Session, "new")
    assert row(Session, "old") is None and row(Session, "dead") is not None


def test_worker_beat_registers_refreshes_records_the_job_and_deregisters(Session, monkeypatch):
    beat = workers.WorkerBeat(device="cpu", queues=["q1"], every=0.05, scope=scope_of(Session))
    monkeypatch.setattr(workers, "_active", beat)
    beat.start()
    try:
        first = row(Session, beat.worker_id)
        assert first is not None and first.pid > 0 and first.host and first.queues == ["q1"]
        time.sleep(0.3)
        later = row(Session, beat.worker_id)
        assert later is not None and as_utc(later.last_seen) > as_utc(first.last_seen)
        workers.record_current_job("job-7")
        assert row(Session, beat.worker_id).current_job == "job-7"
        # a row that vanished (pruned, or deleted by hand) comes back at the next beat, job included
        with Session() as s:
            s.execute(text("DELETE FROM workers"))
            s.commit()
        deadline = time.monotonic() + 5
        while row(Session, beat.worker_id) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert row(Session, beat.worker_id).current_job == "job-7"
        workers.record_current_job(None)
        assert row(Session, beat.worker_id).current_job is None
    finally:
        beat.stop()
    assert row(Session, beat.worker_id) is None
    assert not [t for t in threading.enumerate() if t.name == "gradtune-worker-beat" and t.is_alive()]


def test_a_registry_that_cannot_write_does_not_stop_the_worker(caplog):
    def broken():
        raise RuntimeError("database down")

    beat = workers.WorkerBeat(device="cpu", queues=["q"], every=10, scope=broken)
    beat.beat_once(current_job="j")  # logged, not raised
    assert beat.current_job == "j"
    assert "could not refresh its registration" in caplog.text
    workers.record_current_job("j")  # no registration in this process: nothing happens


# ---------------------------------------------------------------- GET /v1/workers


def test_list_workers_with_live_flags_newest_first(tmp_path, db_url, Session):
    add(Session, "dead", seen_ago=300)
    add(Session, "busy", job="job-1")
    settings = make_settings(tmp_path, database_url=db_url, worker_stale_seconds=60)
    with keyed_client(create_app(settings), admin=True) as c:  # an admin key sees every current_job
        body = c.get("/v1/workers").json()
        assert [(w["id"], w["live"], w["current_job"]) for w in body["items"]] == [
            ("busy", True, "job-1"),
            ("dead", False, None),
        ]
        assert (body["total"], body["live"], body["stale_after_seconds"]) == (2, 1, 60.0)
        w = body["items"][0]
        assert (w["host"], w["pid"], w["device"], w["queues"]) == ("gpu-1", 4242, "cuda:0 (H200)", ["gradtune"])
        assert datetime.fromisoformat(w["last_seen"]).tzinfo is not None
        page = c.get("/v1/workers", params={"limit": 1, "offset": 1}).json()
        assert [w["id"] for w in page["items"]] == ["dead"] and page["total"] == 2
        for bad in ({"limit": 0}, {"limit": 101}, {"offset": -1}, {"offset": 10**20}):
            assert c.get("/v1/workers", params=bad).status_code == 422, bad


# ---------------------------------------------------------------- /readyz


def ready(tmp_path: Path, db_url: str, **overrides):
    settings = make_settings(tmp_path, database_url=db_url, **{"ready_needs_worker": True, **overrides})
    with TestClient(create_app(settings)) as c:
        return c.get("/readyz")


def test_readyz_needs_a_live_worker(tmp_path, db_url, Session):
    r = ready(tmp_path, db_url)
    assert r.status_code == 503
    assert r.json() == {
        "status": "unavailable",
        "detail": "not ready: no live worker",
        "checks": {"database": "ok", "broker": "ok", "workers": "no live worker"},
    }
    add(Session, "w1")
    r = ready(tmp_path, db_url)
    assert r.status_code == 200, r.text
    assert r.json()["checks"] == {"database": "ok", "broker": "ok", "workers": "ok"}
    age(Session, "w1", 30)
    assert ready(tmp_path, db_url, worker_stale_seconds=20).status_code == 503
    assert ready(tmp_path, db_url, worker_stale_seconds=40).status_code == 200


def test_readyz_without_the_worker_check_for_an_api_only_deployment(tmp_path, db_url):
    r = ready(tmp_path, db_url, ready_needs_worker=False)
    assert r.status_code == 200
    assert r.json()["checks"] == {"database": "ok", "broker": "ok"}


def test_the_setting_comes_from_the_environment(monkeypatch):
    from service.settings import Settings

    assert Settings().ready_needs_worker is True and Settings().worker_stale_seconds == 60
    monkeypatch.setenv("GRADTUNE_READY_NEEDS_WORKER", "false")
    monkeypatch.setenv("GRADTUNE_WORKER_STALE_SECONDS", "15")
    assert Settings().ready_needs_worker is False and Settings().worker_stale_seconds == 15


@pytest.mark.parametrize(
    "url",
    ["sqlite:////nonexistent-gradtune-dir/sub/x.db", "postgresql+psycopg://gradtune:s3cret-pw@127.0.0.1:1/nothing"],
    ids=["sqlite", "postgresql"],
)
def test_readyz_names_what_is_down_without_the_error_text(tmp_path, url, caplog):
    settings = make_settings(
        tmp_path, database_url=url, broker_url="redis://:r3dis-pw@127.0.0.1:1/0", ready_needs_worker=True
    )
    with TestClient(create_app(settings)) as c:
        r = c.get("/readyz")
    assert r.status_code == 503
    assert r.json() == {
        "status": "unavailable",
        "detail": "not ready: database unreachable; broker unreachable; workers unknown",
        "checks": {"database": "unreachable", "broker": "unreachable", "workers": "unknown"},
    }
    for secret in ("s3cret", "r3dis", "127.0.0.1", "nonexistent", "Error", "refused"):
        assert secret not in r.text
    # the detail is in the server's log, for the operator
    assert "readiness: database unreachable: OperationalError" in caplog.text
    assert "readiness: broker unreachable:" in caplog.text


# ---------------------------------------------------------------- job errors


def test_redact_hides_the_configured_locations_urls_and_credentials(tmp_path):
    s = make_settings(
        tmp_path,
        database_url="postgresql+psycopg://gt:pg-secret@db.internal:5432/gt",
        broker_url="redis://:redis-secret@redis:6379/0",
        artifact_url="s3://team-bucket/gradtune",
        s3_endpoint_url="http://minio.internal:9000",
    )
    cases = {
        "the stored file ab is missing from the artifact store s3://team-bucket/gradtune": (
            "the stored file ab is missing from the artifact store <artifact store>"
        ),
        'download s3://team-bucket/gradtune/ab failed: Could not connect to "http://minio.internal:9000/x"': (
            'download <artifact store>/ab failed: Could not connect to "<artifact store>/x"'
        ),
        "cannot reach postgresql+psycopg://gt:pg-secret@db.internal:5432/gt": "cannot reach <database>",
        "other ftp://u:p@host/x and bare user:pw@host": "other <url> and bare ***@host",
        f"cannot write {(tmp_path / 'data').resolve()}/cache/ab": "cannot write <data dir>/cache/ab",
        "task t0: batch_size 64 is larger than the training set (40 rows)": (
            "task t0: batch_size 64 is larger than the training set (40 rows)"
        ),
    }
    for raw, want in cases.items():
        assert redact(raw, s) == want
    assert redact("fetch https://example.org/data failed") == "fetch <url> failed"


def test_a_failed_job_records_no_store_url(env):  # noqa: F811
    """The runner records a job's error through redact(): a model whose stored file is gone fails
    the job naming the model, not the store's location (the full text is in the worker's log)."""
    import torch
    from torch import nn

    from service.settings import get_settings
    from tests.worker.test_exported_runner import iris_job, pt2, upload_model
    from worker import model_loader, runner

    client, _sent = env
    model_loader.clear_cache()
    model = upload_model(client, pt2(nn.Sequential(nn.Linear(4, 3)), torch.randn(2, 4)))
    jid = client.post("/v1/jobs", json=iris_job({"kind": "exported", "model": model["id"]})).json()["id"]
    client.app.state.store.delete(model["sha256"])
    assert runner.run_chunk(jid, 0, owner="w") == "failed"
    error = client.get(f"/v1/jobs/{jid}").json()["error"]
    assert model["id"] in error and "missing from the artifact store <artifact store>" in error
    store_url = get_settings().resolved_artifact_url()
    assert store_url not in error and "file://" not in error and str(get_settings().data_dir) not in error
    model_loader.clear_cache()


def test_the_runner_records_the_job_a_registered_worker_runs(env, monkeypatch):  # noqa: F811
    from tests.e2e.conftest import small_job
    from worker import runner

    client, _sent = env
    beat = workers.WorkerBeat(device="cpu", queues=["q"], every=60)
    monkeypatch.setattr(workers, "_active", beat)
    beat.start()
    try:
        jid = client.post("/v1/jobs", json=small_job(iterations=2, tasks=1)).json()["id"]
        assert runner.run_chunk(jid, 0, owner="w") == "committed"
        body = client.get("/v1/workers").json()
        assert [(w["id"], w["current_job"]) for w in body["items"]] == [(beat.worker_id, jid)]
        workers.record_current_job(None)  # what celery_app's task_postrun does
        assert client.get("/v1/workers").json()["items"][0]["current_job"] is None
    finally:
        beat.stop()
    assert client.get("/v1/workers").json()["total"] == 0


def test_what_a_celery_worker_registers(env, monkeypatch):  # noqa: F811
    """worker/celery_app.py's device label (the GPU's name on CUDA) and queues (from -Q)."""
    import types

    import torch

    from worker import celery_app
    from worker import device as worker_device

    monkeypatch.setattr(worker_device, "device", lambda: torch.device("cpu"))
    assert celery_app._device_label() == "cpu"
    monkeypatch.setattr(worker_device, "device", lambda: torch.device("cuda", 1))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"Fake GPU {i}")
    assert celery_app._device_label() == "cuda:1 (Fake GPU 1)"
    consumer = types.SimpleNamespace(
        app=types.SimpleNamespace(
            amqp=types.SimpleNamespace(queues=types.SimpleNamespace(consume_from={"b": 1, "a": 2}))
        )
    )
    assert celery_app._queues(consumer) == ["a", "b"]
    assert celery_app._queues(None) == [celery_app.settings.queue_name]
