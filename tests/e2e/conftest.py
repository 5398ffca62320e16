"""Real worker processes for end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from gradtune.cli import worker_argv
from tests.conftest import unavailable
from tests.helpers.servers import PostgresServer, RedisServer, missing_postgres, missing_redis

ROOT = Path(__file__).resolve().parents[2]


def worker_env(tmp_path: Path, database_url: str, broker_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADTUNE_")}
    env.update(
        GRADTUNE_DATA_DIR=str(tmp_path / "data"),
        GRADTUNE_DATABASE_URL=database_url,
        GRADTUNE_BROKER_URL=broker_url,
        GRADTUNE_QUEUE_NAME=f"gt-test-{uuid.uuid4().hex[:8]}",
        GRADTUNE_HEARTBEAT_SECONDS="0.5",
        GRADTUNE_STALE_AFTER_SECONDS="4",
        GRADTUNE_SWEEP_SECONDS="1",
        GRADTUNE_CHUNK_ITERATIONS="2",
        PYTHONPATH=str(ROOT),
    )
    env.update(extra)
    return env


@pytest.fixture
def spawn_worker(tmp_path):
    procs: list[subprocess.Popen] = []

    def spawn(env: dict[str, str], name: str = "worker") -> subprocess.Popen:
        log = open(tmp_path / f"{name}-{len(procs)}.log", "wb")
        p = subprocess.Popen(
            worker_argv(env["GRADTUNE_QUEUE_NAME"]),
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        p.log_path = log.name  # type: ignore[attr-defined]
        procs.append(p)
        return p

    yield spawn
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)


@pytest.fixture
def own_redis(tmp_path):
    """A Redis server of this test's own (not started: call ``.start()``), killed at the end. Tests
    stop and restart it; the machine's shared Redis is never touched."""
    reason = missing_redis()
    if reason:
        unavailable(reason)
    server = RedisServer(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def own_postgres():
    """A private PostgreSQL cluster, started, with a migrated database ``gradtune`` (``.app_url``);
    stopped and deleted at the end. Tests stop and restart it, never the machine's server."""
    reason = missing_postgres()
    if reason:
        unavailable(reason)
    from service.db.migrate import upgrade

    server = PostgresServer()
    try:
        server.start()
        server.app_url = server.create_database("gradtune")  # type: ignore[attr-defined]
        upgrade(server.app_url)  # type: ignore[attr-defined]
        yield server
    finally:
        server.close()


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def logs(procs) -> str:
    return "\n".join(Path(p.log_path).read_text(errors="replace")[-4000:] for p in procs)


def small_job(iterations: int = 4, tasks: int = 2, steps: int = 20) -> dict:
    return {
        "name": "iris-e2e",
        "tasks": [
            {
                "name": f"t{i}",
                "data": {"source": "builtin", "name": "iris", "val_fraction": 0.3, "seed": i},
                "model": {"kind": "mlp", "hidden": [8], "activation": "tanh"},
                "loss": "cross_entropy",
                "steps": steps,
                "batch_size": 16,
            }
            for i in range(tasks)
        ],
        "hyperparameters": {"lr": 0.01, "momentum": 0.9},
        "meta": {"iterations": iterations, "seed": 0},
    }
