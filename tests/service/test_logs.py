"""Log lines (service/logs.py): the JSON and console formats, X-Request-ID (kept when sane, replaced
when not, returned, carried by the request's log records), configure_logging taking over uvicorn's
loggers, and the worker id of a registered worker process."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
from datetime import UTC, datetime

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service import logs, repository, workers
from service.main import create_app
from service.settings import Settings
from tests.helpers.support import keyed_client, make_settings

HEX32 = re.compile(r"[0-9a-f]{32}")


def record(msg: str = "hello %s", args: tuple = ("world",), exc_info=None, **extra) -> logging.LogRecord:
    rec = logging.LogRecord("gradtune.test", logging.WARNING, __file__, 1, msg, args, exc_info)
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def test_json_lines_have_the_fields():
    try:
        raise ValueError("boom")
    except ValueError:
        exc = sys.exc_info()
    line = logs.JsonFormatter().format(record(exc_info=exc, request_id="r1", job_id="j1", worker_id="w1"))
    assert "\n" not in line  # one object per line, the traceback included
    out = json.loads(line)
    assert set(out) == {"time", "level", "logger", "message", "request_id", "job_id", "worker_id", "exc_info"}
    assert (out["level"], out["logger"], out["message"]) == ("WARNING", "gradtune.test", "hello world")
    assert (out["request_id"], out["job_id"], out["worker_id"]) == ("r1", "j1", "w1")
    assert out["exc_info"].startswith("Traceback") and "ValueError: boom" in out["exc_info"]
    when = datetime.fromisoformat(out["time"])
    assert out["time"].endswith("Z") and when.utcoffset().total_seconds() == 0
    assert abs((datetime.now(UTC) - when).total_seconds()) < 60


def test_unknown_ids_are_left_out_and_odd_messages_stay_json():
    out = json.loads(logs.JsonFormatter().format(record('quote " newline \n nul \x00 é %r', (object(),))))
    assert set(out) == {"time", "level", "logger", "message"}
    assert out["message"].startswith('quote " newline \n nul \x00 é <object')


def test_console_lines_name_the_ids():
    line = logs.ConsoleFormatter().format(record(job_id="j1", worker_id="w1"))
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z WARNING gradtune\.test: hello world \[job_id=j1 worker_id=w1\]", line
    ), line


def test_the_context_reaches_every_record(caplog):
    logs.install_context()
    log = logging.getLogger("gradtune.test")
    with caplog.at_level(logging.INFO, logger="gradtune.test"):
        with logs.job_context("job-7"):
            log.info("inside")
        log.info("outside")
    inside, outside = caplog.records[-2:]
    assert inside.job_id == "job-7" and getattr(outside, "job_id", None) is None


def test_a_registered_worker_process_logs_its_id(monkeypatch, caplog):
    monkeypatch.setattr(workers.WorkerBeat, "start", lambda self: self)
    monkeypatch.setattr(workers.WorkerBeat, "stop", lambda self: None)
    beat = workers.start_registration(device="cpu", queues=["q"], every=60)
    try:
        with caplog.at_level(logging.INFO, logger="gradtune.test"):
            logging.getLogger("gradtune.test").info("registered")
        assert caplog.records[-1].worker_id == beat.worker_id
        assert json.loads(logs.JsonFormatter().format(caplog.records[-1]))["worker_id"] == beat.worker_id
    finally:
        workers.stop_registration()
    assert "worker_id" not in logs.current_ids()


@pytest.fixture
def app(tmp_path, sqlite_url):
    app = create_app(make_settings(tmp_path, database_url=sqlite_url))

    @app.get("/logs-a-line", include_in_schema=False)
    def logs_a_line() -> dict:
        logging.getLogger("gradtune.test").warning("inside the request")
        return {}

    return app


@pytest.mark.parametrize("sent", ["abc-123", "0f8e4c2a-9b1d-4e5f-8a7b-6c5d4e3f2a1b", "a:b.c_d/e+f="])
def test_a_sane_request_id_is_kept_and_returned(app, sent, caplog):
    with TestClient(app) as c, caplog.at_level(logging.WARNING, logger="gradtune.test"):
        r = c.get("/logs-a-line", headers={"X-Request-ID": sent})
    assert r.status_code == 200 and r.headers["x-request-id"] == sent
    [line] = [rec for rec in caplog.records if rec.getMessage() == "inside the request"]
    assert line.request_id == sent


@pytest.mark.parametrize("sent", ["", "two words", "x" * 129, '"quoted"', "semi;colon", "é-accent", "a\tb"])
def test_an_odd_request_id_is_replaced(app, sent, caplog):
    with TestClient(app) as c, caplog.at_level(logging.WARNING, logger="gradtune.test"):
        r = c.get("/logs-a-line", headers={"X-Request-ID": sent.encode("utf-8")})
    given = r.headers["x-request-id"]
    assert r.status_code == 200 and HEX32.fullmatch(given) and given != sent
    assert [rec.request_id for rec in caplog.records if rec.getMessage() == "inside the request"] == [given]


def test_each_request_gets_its_own_id(app, caplog):
    with TestClient(app) as c, caplog.at_level(logging.WARNING, logger="gradtune.test"):
        ids = [c.get("/logs-a-line").headers["x-request-id"] for _ in range(3)]
        c.get("/healthz", headers={"X-Request-ID": "probe-1"})
        assert c.get("/healthz").headers["x-request-id"] != "probe-1"  # nothing carried over
    assert len(set(ids)) == 3 and all(HEX32.fullmatch(i) for i in ids)
    assert [rec.request_id for rec in caplog.records if rec.getMessage() == "inside the request"] == ids


def test_the_500_reference_is_the_request_id(app, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(repository, "list_jobs", broken)
    with keyed_client(app, raise_server_exceptions=False) as c:
        r = c.get("/v1/jobs", headers={"X-Request-ID": "trace-500"})
    assert r.status_code == 500
    assert r.json()["detail"].endswith("logged under reference trace-500")
    [line] = [rec for rec in caplog.records if "unhandled error" in rec.getMessage()]
    assert "trace-500" in line.getMessage() and line.request_id == "trace-500" and line.exc_info


@pytest.fixture
def clean_logging():
    """configure_logging changes process-wide state: put the root and uvicorn's loggers back."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    named = {n: (list(logging.getLogger(n).handlers), logging.getLogger(n).propagate) for n in logs.UVICORN_LOGGERS}
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    for name, (handlers, propagate) in named.items():
        logging.getLogger(name).handlers[:] = handlers
        logging.getLogger(name).propagate = propagate
    logging.captureWarnings(False)


