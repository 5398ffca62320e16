"""Queues by device on real processes (PostgreSQL, Redis, a Celery worker): a CPU worker runs ``cpu``
and ``auto`` jobs from its device's queue and the shared one and leaves a ``cuda`` job queued, which
says it waits for a GPU worker; a worker started with GRADTUNE_DEVICE=cuda on this machine (no CUDA)
exits 1 with the reason before taking anything."""

from __future__ import annotations

import subprocess

import redis
import torch

from gradtune.cli import worker_argv
from gradtune.spec import job_queue
from tests.e2e.conftest import ROOT, logs, small_job, wait_for, worker_env
from tests.e2e.test_celery_worker import _client, _status


def test_a_cpu_worker_runs_cpu_and_auto_jobs_and_leaves_the_cuda_one_waiting(tmp_path, pg_url, redis_url, spawn_worker):
    env = worker_env(tmp_path, pg_url, redis_url, GRADTUNE_DEVICE="cpu")
    base = env["GRADTUNE_QUEUE_NAME"]
    w = spawn_worker(env)
    with _client(env) as client:
        ids = {}
        for device in ("cuda", "cpu", "auto"):
            r = client.post("/v1/jobs", json={**small_job(iterations=3, tasks=1), "device": device})
            assert r.status_code == 202, r.text
            ids[device] = r.json()["id"]
        try:
            for device in ("cpu", "auto"):
                job = wait_for(
                    lambda d=device: (j := _status(client, ids[d]))["status"] in ("succeeded", "failed") and j,
                    120,
                    f"the {device} job to finish",
                )
                assert job["status"] == "succeeded" and job["device"] == device, job
        except AssertionError as exc:
            raise AssertionError(logs([w])) from exc
        (row,) = client.get("/v1/workers").json()["items"]
        assert (row["device"], row["queues"], row["live"]) == ("cpu", sorted([base, f"{base}.cpu"]), True)
        cuda = _status(client, ids["cuda"])
        assert (cuda["status"], cuda["device"]) == ("queued", "cuda")
        expected = f"waiting for a GPU worker: no live worker takes cuda jobs (queue {base}.cuda)"
        assert cuda["waiting"].startswith(expected)
    r = redis.Redis.from_url(redis_url)
    try:
        assert r.llen(job_queue(base, "cuda")) == 1  # its message waits in the broker for a GPU worker
    finally:
        r.close()


def test_a_worker_asked_for_cuda_on_a_machine_without_it_exits_with_the_reason(tmp_path, pg_url, redis_url):
    if torch.cuda.is_available():  # pragma: no cover - a GPU machine starts it
        return
    env = worker_env(tmp_path, pg_url, redis_url, GRADTUNE_DEVICE="cuda")
    done = subprocess.run(
        worker_argv(env["GRADTUNE_QUEUE_NAME"]), env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "cannot start: device cuda: CUDA is not available on this machine" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
