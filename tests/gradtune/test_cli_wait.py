"""``gradtune submit --wait``: ``--timeout`` (exit 1 with a sentence) and the one-time notice, on
stderr, that the job waits while no worker is live; against a mock server (httpx.MockTransport)."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from typer.testing import CliRunner

import gradtune.client
from gradtune import cli

REAL_CLIENT = gradtune.client.Client


def play(monkeypatch, *, statuses: list[str], workers: dict | None) -> dict:
    """A server whose job j1 goes through ``statuses`` (the last one repeats) and whose /v1/workers
    answers ``workers`` (None: 404, an older server). Returns the request counts."""
    seen = {"job": 0, "workers": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/jobs" and request.method == "POST":
            return httpx.Response(202, json={"id": "j1", "status": "queued"})
        if path == "/v1/jobs/j1":
            status = statuses[min(seen["job"], len(statuses) - 1)]
            seen["job"] += 1
            progress = {"iteration": 0, "iterations": 2}
            return httpx.Response(200, json={"id": "j1", "name": "t", "status": status, "progress": progress})
        if path == "/v1/workers":
            seen["workers"] += 1
            if workers is None:
                return httpx.Response(404, json={"detail": "Not Found"})
            return httpx.Response(200, json=workers)
        return httpx.Response(404, json={"detail": "no"})

    monkeypatch.setattr(
        gradtune.client, "Client", lambda url, **kw: REAL_CLIENT(url, transport=httpx.MockTransport(handler))
    )
    return seen


@pytest.fixture
def job_file(tmp_path):
    path = tmp_path / "job.json"
    path.write_text(json.dumps({"name": "t"}))
    return str(path)


NO_WORKER = {"items": [], "total": 0, "live": 0, "stale_after_seconds": 60.0, "limit": 1, "offset": 0}
ONE_WORKER = {**NO_WORKER, "total": 1, "live": 1}


def test_timeout_exits_1_and_the_missing_worker_is_said_once(monkeypatch, job_file):
    seen = play(monkeypatch, statuses=["queued"], workers=NO_WORKER)
    t0 = time.monotonic()
    r = CliRunner().invoke(cli.cli, ["submit", job_file, "--wait", "--timeout", "1.5", "--url", "http://x"])
    took = time.monotonic() - t0
    assert r.exit_code == 1, r.output
    assert r.stdout.splitlines()[0] == "j1"
    assert r.stderr.count("no live worker") == 1
    assert "job j1 is queued and there is no live worker (none seen in the last 60 s)" in r.stderr
    assert "error: timed out after 1.5 s: job j1 is still queued" in r.stderr
    assert "gradtune status j1" in r.stderr
    assert 1.5 <= took < 10 and seen["job"] >= 2 and seen["workers"] == 1


def test_no_notice_when_a_worker_is_live_and_the_job_ends(monkeypatch, job_file):
    seen = play(monkeypatch, statuses=["queued", "succeeded"], workers=ONE_WORKER)
    r = CliRunner().invoke(cli.cli, ["submit", job_file, "--wait", "--timeout", "30", "--url", "http://x"])
    assert r.exit_code == 0, r.output
    assert "no live worker" not in r.stderr and "succeeded" in r.stdout
    assert seen["workers"] == 1


def test_an_older_server_without_the_workers_list_is_fine(monkeypatch, job_file):
    play(monkeypatch, statuses=["running", "failed"], workers=None)
    r = CliRunner().invoke(cli.cli, ["submit", job_file, "--wait", "--url", "http://x"])
    assert r.exit_code == 1 and "failed" in r.stdout  # the job's own outcome, as before
    assert "no live worker" not in r.stderr and "timed out" not in r.stderr


def test_timeout_needs_wait(monkeypatch, job_file):
    seen = play(monkeypatch, statuses=["queued"], workers=NO_WORKER)
    r = CliRunner().invoke(cli.cli, ["submit", job_file, "--timeout", "5", "--url", "http://x"])
    assert r.exit_code == 1 and "--timeout goes with --wait" in r.stderr
    assert seen == {"job": 0, "workers": 0}  # nothing was submitted
    r = CliRunner().invoke(cli.cli, ["submit", job_file, "--wait", "--timeout", "-1", "--url", "http://x"])
    assert r.exit_code == 2  # refused by the option's bounds


def test_client_workers_calls_the_endpoint(monkeypatch):
    play(monkeypatch, statuses=["queued"], workers=ONE_WORKER)
    with gradtune.client.Client("http://x") as c:
        assert c.workers()["live"] == 1
