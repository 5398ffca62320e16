"""The jobs resource on a real database (SQLite and PostgreSQL) and a real broker."""

from __future__ import annotations

import json
import logging
import uuid
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select

from service.db.models import Job, JobIteration, utcnow
from service.db.session import make_engine
from service.main import create_app
from service.queue import RUN_CHUNK
from service.schemas import JobCreate
from tests.helpers.support import decode_message, keyed_client
from tests.service.conftest import BUILTIN_TASK, count_jobs, enqueued, job_body


def submit(client, body=None) -> dict:
    r = client.post("/v1/jobs", json=body or job_body())
    assert r.status_code == 202, r.text
    return r.json()


def set_job(app, job_id: str, **values) -> None:
    with app.state.sessionmaker.begin() as s:
        job = s.get(Job, job_id)
        for k, v in values.items():
            setattr(job, k, v)


def stored(app, job_id: str) -> Job:
    with app.state.sessionmaker() as s:
        return s.get(Job, job_id)


# ------------------------------------------------------------------ submit


def test_submit_is_202_with_location_and_the_job(client, app):
    body = job_body(BUILTIN_TASK, name="digits-mlp")
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert uuid.UUID(job["id"]).version == 4
    assert job["name"] == "digits-mlp" and job["status"] == "queued"
    assert job["progress"] == {"iteration": 0, "iterations": 5, "meta_loss": None, "lr": 0.01, "momentum": 0.9}
    assert job["started_at"] is None and job["finished_at"] is None and job["error"] is None
    created = datetime.fromisoformat(job["created_at"].replace("Z", "+00:00"))
    assert created.tzinfo is not None and abs(created - utcnow()) < timedelta(minutes=1)
    # The stored spec is the validated body with defaults filled in.
    row = stored(app, job["id"])
    assert row.spec == JobCreate.model_validate(body).model_dump(mode="json")
    assert row.spec["tasks"][0]["data"]["val_fraction"] == 0.2
    assert row.iterations == 5 and row.cancel_requested is False


def test_submit_enqueues_one_chunk_message_for_the_job(client, app):
    job = submit(client)
    messages = enqueued(app)
    assert len(messages) == 1
    assert messages[0]["task"] == RUN_CHUNK
    assert messages[0]["args"][0] == job["id"]


def test_enqueue_happens_after_commit(client, app, settings):
    """When the producer is called, another connection must already see the queued job."""
    producer = app.state.producer
    real_enqueue = producer.enqueue_chunk
    seen = []

    def checking_enqueue(job_id, *args, **kwargs):
        engine = make_engine(settings.resolved_database_url())
        try:
            with engine.connect() as conn:
                status = conn.execute(select(Job.status).where(Job.id == job_id)).scalar()
        finally:
            engine.dispose()
        seen.append((job_id, status))
        return real_enqueue(job_id, *args, **kwargs)

    producer.enqueue_chunk = checking_enqueue
    job = submit(client)
    assert seen == [(job["id"], "queued")]
    assert [m["args"][0] for m in enqueued(app)] == [job["id"]]


def test_broker_down_still_202_and_the_job_stays_queued(client, app, caplog):
    def failing_enqueue(job_id, *args, **kwargs):
        raise ConnectionError("broker is down")

    app.state.producer.enqueue_chunk = failing_enqueue
    with caplog.at_level(logging.WARNING, logger="service.api.jobs"):
        job = submit(client)
    assert job["status"] == "queued"
    assert stored(app, job["id"]).status == "queued"
    assert any(job["id"] in rec.getMessage() and "not enqueued" in rec.getMessage() for rec in caplog.records)
    # No message is outstanding: the sweep sends one as soon as the job is stale.
    assert stored(app, job["id"]).enqueued_at is None


def test_a_sent_message_is_recorded_as_outstanding(client, app):
    job = submit(client)
    row = stored(app, job["id"])
    assert row.enqueued_at is not None and row.attempts == 0 and row.lease_owner is None


def test_unreachable_redis_broker_still_202(tmp_path, db_url, make_settings):
    app = create_app(make_settings(tmp_path, database_url=db_url, broker_url="redis://127.0.0.1:1/0"))
    with keyed_client(app) as client:
        job = submit(client)
        assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"
    assert count_jobs(app) == 1


