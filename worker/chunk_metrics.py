"""The chunk duration histogram ``gradtune_chunk_seconds{outcome}``, for the API's GET /metrics.

A worker process writes it with prometheus_client's multiprocess mode: PROMETHEUS_MULTIPROC_DIR must
be set before prometheus_client is first imported, so worker/celery_app.py calls ``prepare`` at
import time. The folder is ``<GRADTUNE_METRICS_DIR>/<host>``: processes on one host write one file
each (by pid), and hosts (containers, where every worker may be pid 1) never share a file. The API
sums every file under GRADTUNE_METRICS_DIR (service/metrics.py), dead processes' included: the
histogram counts since the directory was last emptied.

Recording never raises: a chunk is not stopped by its metrics.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
from pathlib import Path
from typing import Any

from service.settings import Settings, get_settings

log = logging.getLogger("gradtune.worker.metrics")

ENV = "PROMETHEUS_MULTIPROC_DIR"
# What run_chunk returns for a chunk that ran ("skipped": none did, nothing is recorded).
OUTCOMES = ("committed", "succeeded", "cancelled", "failed", "lost")
# Chunks last up to their share (GRADTUNE_CHUNK_SECONDS, 300 s by default) plus one iteration.
BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0)

_histogram: Any = None


def host_dir(settings: Settings) -> Path:
    """This host's folder under the metrics directory."""
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:64] or "host"
    return settings.resolved_metrics_dir() / host


def _too_late() -> bool:
    """prometheus_client was imported in this process without multiprocess mode: setting the
    variable now would change nothing here, only leak into child processes."""
    values = sys.modules.get("prometheus_client.values")
    return values is not None and not getattr(values.ValueClass, "_multiprocess", False)


def prepare(settings: Settings | None = None) -> Path | None:
    """Create this host's folder and point PROMETHEUS_MULTIPROC_DIR at it. None (logged) when the
    folder cannot be made, or when prometheus_client was imported already (the histogram then stays
    in this process): the worker runs on without exported chunk metrics."""
    if _too_late():
        log.warning("chunk metrics stay in this process: prometheus_client was imported before %s was set", ENV)
        return None
    folder = host_dir(settings or get_settings())
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.warning("no chunk metrics: cannot create %s (%s)", folder, exc)
        return None
    os.environ[ENV] = str(folder)
    return folder


def chunk_histogram() -> Any:
    """The process's histogram, made on first use (its values in this host's folder when
    ``prepare`` could point prometheus_client there, else in this process only)."""
    global _histogram
    if _histogram is None:
        if ENV not in os.environ:
            prepare()
        from prometheus_client import Histogram

        _histogram = Histogram(
            "gradtune_chunk_seconds",
            "Wall time of a chunk in a worker, from its claim to its commit or end, by outcome.",
            ["outcome"],
            buckets=BUCKETS,
            registry=None,
        )
    return _histogram


def observe_chunk(outcome: str, seconds: float) -> None:
    if outcome not in OUTCOMES:
        return
    try:
        chunk_histogram().labels(outcome=outcome).observe(max(0.0, seconds))
    except Exception as exc:
        log.warning("chunk metrics: not recorded (%s: %s)", type(exc).__name__, exc)
