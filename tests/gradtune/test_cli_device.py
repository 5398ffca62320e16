"""``gradtune worker --device`` (refused before Celery starts when it cannot work) and ``gradtune submit
--device`` (the body's device; the job's ``waiting`` said once on stderr), on this CPU machine."""

from __future__ import annotations

import json
import os

import httpx
import pytest
import torch
from typer.testing import CliRunner

import gradtune.client
from gradtune import cli

REAL_CLIENT = gradtune.client.Client


@pytest.fixture
def execs(monkeypatch):
    """os.execv replaced: the command lines the CLI would have become."""
    calls: list[list[str]] = []
    monkeypatch.setattr(os, "execv", lambda path, argv: calls.append(list(argv)))
    monkeypatch.setenv("GRADTUNE_DEVICE", "auto")  # restored after the test (the CLI sets it)
    monkeypatch.setenv("GRADTUNE_QUEUE_NAME", "gt-cli")
    return calls


def test_worker_device_cuda_without_cuda_is_refused_with_the_reason(execs, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    r = CliRunner().invoke(cli.cli, ["worker", "--device", "cuda"])
    assert r.exit_code == 1, r.output
    assert r.stderr.startswith("error: device cuda: CUDA is not available on this machine")
    assert "gradtune worker --device cpu" in r.stderr and "Traceback" not in r.output
    assert execs == []  # Celery never started


def test_worker_device_must_be_known(execs):
    r = CliRunner().invoke(cli.cli, ["worker", "--device", "gpu"])
    assert r.exit_code == 1 and "--device must be one of auto, cpu, cuda, not 'gpu'" in r.stderr
    assert execs == []


@pytest.mark.parametrize("device, cuda", [("cpu", False), ("cuda", True), ("auto", False)])
def test_worker_device_goes_to_the_worker_process(execs, monkeypatch, device, cuda):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    r = CliRunner().invoke(cli.cli, ["worker", "--device", device])
    assert r.exit_code == 0, r.output
    (argv,) = execs
    assert argv[argv.index("-Q") + 1] == "gt-cli"  # the shared queue; the process adds its device's
    assert os.environ["GRADTUNE_DEVICE"] == device  # what worker/device.py reads in that process


def _server(monkeypatch, job: dict) -> list[dict]:
    """A server that accepts a job and then answers ``job`` for it; returns the bodies posted."""
    posted: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/jobs" and request.method == "POST":
            posted.append(json.loads(request.content))
            return httpx.Response(202, json={**job, "status": "queued"})
        if request.url.path == "/v1/jobs/j1":
            return httpx.Response(200, json=job)
        return httpx.Response(404, json={"detail": "no"})

    monkeypatch.setattr(
        gradtune.client, "Client", lambda url, **kw: REAL_CLIENT(url, transport=httpx.MockTransport(handler))
    )
    return posted


def test_submit_device_and_the_waiting_notice(monkeypatch, tmp_path):
    waiting = "waiting for a GPU worker: no live worker takes cuda jobs (queue gradtune.cuda); start one"
    job = {"id": "j1", "name": "t", "status": "queued", "progress": {"iteration": 0, "iterations": 2}}
    posted = _server(monkeypatch, {**job, "device": "cuda", "waiting": waiting})
    path = tmp_path / "job.json"
    path.write_text(json.dumps({"name": "t", "device": "cpu"}))
    r = CliRunner().invoke(
        cli.cli, ["submit", str(path), "--device", "cuda", "--wait", "--timeout", "1", "--url", "http://x"]
    )
    assert r.exit_code == 1  # timed out: the job waits
    assert posted == [{"name": "t", "device": "cuda"}]
    assert r.stderr.count(waiting) == 1
    assert f"gradtune: job j1 is queued, {waiting}" in r.stderr

    _server(monkeypatch, {**job, "device": "cuda", "waiting": waiting})
    r = CliRunner().invoke(cli.cli, ["status", "j1", "--url", "http://x"])
    assert r.stdout.strip() == f"j1  queued     t  0/2  device cuda  {waiting}"
