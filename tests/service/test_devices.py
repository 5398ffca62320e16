"""Jobs by device (gradtune/spec/devices.py, service/placement.py): the queue each job's message goes
to on a real Redis broker, the 422 for an unknown device, and what a job says while no live worker
takes its queue, with fake worker rows in the registry (a GPU worker is a row that consumes
``<base>.cuda``: everything here runs on CPU)."""

from __future__ import annotations

import json
import typing
from datetime import timedelta

import pytest
from sqlalchemy import update

from gradtune.cli import _job_line
from gradtune.spec import JOB_DEVICES, WORKER_DEVICES, job_queue, worker_queues
from service import workers
from service.db.clock import database_now
from service.db.models import Job, Worker
from service.main import create_app
from service.queue import RUN_CHUNK
from service.schemas import Device
from tests.helpers.support import decode_message, keyed_client
from tests.service.conftest import job_body

BASE = "gt-dev"


def test_the_devices_and_their_queues():
    assert typing.get_args(Device) == JOB_DEVICES == ("auto", "cpu", "cuda")
    assert [job_queue(BASE, d) for d in JOB_DEVICES] == [BASE, f"{BASE}.cpu", f"{BASE}.cuda"]
    assert job_queue(BASE, None) == BASE  # a job stored before devices: auto
    assert {d: worker_queues(BASE, d) for d in WORKER_DEVICES} == {
        "cpu": [BASE, f"{BASE}.cpu"],
        "cuda": [BASE, f"{BASE}.cuda"],
    }
    # every worker consumes the auto queue; each device queue has consumers of that device only
    for device in JOB_DEVICES:
        takers = [w for w in WORKER_DEVICES if job_queue(BASE, device) in worker_queues(BASE, w)]
        assert takers == (list(WORKER_DEVICES) if device == "auto" else [device])
    with pytest.raises(ValueError, match="auto, cpu, cuda"):
        job_queue(BASE, "gpu")
    with pytest.raises(ValueError, match="cpu, cuda"):
        worker_queues(BASE, "auto")


# ---------------------------------------------------------------- routing on a real broker


@pytest.fixture
def redis_app(tmp_path, db_url, redis_url, make_settings):
    return create_app(make_settings(tmp_path, database_url=db_url, broker_url=redis_url, queue_name=BASE))


def _queued(redis_url: str) -> dict[str, list[str]]:
    """Job ids of the chunk messages waiting in each of the three queues."""
    import redis

    r = redis.Redis.from_url(redis_url)
    try:
        out = {}
        for device in JOB_DEVICES:
            q = job_queue(BASE, device)
            messages = [decode_message(json.loads(m)) for m in r.lrange(q, 0, -1)]
            assert all(m["task"] == RUN_CHUNK for m in messages)
            out[device] = [m["args"][0] for m in messages]
        return out
    finally:
        r.close()


def test_each_job_goes_to_its_devices_queue_and_waits_there(redis_app, redis_url):
    with keyed_client(redis_app) as client:
        ids = {}
        for device in JOB_DEVICES:
            r = client.post("/v1/jobs", json=job_body(device=device))
            assert r.status_code == 202, r.text
            assert r.json()["device"] == device
            ids[device] = r.json()["id"]
        plain = client.post("/v1/jobs", json=job_body()).json()  # no device: auto
    assert plain["device"] == "auto"
    assert _queued(redis_url) == {"auto": [plain["id"], ids["auto"]], "cpu": [ids["cpu"]], "cuda": [ids["cuda"]]}
    with redis_app.state.sessionmaker() as s:
        for device, jid in ids.items():
            row = s.get(Job, jid)
            assert (row.requested_device, row.spec["device"]) == (device, device)


def test_the_sweeps_resends_go_to_the_jobs_queue(redis_app, redis_url, monkeypatch):
    """worker/runner.sweep_once sends through the same function as the API (service/queue.send_chunk)."""
    from service.queue import make_celery
    from worker import celery_app, runner

    monkeypatch.setattr(celery_app, "app", make_celery(redis_app.state.settings))
    monkeypatch.setattr(runner, "get_settings", lambda: redis_app.state.settings)
    monkeypatch.setattr(runner, "session_scope", redis_app.state.sessionmaker.begin)
    with keyed_client(redis_app) as client:
        cuda = client.post("/v1/jobs", json=job_body(device="cuda")).json()["id"]
        auto = client.post("/v1/jobs", json=job_body()).json()["id"]
    import redis

    r = redis.Redis.from_url(redis_url)
    r.delete(*(job_queue(BASE, d) for d in JOB_DEVICES))  # the broker lost the messages
    r.close()
    with redis_app.state.sessionmaker.begin() as s:  # ... and the jobs have waited past the stale cutoff
        s.execute(update(Job).values(enqueued_at=None))
        later = database_now(s) + timedelta(seconds=redis_app.state.settings.stale_after_seconds + 1)
    assert sorted(runner.sweep_once(now=later)) == sorted([(cuda, 0), (auto, 0)])
    assert _queued(redis_url) == {"auto": [auto], "cpu": [], "cuda": [cuda]}