def test_submit_enqueues_on_real_redis(tmp_path, db_url, redis_url, make_settings):
    import redis

    settings = make_settings(tmp_path, database_url=db_url, broker_url=redis_url, queue_name="gt-api-test")
    app = create_app(settings)
    with keyed_client(app) as client:
        job = submit(client)
    r = redis.Redis.from_url(redis_url)
    try:
        assert r.llen("gt-api-test") == 1
        message = decode_message(json.loads(r.lindex("gt-api-test", 0)))
    finally:
        r.close()
    assert message["task"] == RUN_CHUNK and message["args"][0] == job["id"]


def test_responses_never_carry_the_data(client):
    marker = 0.123456789
    body = job_body()
    body["tasks"][0]["data"]["x_train"][0] = [marker, marker]
    job = submit(client, body)
    for path in (f"/v1/jobs/{job['id']}", "/v1/jobs", f"/v1/jobs/{job['id']}/history"):
        r = client.get(path)
        assert r.status_code == 200
        assert str(marker) not in r.text and "x_train" not in r.text and "spec" not in r.text


# ------------------------------------------------------------------ read


def test_get_job_and_404(client):
    job = submit(client)
    r = client.get(f"/v1/jobs/{job['id']}")
    assert r.status_code == 200 and r.json() == job
    missing = str(uuid.uuid4())
    r = client.get(f"/v1/jobs/{missing}")
    assert r.status_code == 404 and r.json() == {"detail": f"job {missing} not found"}
    r = client.get("/v1/jobs/not-a-uuid-at-all")
    assert r.status_code == 404 and r.json() == {"detail": "job not-a-uuid-at-all not found"}


def test_progress_shows_what_the_worker_recorded(client, app):
    job = submit(client)
    started = utcnow()
    set_job(app, job["id"], status="running", iteration=3, meta_loss=0.42, lr=0.05, momentum=0.8, started_at=started)
    got = client.get(f"/v1/jobs/{job['id']}").json()
    assert got["status"] == "running"
    assert got["progress"] == {"iteration": 3, "iterations": 5, "meta_loss": 0.42, "lr": 0.05, "momentum": 0.8}
    assert datetime.fromisoformat(got["started_at"].replace("Z", "+00:00")) == started


def test_a_diverged_meta_loss_reads_as_null(client, app):
    job = submit(client)
    set_job(app, job["id"], status="running", iteration=1, meta_loss=float("nan"))
    r = client.get(f"/v1/jobs/{job['id']}")
    assert r.status_code == 200 and r.json()["progress"]["meta_loss"] is None


def test_list_newest_first_paginated_and_filtered(client):
    ids = [submit(client, job_body(name=f"job{i}"))["id"] for i in range(5)]
    r = client.get("/v1/jobs")
    assert r.status_code == 200
    page = r.json()
    assert [j["id"] for j in page["items"]] == ids[::-1]
    assert (page["total"], page["limit"], page["offset"]) == (5, 20, 0)

    page = client.get("/v1/jobs", params={"limit": 2, "offset": 2}).json()
    assert [j["id"] for j in page["items"]] == [ids[2], ids[1]]
    assert (page["total"], page["limit"], page["offset"]) == (5, 2, 2)
    assert client.get("/v1/jobs", params={"offset": 10}).json()["items"] == []

    assert client.post(f"/v1/jobs/{ids[1]}/cancel").status_code == 202
    page = client.get("/v1/jobs", params={"status": "cancelled"}).json()
    assert [j["id"] for j in page["items"]] == [ids[1]] and page["total"] == 1
    page = client.get("/v1/jobs", params={"status": "queued"}).json()
    assert page["total"] == 4 and ids[1] not in [j["id"] for j in page["items"]]
    assert client.get("/v1/jobs", params={"status": "succeeded"}).json() == {
        "items": [],
        "total": 0,
        "limit": 20,
        "offset": 0,
    }


