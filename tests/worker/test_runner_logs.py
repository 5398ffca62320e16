"""The runner's log lines carry the job id (service/logs.py's job_context around run_chunk), and a
worker process's Celery logging goes through configure_logging."""

from __future__ import annotations

import io
import json
import logging

from service import logs
from tests.e2e.conftest import small_job
from tests.worker.test_runner import env  # noqa: F401 - the runner's fixture: worker settings, messages captured
from worker import runner


def test_lines_made_while_a_chunk_runs_carry_its_job_id(env, caplog):  # noqa: F811
    client, sent = env
    jid = client.post("/v1/jobs", json=small_job(iterations=2, tasks=1)).json()["id"]
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.JsonFormatter())
    log = logging.getLogger("gradtune.worker")
    log.addHandler(handler)
    try:
        with caplog.at_level(logging.INFO, logger="gradtune.worker"):
            assert runner.run_chunk(jid, 0, owner="a") == "committed"
            assert runner.run_chunk(jid, 2, owner="b") == "succeeded"
            log.info("after the chunk")
    finally:
        log.removeHandler(handler)
    done = [r for r in caplog.records if r.getMessage().startswith(f"job {jid} succeeded")]
    assert len(done) == 1 and done[0].job_id == jid
    assert getattr(caplog.records[-1], "job_id", None) is None  # not after the chunk
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert any(line["message"].startswith(f"job {jid} succeeded") and line["job_id"] == jid for line in lines)
    assert "job_id" not in lines[-1] and lines[-1]["message"] == "after the chunk"


def test_celery_logging_setup_goes_through_configure_logging(monkeypatch):
    from celery import signals

    import worker.celery_app  # connects the receiver

    calls: list[tuple] = []
    monkeypatch.setattr(logs, "configure_logging", lambda settings, level=None: calls.append((settings, level)))
    receivers = signals.setup_logging.send(sender=None, loglevel=logging.DEBUG, logfile=None, format="", colorize=False)
    assert receivers  # Celery adds no handler of its own when a receiver answers
    assert calls == [(worker.celery_app.settings, logging.DEBUG)]


def test_the_heartbeat_threads_lines_carry_the_job_id(monkeypatch, caplog):
    """The heartbeat runs in its own thread: it gets a copy of the chunk's context, job id included."""

    def broken():
        raise RuntimeError("database away")

    monkeypatch.setattr(runner, "session_scope", broken)
    with caplog.at_level(logging.ERROR, logger=runner.log.name), logs.job_context("job-7"):
        beat = runner._Heartbeat("job-7", "token", every=0.01)
    with beat:
        for _ in range(200):
            if any("heartbeat for job job-7 failed" in r.getMessage() for r in caplog.records):
                break
            import time

            time.sleep(0.01)
    failed = [r for r in caplog.records if "heartbeat for job job-7 failed" in r.getMessage()]
    assert failed and all(getattr(r, "job_id", None) == "job-7" for r in failed)
