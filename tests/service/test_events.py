"""GET /v1/jobs/{id}/events (Server-Sent Events), on SQLite and PostgreSQL: every committed iteration
once, in order, a status event per change, the stream ending with a finished job's status; resumable
with Last-Event-ID; another tenant's job answers 404; live: events arrive while the chunks run."""

from __future__ import annotations

import threading

import pytest

from gradtune.sse import ServerEvent, parse_sse
from service.main import create_app
from tests.helpers.support import keyed_client
from tests.service.conftest import job_body


def parse(lines) -> list[ServerEvent]:
    """SSE lines -> events (the client's parser, gradtune/sse.py; comments and pings dropped)."""
    return list(parse_sse(lines))


def stream(client, job_id: str, **headers) -> list[dict]:
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return parse(r.iter_lines())


def listen(client, job_id: str) -> tuple[list[ServerEvent], threading.Event, threading.Event]:
    """Follow the job's stream in a thread: (the events so far, set at the first, set at the end)."""
    seen: list[ServerEvent] = []
    first, done = threading.Event(), threading.Event()

    def run():
        try:
            with client.stream("GET", f"/v1/jobs/{job_id}/events") as r:
                for event in parse_sse(r.iter_lines()):
                    seen.append(event)
                    first.set()
        finally:
            done.set()

    threading.Thread(target=run, daemon=True).start()
    return seen, first, done


@pytest.fixture
def env(runner_env):
    app, client = runner_env.start(chunk_iterations=2, events_poll_seconds=0.05)
    return app, client, runner_env.sent


def run_all(sent, job_id: str) -> None:
    """Run the job's chunks as a worker would: the first (the API's message went to the broker),
    then each one the runner enqueues."""
    from worker import runner

    sent.append((job_id, 0))
    while sent:
        job_id, it = sent.pop(0)
        runner.run_chunk(job_id, it, owner="t")


def test_a_finished_job_streams_every_iteration_then_its_status_and_ends(env):
    app, client, sent = env
    job_id = client.post("/v1/jobs", json=job_body(meta={"iterations": 5, "seed": 0})).json()["id"]
    run_all(sent, job_id)
    events = stream(client, job_id)
    iterations = [e for e in events if e.event == "iteration"]
    assert [int(e.id) for e in iterations] == [1, 2, 3, 4, 5]
    history = client.get(f"/v1/jobs/{job_id}/history").json()["items"]
    assert [e.data for e in iterations] == history
    assert events[-1].event == "status" and events[-1].id == "5:succeeded"
    assert events[-1].data == client.get(f"/v1/jobs/{job_id}").json()

    resumed = stream(client, job_id, **{"Last-Event-ID": "3"})
    assert [(e.event, e.id) for e in resumed] == [
        ("iteration", "4"),
        ("iteration", "5"),
        ("status", "5:succeeded"),
    ]
    assert stream(client, job_id, **{"Last-Event-ID": "5:succeeded"}) == []
    assert [e.id for e in stream(client, job_id, **{"Last-Event-ID": "junk"})][:1] == ["1"]  # from the start


def test_events_arrive_while_the_job_runs(env):
    app, client, sent = env
    job_id = client.post("/v1/jobs", json=job_body(meta={"iterations": 6, "seed": 0})).json()["id"]
    seen, first, done = listen(client, job_id)
    assert first.wait(30), "no first event"  # connected before the job starts
    run_all(sent, job_id)
    assert done.wait(30), "the stream did not end after the job finished"
    kinds = [(e.event, e.id) for e in seen]
    assert kinds[0] == ("status", "0:queued")
    assert [i for k, i in kinds if k == "iteration"] == [str(n) for n in range(1, 7)]
    statuses = [i.split(":")[1] for k, i in kinds if k == "status"]
    assert statuses[0] == "queued" and statuses[-1] == "succeeded" and len(statuses) == len(set(statuses))


def test_another_tenants_job_is_404_and_no_key_is_401(tmp_path, db_url, make_settings):
    app = create_app(make_settings(tmp_path, database_url=db_url))
    with keyed_client(app, "alpha") as a, keyed_client(app, "beta") as b:
        job_id = a.post("/v1/jobs", json=job_body()).json()["id"]
        assert b.get(f"/v1/jobs/{job_id}/events").status_code == 404
        assert b.get(f"/v1/jobs/{job_id}/events").json() == {"detail": f"job {job_id} not found"}
        assert a.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
        events = stream(a, job_id)
        assert [(e.event, e.id) for e in events] == [("status", "0:cancelled")]
    from fastapi.testclient import TestClient

    with TestClient(app) as anonymous:
        assert anonymous.get(f"/v1/jobs/{job_id}/events").status_code == 401


def test_revoking_the_key_ends_its_open_stream_and_a_resume_is_401(tmp_path, db_url, make_settings):
    from service.keys import check_key, revoke_key

    # key_cache_seconds=0: a new request sees the revocation at once (the stream does either way)
    app = create_app(make_settings(tmp_path, database_url=db_url, events_poll_seconds=0.05, key_cache_seconds=0))
    with keyed_client(app, "alpha") as a:
        job_id = a.post("/v1/jobs", json=job_body()).json()["id"]  # queued: no worker runs it
        seen, first, done = listen(a, job_id)
        assert first.wait(30), "no first event"
        assert not done.wait(0.5), "the stream of a queued job ended by itself"
        with app.state.sessionmaker() as db:
            key_id = check_key(db, a.key)[1].id
            revoke_key(db, key_id=key_id)
            db.commit()
        assert done.wait(30), "the stream outlived its key"
        assert [(e.event, e.id) for e in seen][0] == ("status", "0:queued")
        assert seen[-1].event == "error" and "revoked" in seen[-1].data["detail"] and key_id in seen[-1].data["detail"]
        r = a.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "0:queued"})
        assert r.status_code == 401 and "revoked" in r.json()["detail"]
