"""GET /metrics on SQLite and PostgreSQL: scraped, parsed with prometheus_client's parser, and every
value checked against the database (jobs by status, queue depth, live workers, meta-iterations and
evaluations); the HTTP histogram by route template and status, never a raw id; no key needed; a
database or metrics directory that cannot be read leaves an answer (the chunk histogram from the
workers' files: tests/worker/test_chunk_metrics.py)."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select, text, update

from gradtune.spec import STATUSES
from service import lifecycle, workers
from service.db.clock import database_now
from service.db.models import JobIteration, Worker
from service.main import create_app
from tests.helpers.support import keyed_client
from tests.service.conftest import job_body


def scrape(client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``{(sample name, sorted labels): value}`` of one scrape."""
    r = client.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = s.value
    return samples


def record(iteration: int, evaluations: int) -> dict:
    """A progress record as the engine writes one (the fields commit_chunk stores)."""
    return {"iteration": iteration, "meta_loss": 0.5, "lr": 0.01, "momentum": 0.9, "accepted": True,
            "step_size": 0.1, "evaluations": evaluations, "phase": "refine"}  # fmt: skip


def claim(app, job_id: str) -> lifecycle.Claim:
    with app.state.sessionmaker() as s:
        got = lifecycle.claim_job(s, job_id=job_id, iteration=None, stale_after_s=30.0)
        s.commit()
    assert got is not None
    return got


@pytest.fixture
def app(tmp_path, db_url, make_settings):
    return create_app(make_settings(tmp_path, database_url=db_url, worker_stale_seconds=60.0))


def test_values_match_the_database(app):
    with keyed_client(app) as client:
        ids = [client.post("/v1/jobs", json=job_body()).json()["id"] for _ in range(5)]
        queued, held, between, failed, cancelled = ids
        claim(app, held)  # running, its lease held
        c = claim(app, between)  # running between two chunks: committed, no lease, next message waits
        with app.state.sessionmaker() as s:
            status = lifecycle.commit_chunk(
                s, job_id=between, token=c.token, start_iteration=0, records=[record(1, 5), record(2, 7)], checkpoint={}
            )
            s.commit()
        assert status == "running"
        c = claim(app, failed)
        with app.state.sessionmaker() as s:
            assert lifecycle.fail_job(s, job_id=failed, token=c.token, error="boom")
            s.commit()
        assert client.post(f"/v1/jobs/{cancelled}/cancel").status_code == 202
        with app.state.sessionmaker() as s:  # two workers, one not seen for longer than the stale time
            for wid in ("w-live", "w-stale"):
                workers.register(s, worker_id=wid, host="h", pid=1, device="cpu", queues=["gradtune"])
            then = database_now(s) - timedelta(seconds=120)
            s.execute(update(Worker).where(Worker.id == "w-stale").values(last_seen=then))
            s.commit()

        got = scrape(client)

    with app.state.sessionmaker() as s:
        by_status = dict(s.execute(text("SELECT status, COUNT(*) FROM jobs GROUP BY status")).all())
        waiting = s.scalar(
            text("SELECT COUNT(*) FROM jobs WHERE status IN ('queued', 'running') AND lease_owner IS NULL")
        )
        iterations = s.scalar(text("SELECT COUNT(*) FROM job_iterations"))
        evaluations = sum((e or {}).get("evaluations", 0) for e in s.scalars(select(JobIteration.extra)))
        live = workers.list_workers(s, stale_after_s=60.0)[2]
    # the scenario itself, so that a setup gone wrong cannot agree with a collector gone wrong
    assert by_status == {"queued": 1, "running": 2, "failed": 1, "cancelled": 1}
    assert (waiting, iterations, evaluations, live) == (2, 2, 12, 1)

    assert got[("gradtune_database_up", ())] == 1
    for status in STATUSES:  # every status, zeros included
        assert got[("gradtune_jobs", (("status", status),))] == by_status.get(status, 0), status
    assert got[("gradtune_queue_depth", ())] == waiting
    assert got[("gradtune_workers_live", ())] == live
    assert got[("gradtune_meta_iterations_total", ())] == iterations
    assert got[("gradtune_evaluations_total", ())] == evaluations


