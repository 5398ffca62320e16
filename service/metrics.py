"""Prometheus metrics for ``GET /metrics`` (service/api/routes/metrics.py).

Three sources, one registry per app (``metrics_of(app.state)``, so two apps in one process keep
apart):

* the database, read at each scrape (``DatabaseCollector``): jobs by status, the queue depth, live
  workers (service/workers.py's verdict), and the meta-iterations and evaluations committed so far
  as counters (Prometheus takes their rates);
* the files worker processes write (worker/chunk_metrics.py, prometheus_client's multiprocess
  mode) under ``Settings.resolved_metrics_dir()``, one folder per host: the chunk duration
  histogram (``FilesCollector``; nothing when the directory does not exist);
* this process: the HTTP latency histogram by method, route template and status code, recorded by
  ``HttpMetricsMiddleware``. When the API runs as several processes with PROMETHEUS_MULTIPROC_DIR
  set (a folder inside the metrics directory), its values go to files too and are read from there.

A source that fails is logged and left out of the answer (the database's: ``gradtune_database_up``
0); a scrape never answers 5xx for it.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import fastapi.routing
from prometheus_client import CollectorRegistry, Histogram, values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gradtune.spec import ACTIVE_STATUSES, STATUSES
from service import workers
from service.db.models import Job, JobIteration, Worker

log = logging.getLogger("service.metrics")

HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# The route label of a request that matched no route (never its raw path: one series per URL).
UNMATCHED = "unmatched"
# The method label: these, else "other" (a client's invented method makes no new series).
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class DatabaseCollector(Collector):
    """Values read from the database at scrape time, with the app's read sessions."""

    def __init__(self, state: Any) -> None:
        self.state = state

    def _read(self) -> dict[str, Any]:
        from service.api.deps import read_sessionmaker_of

        stale = self.state.settings.worker_stale_seconds
        with read_sessionmaker_of(self.state)() as session:
            by_status = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            # Jobs no worker holds now: queued, or running between two chunks (the next chunk's message waits).
            waiting = session.scalar(
                select(func.count()).select_from(Job).where(Job.status.in_(ACTIVE_STATUSES), Job.lease_owner.is_(None))
            )
            iterations, evaluations = session.execute(
                select(func.count(), func.sum(JobIteration.extra["evaluations"].as_integer()))
            ).one()
            cutoff = workers.live_cutoff(session, stale)
            live = session.scalar(select(func.count()).select_from(Worker).where(Worker.last_seen >= cutoff))
        return {
            "by_status": by_status,
            "waiting": waiting or 0,
            "iterations": iterations or 0,
            "evaluations": evaluations or 0,
            "live": live or 0,
        }

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily("gradtune_database_up", "1 when this scrape could read the database, else 0.")
        try:
            got = self._read()
        except Exception as exc:
            log.warning("metrics: cannot read the database (%s)", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        jobs = GaugeMetricFamily("gradtune_jobs", "Jobs in the database by status.", labels=["status"])
        for status in STATUSES:
            jobs.add_metric([status], got["by_status"].get(status, 0))
        yield jobs
        yield GaugeMetricFamily(
            "gradtune_queue_depth",
            "Active jobs that no worker holds now: queued, or running between two chunks.",
            value=got["waiting"],
        )
        yield GaugeMetricFamily(
            "gradtune_workers_live",
            "Registered worker processes seen within GRADTUNE_WORKER_STALE_SECONDS (database clock).",
            value=got["live"],
        )
        yield CounterMetricFamily(
            "gradtune_meta_iterations",
            "Meta-iterations committed (rows of every job's history).",
            value=got["iterations"],
        )
        yield CounterMetricFamily(
            "gradtune_evaluations",
            "Forward evaluations of candidate settings (validation loss through an unrolled training) "
            "in the committed meta-iterations, as the engine records them per iteration.",
            value=got["evaluations"],
        )


def metric_files(directory: Path) -> list[str]:
    """The multiprocess files under ``directory``: its own and one folder down (one per host)."""
    if not directory.is_dir():
        return []
    return sorted(str(p) for pattern in ("*.db", "*/*.db") for p in directory.glob(pattern) if p.is_file())


class FilesCollector(Collector):
    """The worker processes' histograms (and the API's, in multiprocess mode), summed over files."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def collect(self) -> Iterable[Metric]:
        try:
            files = metric_files(self.directory)
            merged = list(MultiProcessCollector.merge(files, accumulate=True)) if files else []
        except Exception as exc:  # a file being written, truncated or not ours: leave the files out
            log.warning("metrics: cannot read %s (%s: %s)", self.directory, type(exc).__name__, exc)
            return
        yield from merged


class Metrics:
    """One app's registry and its HTTP histogram."""

    def __init__(self, state: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(DatabaseCollector(state))
        self.registry.register(FilesCollector(state.settings.resolved_metrics_dir()))
        # In multiprocess mode (PROMETHEUS_MULTIPROC_DIR set before prometheus_client was imported) the
        # values live in files, which FilesCollector reads: registered here too they would count twice.
        in_files = bool(getattr(values.ValueClass, "_multiprocess", False))
        self.http = Histogram(
            "gradtune_http_request_seconds",
            "HTTP requests by method, route template and status code: seconds until the response started.",
            ["method", "route", "status"],
            buckets=HTTP_BUCKETS,
            registry=None if in_files else self.registry,
        )


_lock = threading.Lock()


def metrics_of(state: Any) -> Metrics:
    """The app's ``Metrics``, made on first use."""
    found = getattr(state, "metrics", None)
    if found is None:
        with _lock:
            found = getattr(state, "metrics", None)
            if found is None:
                found = state.metrics = Metrics(state)
    return found


def _templates(app: Any) -> list[tuple[re.Pattern[str], str]]:
    """The app's route templates with their patterns, made once per app (FastAPI nests included
    routers in its newer releases: ``iter_route_contexts`` flattens them where it exists)."""
    found = getattr(app.state, "route_templates", None)
    if found is None:
        flatten = getattr(fastapi.routing, "iter_route_contexts", None)
        routes = list(flatten(app.routes)) if flatten is not None else list(app.routes)
        found = []
        for route in routes:
            template = getattr(route, "path_format", None) or getattr(route, "path", None)
            if isinstance(template, str) and template:
                found.append((compile_path(template)[0], template))
        app.state.route_templates = found
    return found


def route_template(scope: Scope) -> str:
    """The path template of the route that answered (``/v1/jobs/{job_id}``), or of the route the
    request would have reached when a middleware answered first (413); ``unmatched`` for none."""
    route = scope.get("route")
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    if isinstance(template, str) and template:
        return template
    path = scope.get("path", "")
    for pattern, template in _templates(scope["app"]):
        if pattern.match(path):
            return template
    return UNMATCHED


class HttpMetricsMiddleware:
    """Pure ASGI: times each HTTP request to the end of its response, by method, route and status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        recorded = False

        def record(status: int) -> None:
            # Until the response starts (its status line): the same as until it ends for a JSON
            # answer, and an events stream (open for as long as a job runs) counts its first byte.
            nonlocal recorded
            recorded = True
            try:
                metrics = metrics_of(scope["app"].state)
                method = scope.get("method", "")
                method = method if method in METHODS else "other"
                metrics.http.labels(method, route_template(scope), str(status)).observe(time.perf_counter() - started)
            except Exception:  # a metric never fails a request
                log.exception("metrics: could not record a request")

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start" and not recorded:
                record(int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            if not recorded:  # an exception before the response started: the error handler answers 500
                record(500)