def test_an_unknown_device_is_a_422_naming_the_field(client, nothing_changed):
    r = client.post("/v1/jobs", json=job_body(device="gpu"))
    assert r.status_code == 422, r.text
    (e,) = r.json()["detail"]
    assert e["field"] == "device" and "'auto', 'cpu' or 'cuda'" in e["msg"]
    nothing_changed()


# ---------------------------------------------------------------- waiting, by the registry


def _register(app, worker_id: str, device: str, *, seen_ago: float = 0.0) -> None:
    """A worker row as a real worker on ``device`` (cpu or cuda) registers it."""
    base = app.state.settings.queue_name
    with app.state.sessionmaker.begin() as s:
        workers.register(s, worker_id=worker_id, host="h", pid=1, device=device, queues=worker_queues(base, device))
    if seen_ago:
        with app.state.sessionmaker.begin() as s:
            then = database_now(s) - timedelta(seconds=seen_ago)
            s.execute(update(Worker).where(Worker.id == worker_id).values(last_seen=then))


def _waiting(client, ids: dict[str, str]) -> dict[str, str | None]:
    bodies = {d: client.get(f"/v1/jobs/{jid}").json() for d, jid in ids.items()}
    listed = {j["id"]: j["waiting"] for j in client.get("/v1/jobs").json()["items"]}
    out = {d: body["waiting"] for d, body in bodies.items()}
    assert out == {d: listed[jid] for d, jid in ids.items()}  # the list says the same
    return out


def test_a_job_says_what_it_waits_for_while_no_live_worker_takes_its_queue(app, client):
    ids = {d: client.post("/v1/jobs", json=job_body(device=d)).json()["id"] for d in JOB_DEVICES}
    base = app.state.settings.queue_name

    none = _waiting(client, ids)  # no worker at all
    assert none["auto"].startswith("waiting for a worker: none is live")
    assert none["cpu"].startswith("waiting for a CPU worker") and f"queue {base}.cpu" in none["cpu"]
    assert none["cuda"].startswith("waiting for a GPU worker: no live worker takes cuda jobs")
    assert "gradtune worker --device cuda" in none["cuda"]

    _register(app, "cpu-1", "cpu")  # auto without a live GPU worker: a CPU worker takes it
    waits = _waiting(client, ids)
    assert (waits["auto"], waits["cpu"]) == (None, None) and waits["cuda"] == none["cuda"]
    job = client.get(f"/v1/jobs/{ids['cuda']}").json()
    assert (job["status"], job["device"]) == ("queued", "cuda")
    assert _job_line(job).endswith(f"device cuda  {none['cuda']}")  # what `gradtune status` prints

    _register(app, "gpu-1", "cuda", seen_ago=app.state.settings.worker_stale_seconds + 5)  # not live
    assert _waiting(client, ids)["cuda"] == none["cuda"]
    _register(app, "gpu-1", "cuda")  # live again
    assert _waiting(client, ids) == {"auto": None, "cpu": None, "cuda": None}

    with app.state.sessionmaker.begin() as s:  # only the GPU worker is left: cpu jobs wait
        s.execute(update(Worker).where(Worker.id == "cpu-1").values(last_seen=database_now(s) - timedelta(days=1)))
    assert _waiting(client, ids) == {"auto": None, "cpu": none["cpu"], "cuda": None}


def test_a_running_job_under_a_lease_or_an_ended_one_waits_for_nothing(app, client):
    cuda = client.post("/v1/jobs", json=job_body(device="cuda")).json()["id"]
    assert client.get(f"/v1/jobs/{cuda}").json()["waiting"] is not None
    with app.state.sessionmaker.begin() as s:
        s.execute(update(Job).where(Job.id == cuda).values(status="running", lease_owner="t"))
    assert client.get(f"/v1/jobs/{cuda}").json()["waiting"] is None
    with app.state.sessionmaker.begin() as s:  # between two chunks: no lease, the next message queued
        s.execute(update(Job).where(Job.id == cuda).values(lease_owner=None))
    assert client.get(f"/v1/jobs/{cuda}").json()["waiting"].startswith("waiting for a GPU worker")
    with app.state.sessionmaker.begin() as s:
        s.execute(update(Job).where(Job.id == cuda).values(status="failed", error="x"))
    assert client.get(f"/v1/jobs/{cuda}").json()["waiting"] is None


def test_the_submit_answer_already_says_it(client):
    job = client.post("/v1/jobs", json=job_body(device="cuda")).json()
    assert job["status"] == "queued" and job["waiting"].startswith("waiting for a GPU worker")
