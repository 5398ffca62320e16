"""Log lines of every gradtune process, one format for ours, uvicorn's and Celery's (standard library
logging only).

``GRADTUNE_LOG_FORMAT=json``: one JSON object per line (time in ISO-8601 UTC, level, logger, message,
and request_id, job_id, worker_id when known, exc_info as a string); ``console``: the same fields as
text. ``configure_logging(settings)`` is called once per process: by ``gradtune serve`` before uvicorn
starts (uvicorn then adds no handler of its own), by a worker when Celery sets up logging
(worker/celery_app.py), and by ``create_app`` when GRADTUNE_LOG_FORMAT is set (``uvicorn --factory
service.main:create_app``: it takes over uvicorn's loggers, which uvicorn configured first).

The ids come from context: the request id from service/api/request_id.py (a sane incoming X-Request-ID,
else a fresh one, returned in the response header), the job id from ``job_context`` (worker/runner.py's
run_chunk), the worker id from service/workers.py once the process registered. A record factory
stamps them on every record where it is made, so any handler (and pytest's caplog) sees them.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import IO, Any

REQUEST_ID: ContextVar[str | None] = ContextVar("gradtune_request_id", default=None)
JOB_ID: ContextVar[str | None] = ContextVar("gradtune_job_id", default=None)
_worker_id: str | None = None  # the whole process's, every thread's: a module global, not a context
FIELDS = ("request_id", "job_id", "worker_id")
# uvicorn's own loggers: configure_logging removes their handlers and lets them reach the root's.
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


# ---------------------------------------------------------------- context


def set_worker_id(worker_id: str | None) -> None:
    global _worker_id
    install_context()
    _worker_id = worker_id


@contextmanager
def job_context(job_id: str) -> Iterator[None]:
    """Log lines made inside carry ``job_id``."""
    install_context()
    token = JOB_ID.set(job_id)
    try:
        yield
    finally:
        JOB_ID.reset(token)


def current_ids() -> dict[str, str]:
    ids = {"request_id": REQUEST_ID.get(), "job_id": JOB_ID.get(), "worker_id": _worker_id}
    return {k: v for k, v in ids.items() if v}


_installed = False


def install_context() -> None:
    """Wrap the log record factory once per process so every record carries the ids in force."""
    global _installed
    if _installed:
        return
    _installed = True
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        for key, value in current_ids().items():
            if getattr(record, key, None) is None:
                setattr(record, key, value)
        return record

    logging.setLogRecordFactory(factory)


# ---------------------------------------------------------------- formatters


def _time(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the ids known, exc_info."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": _time(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in FIELDS:
            value = getattr(record, key, None)
            if value:
                out[key] = value
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc_info"] = record.exc_text
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class ConsoleFormatter(logging.Formatter):
    """``2026-01-02T03:04:05.678Z INFO    logger: message [request_id=... job_id=...]``."""

    def format(self, record: logging.LogRecord) -> str:
        ids = " ".join(f"{key}={getattr(record, key)}" for key in FIELDS if getattr(record, key, None))
        line = f"{_time(record)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if ids:
            line += f" [{ids}]"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


def make_formatter(log_format: str | None) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else ConsoleFormatter()


class _GradtuneHandler(logging.StreamHandler):
    """The root handler configure_logging installs (and replaces when called again)."""


def configure_logging(settings: Any, *, level: int | str | None = None, stream: IO[str] | None = None) -> None:
    """Route the root logger, uvicorn's and Celery's loggers through one handler on ``stream``
    (default: standard error) in ``settings.log_format`` (unset: console), at ``level`` (default
    ``settings.log_level``). Other handlers on the root (a test's) are left alone."""
    install_context()
    handler = _GradtuneHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(make_formatter(getattr(settings, "log_format", None)))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _GradtuneHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level if level is not None else getattr(settings, "log_level", "INFO"))
    logging.captureWarnings(True)  # warnings (Celery's as root, ...) as log lines of "py.warnings"
    for name in UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
