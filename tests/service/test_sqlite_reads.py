"""Reads take no write lock on SQLite (issue 10, item 11), and the read path answers as before.

While another connection holds SQLite's write lock (BEGIN IMMEDIATE plus an uncommitted UPDATE),
the GET handlers answer at once with the last committed state; a write request (cancel) waits
for the lock, which shows the lock is really held. Each request runs in a thread with a short
deadline, so a regression fails in seconds instead of waiting out the 30 s busy timeout.
"""

from __future__ import annotations

import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from service import repository
from service.main import create_app
from tests.helpers.support import keyed_client
from tests.service.conftest import job_body

QUICK = 5.0  # seconds: far below the 30 s busy timeout a write-locking read would wait


@pytest.fixture
def sqlite_client(tmp_path, sqlite_url, make_settings):
    with keyed_client(create_app(make_settings(tmp_path, database_url=sqlite_url))) as client:
        yield client, sqlite_url.removeprefix("sqlite:///")


def test_reads_do_not_wait_for_the_write_lock(sqlite_client):
    client, path = sqlite_client
    job_id = client.post("/v1/jobs", json=job_body()).json()["id"]
    writer = sqlite3.connect(path, isolation_level=None, timeout=30)
    pool = ThreadPoolExecutor(max_workers=2)
    cancel = None
    try:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("UPDATE jobs SET name = 'renamed' WHERE id = ?", (job_id,))
        t0 = time.monotonic()
        for url in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/history", f"/v1/jobs/{job_id}/settings", "/v1/jobs"):
            response = pool.submit(client.get, url).result(timeout=QUICK)
            assert response.status_code in (200, 409), (url, response.text)
        took = time.monotonic() - t0
        job = pool.submit(client.get, f"/v1/jobs/{job_id}").result(timeout=QUICK).json()
        assert job["name"] == "test-job"  # the last committed state, not the writer's
        # The control: a write does wait for the lock.
        cancel = pool.submit(client.post, f"/v1/jobs/{job_id}/cancel")
        time.sleep(0.5)
        assert not cancel.done(), "a write request did not wait for the write lock: the lock is not held"
    finally:
        writer.execute("COMMIT")
        writer.close()
        if cancel is not None:
            cancel.result(timeout=40)
        pool.shutdown(wait=True)
    print(f"4 reads under a held write lock answered in {took:.2f} s")
    assert took < QUICK
    after = client.get(f"/v1/jobs/{job_id}").json()
    assert after["name"] == "renamed" and after["status"] == "cancelled"


def test_status_read_is_the_public_view_of_the_stored_job(app, client):
    """GET /v1/jobs/{id} (a narrow select through a read connection) gives exactly what
    ``to_public`` makes of the whole ORM row, on SQLite and PostgreSQL, and 404 for no job."""
    job_id = client.post("/v1/jobs", json=job_body(name="narrow")).json()["id"]
    got = client.get(f"/v1/jobs/{job_id}")
    assert got.status_code == 200
    from service import placement

    with app.state.sessionmaker() as session:
        job = repository.get_job(session, job_id=job_id)
        assert job is not None
        # the public view, with `waiting` as the route fills it (service/placement.py: no live worker here)
        expected = placement.public_job(session, job, app.state.settings).model_dump(mode="json")
        status = repository.get_job_status(session, job_id=job_id)
        assert placement.public_job(session, status, app.state.settings).model_dump(mode="json") == expected
    assert expected["waiting"] and got.json() == expected
    missing = client.get("/v1/jobs/00000000-0000-0000-0000-000000000000")
    assert missing.status_code == 404
    assert missing.json() == {"detail": "job 00000000-0000-0000-0000-000000000000 not found"}