def test_http_latency_by_route_template_and_status_never_a_raw_id(app):
    unknown = str(uuid.uuid4())
    with keyed_client(app) as client:
        assert client.get(f"/v1/jobs/{unknown}").status_code == 404
        assert client.get(f"/v1/jobs/{unknown}").status_code == 404
        assert client.get("/v1/jobs").status_code == 200
        assert client.get(f"/no/such/{unknown}").status_code == 404
        assert client.post("/v1/jobs", json={}).status_code == 422
        r = client.get("/metrics")
        got = scrape(client)
    assert unknown not in r.text
    count = "gradtune_http_request_seconds_count"

    def n(method: str, route: str, status: str) -> float:
        return got.get((count, (("method", method), ("route", route), ("status", status))), 0)

    assert n("GET", "/v1/jobs/{job_id}", "404") == 2
    assert n("GET", "/v1/jobs", "200") == 1
    assert n("GET", "unmatched", "404") == 1
    assert n("POST", "/v1/jobs", "422") == 1
    assert n("GET", "/metrics", "200") == 1  # the first scrape, seen by the second
    templates = set(app.openapi()["paths"]) | {"unmatched"}
    routes = {dict(labels)["route"] for name, labels in got if name == count}
    assert routes <= templates, routes - templates
    buckets = [v for (name, labels), v in got.items() if name == count.replace("_count", "_bucket")]
    assert buckets and all(v >= 0 for v in buckets)


def test_a_request_refused_before_routing_is_counted_under_its_route(app):
    with keyed_client(app) as client:
        huge = {"Content-Type": "application/json", "Content-Length": str(app.state.settings.max_body_bytes + 1)}
        assert client.post("/v1/jobs", content=b"{}", headers=huge).status_code == 413
        got = scrape(client)
    key = (("method", "POST"), ("route", "/v1/jobs"), ("status", "413"))
    assert got[("gradtune_http_request_seconds_count", key)] == 1


def test_no_key_needed_and_two_apps_keep_their_own_counts(app, tmp_path, make_settings, db_url):
    other = create_app(make_settings(tmp_path / "other", database_url=db_url))
    with TestClient(app) as plain, TestClient(other) as plain_other:
        assert plain.get("/v1/jobs").status_code == 401  # the key check still holds for /v1
        assert plain.get("/healthz").status_code == 200
        a, b = scrape(plain), scrape(plain_other)
    count = "gradtune_http_request_seconds_count"
    # the key check's 401 is timed too, under the route it refused
    assert sorted(labels for name, labels in a if name == count) == [
        (("method", "GET"), ("route", "/healthz"), ("status", "200")),
        (("method", "GET"), ("route", "/v1/jobs"), ("status", "401")),
    ]
    assert not [labels for name, labels in b if name == count], "one app's requests in another app's metrics"
    assert a[("gradtune_jobs", (("status", "queued"),))] == 0


def test_database_down_or_unreadable_metric_files_still_answer(tmp_path, make_settings, sqlite_url):
    down = create_app(make_settings(tmp_path / "down", database_url=f"sqlite:///{tmp_path}/missing/dir/x.db"))
    with TestClient(down) as client:
        got = scrape(client)
    assert got[("gradtune_database_up", ())] == 0
    assert not [k for k in got if k[0] == "gradtune_jobs"]

    settings = make_settings(tmp_path / "junk", database_url=sqlite_url)
    folder = settings.resolved_metrics_dir() / "somehost"
    folder.mkdir(parents=True)
    (folder / "histogram_1.db").write_bytes(b"\xff" * 64)
    with TestClient(create_app(settings)) as client:
        got = scrape(client)
    assert got[("gradtune_database_up", ())] == 1 and got[("gradtune_jobs", (("status", "queued"),))] == 0


def test_api_processes_in_multiprocess_mode_count_once(tmp_path, sqlite_url):
    """``uvicorn --workers N`` with PROMETHEUS_MULTIPROC_DIR inside GRADTUNE_METRICS_DIR: the HTTP
    histogram goes to files and each sample is answered once (summed over processes), not twice."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRADTUNE_", "PROMETHEUS_"))}
    env.update(
        PYTHONPATH=str(root),
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "m" / "api"),
        GRADTUNE_METRICS_DIR=str(tmp_path / "m"),
        GRADTUNE_DATA_DIR=str(tmp_path / "data"),
        GRADTUNE_DATABASE_URL=sqlite_url,
        GRADTUNE_ALLOWED_HOSTS="testserver",
    )
    (tmp_path / "m" / "api").mkdir(parents=True)
    code = (
        "from fastapi.testclient import TestClient\n"
        "from service.main import create_app\n"
        "with TestClient(create_app()) as c:\n"
        "    c.get('/healthz'); c.get('/healthz')\n"
        "    print(c.get('/metrics').text)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    samples = [
        s
        for family in text_string_to_metric_families(out.stdout)
        for s in family.samples
        if s.name == "gradtune_http_request_seconds_count" and s.labels["route"] == "/healthz"
    ]
    assert [s.value for s in samples] == [2.0]
    files = [p.name for p in (tmp_path / "m" / "api").iterdir()]
    assert len(files) == 1 and files[0].startswith("histogram_"), files