@pytest.mark.parametrize(
    "params, field, needle",
    [
        ({"status": "done"}, "status", "'queued', 'running', 'succeeded', 'failed' or 'cancelled'"),
        ({"limit": 0}, "limit", "greater than or equal to 1"),
        ({"limit": 101}, "limit", "less than or equal to 100"),
        ({"offset": -1}, "offset", "greater than or equal to 0"),
        ({"limit": "ten"}, "limit", "valid integer"),
    ],
)
def test_list_rejects_bad_query(client, params, field, needle):
    r = client.get("/v1/jobs", params=params)
    assert r.status_code == 422, r.text
    [e] = r.json()["detail"]
    assert e["loc"] == ["query", field] and e["field"] == field
    assert needle in e["msg"]


def test_history_in_order_and_404(client, app):
    job = submit(client)
    assert client.get(f"/v1/jobs/{job['id']}/history").json() == {"job_id": job["id"], "items": []}
    with app.state.sessionmaker.begin() as s:
        for i in (2, 1, 3):
            s.add(
                JobIteration(
                    job_id=job["id"],
                    iteration=i,
                    meta_loss=1.0 / i,
                    lr=0.01 * i,
                    momentum=0.9,
                    accepted=i != 2,
                    step_size=0.1,
                    extra={"hypergradient": [1, 2]},
                )
            )
    r = client.get(f"/v1/jobs/{job['id']}/history")
    assert r.status_code == 200
    items = r.json()["items"]
    assert [h["iteration"] for h in items] == [1, 2, 3]
    assert items[1] == {
        "iteration": 2,
        "meta_loss": 0.5,
        "lr": 0.02,
        "momentum": 0.9,
        "accepted": False,
        "step_size": 0.1,
    }
    missing = str(uuid.uuid4())
    r = client.get(f"/v1/jobs/{missing}/history")
    assert r.status_code == 404 and r.json() == {"detail": f"job {missing} not found"}


# ------------------------------------------------------------------ settings

RESULT = {
    "optimizer": "SGD",
    "lr": 0.07,
    "momentum": 0.85,
    "evaluation": {
        "tasks": [{"name": "t0", "initial_val_loss": 0.9, "learned_val_loss": 0.4}],
        "mean_initial_val_loss": 0.9,
        "mean_learned_val_loss": 0.4,
        "initial": {"lr": 0.01, "momentum": 0.9},
        "draws": [0],
    },
}


def test_settings_409_until_succeeded_then_200(client, app):
    job = submit(client)
    jid = job["id"]
    r = client.get(f"/v1/jobs/{jid}/settings")
    assert r.status_code == 409
    assert r.json() == {"detail": f"job {jid} is queued; its settings are available once it has succeeded"}

    set_job(app, jid, status="running", iteration=2)
    r = client.get(f"/v1/jobs/{jid}/settings")
    assert r.status_code == 409
    assert r.json()["detail"] == (
        f"job {jid} is running (iteration 2 of 5); its settings are available once it has succeeded"
    )

    set_job(app, jid, status="succeeded", iteration=5, result=RESULT, finished_at=utcnow())
    r = client.get(f"/v1/jobs/{jid}/settings")
    assert r.status_code == 200
    assert r.json() == RESULT


def test_settings_409_for_failed_names_the_error_and_for_cancelled(client, app):
    failed, cancelled = submit(client)["id"], submit(client)["id"]
    set_job(app, failed, status="failed", error="the meta-loss diverged at every step size")
    r = client.get(f"/v1/jobs/{failed}/settings")
    assert r.status_code == 409
    assert r.json()["detail"] == f"job {failed} failed: the meta-loss diverged at every step size"
    client.post(f"/v1/jobs/{cancelled}/cancel")
    r = client.get(f"/v1/jobs/{cancelled}/settings")
    assert r.status_code == 409 and r.json()["detail"] == f"job {cancelled} was cancelled; it has no settings"


def test_settings_404(client):
    missing = str(uuid.uuid4())
    r = client.get(f"/v1/jobs/{missing}/settings")
    assert r.status_code == 404 and r.json() == {"detail": f"job {missing} not found"}


# ------------------------------------------------------------------ cancel