def test_configure_logging_takes_over_uvicorn_and_keeps_other_handlers(clean_logging, caplog):
    access = logging.getLogger("uvicorn.access")
    access.addHandler(logging.StreamHandler(io.StringIO()))  # as uvicorn's own config leaves it
    access.propagate = False
    out = io.StringIO()
    logs.configure_logging(Settings(log_format="json", log_level="DEBUG"), stream=out)
    logs.configure_logging(Settings(log_format="json", log_level="DEBUG"), stream=out)  # again: one handler
    assert access.handlers == [] and access.propagate
    assert caplog.handler in logging.getLogger().handlers  # a test's handler stays
    access.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:1", "GET", "/healthz", "1.1", 200)
    logging.getLogger("uvicorn.error").debug("Started server process [1]")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(line["logger"], line["level"]) for line in lines] == [
        ("uvicorn.access", "INFO"),
        ("uvicorn.error", "DEBUG"),
    ]
    assert lines[0]["message"] == '127.0.0.1:1 - "GET /healthz HTTP/1.1" 200'


def test_create_app_configures_logging_only_when_a_format_is_set(clean_logging, tmp_path, sqlite_url):
    def ours() -> list:
        return [h for h in logging.getLogger().handlers if isinstance(h, logs._GradtuneHandler)]

    create_app(make_settings(tmp_path, database_url=sqlite_url))
    assert ours() == []
    create_app(make_settings(tmp_path, database_url=sqlite_url, log_format="json"))
    assert len(ours()) == 1 and isinstance(ours()[0].formatter, logs.JsonFormatter)


def test_log_settings_are_checked(monkeypatch):
    monkeypatch.setenv("GRADTUNE_LOG_FORMAT", "JSON")
    monkeypatch.setenv("GRADTUNE_LOG_LEVEL", "debug")
    s = Settings()
    assert (s.log_format, s.log_level) == ("json", "DEBUG")
    monkeypatch.setenv("GRADTUNE_LOG_FORMAT", "xml")
    with pytest.raises(ValidationError, match="log_format"):
        Settings()