def test_cancel_queued_job_is_immediate(client, app):
    jid = submit(client)["id"]
    r = client.post(f"/v1/jobs/{jid}/cancel")
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["status"] == "cancelled" and body["finished_at"] is not None
    row = stored(app, jid)
    assert row.status == "cancelled" and row.finished_at is not None
    assert client.get(f"/v1/jobs/{jid}").json()["status"] == "cancelled"
    again = client.post(f"/v1/jobs/{jid}/cancel")
    assert again.status_code == 409
    assert again.json() == {"detail": f"job {jid} is already cancelled; only queued or running jobs can be cancelled"}


def test_cancel_running_job_is_requested(client, app):
    jid = submit(client)["id"]
    set_job(app, jid, status="running", started_at=utcnow(), lease_owner="w1")
    r = client.post(f"/v1/jobs/{jid}/cancel")
    assert r.status_code == 202
    assert r.json()["status"] == "running" and r.json()["finished_at"] is None
    assert r.json()["cancel_requested"] is True
    row = stored(app, jid)
    assert row.status == "running" and row.cancel_requested is True and row.lease_owner == "w1"
    # The job body shows the pending cancel at once, in the listing too.
    assert client.get(f"/v1/jobs/{jid}").json()["cancel_requested"] is True
    assert client.get("/v1/jobs").json()["items"][0]["cancel_requested"] is True
    assert client.post(f"/v1/jobs/{jid}/cancel").status_code == 202  # asking twice is harmless


@pytest.mark.parametrize("status", ["succeeded", "failed"])
def test_cancel_finished_job_is_409_and_changes_nothing(client, app, status):
    jid = submit(client)["id"]
    finished = utcnow()
    set_job(app, jid, status=status, finished_at=finished)
    r = client.post(f"/v1/jobs/{jid}/cancel")
    assert r.status_code == 409
    assert r.json()["detail"] == f"job {jid} is already {status}; only queued or running jobs can be cancelled"
    row = stored(app, jid)
    assert row.status == status and row.cancel_requested is False


def test_cancel_404(client):
    missing = str(uuid.uuid4())
    r = client.post(f"/v1/jobs/{missing}/cancel")
    assert r.status_code == 404 and r.json() == {"detail": f"job {missing} not found"}


# ------------------------------------------------------------------ deadlines


def test_a_job_gets_the_default_deadline_and_may_ask_for_its_own(client, app, settings):
    job = submit(client)
    assert job["max_seconds"] == settings.default_job_seconds and job["elapsed_seconds"] == 0
    assert job["stopped"] is None and job["cancel_requested"] is False
    body = job_body()
    body["meta"]["max_seconds"] = 90.5
    job = submit(client, body)
    assert job["max_seconds"] == 90.5 and stored(app, job["id"]).max_seconds == 90.5
    assert client.get(f"/v1/jobs/{job['id']}").json()["max_seconds"] == 90.5


def test_a_deadline_above_the_ceiling_is_a_422_naming_the_field_and_the_limit(client, app, nothing_changed, settings):
    body = job_body()
    body["meta"]["max_seconds"] = settings.max_job_seconds + 1
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 422
    (err,) = r.json()["detail"]
    assert err["field"] == "meta.max_seconds" and err["type"] == "limit_exceeded"
    assert f"limit of {settings.max_job_seconds:g} seconds" in err["msg"]
    nothing_changed()
    body["meta"]["max_seconds"] = settings.max_job_seconds  # the ceiling itself is allowed
    assert client.post("/v1/jobs", json=body).status_code == 202


@pytest.mark.parametrize("value", [0, -5, "soon"])
def test_a_deadline_must_be_a_positive_number(client, nothing_changed, value):
    body = job_body()
    body["meta"]["max_seconds"] = value
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 422 and "meta.max_seconds" in r.text
    nothing_changed()


def test_the_default_deadline_never_exceeds_the_ceiling(tmp_path, db_url, make_settings):
    settings = make_settings(tmp_path, database_url=db_url, default_job_seconds=5000, max_job_seconds=600)
    assert settings.job_seconds(None) == 600 and settings.job_seconds(30) == 30
    with keyed_client(create_app(settings)) as client:
        assert submit(client)["max_seconds"] == 600
