"""The one-command start: `gradtune serve` with SQLite and the server-less broker, over HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx

from tests.e2e.conftest import ROOT, small_job, wait_for


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gradtune_serve_runs_a_job_with_no_server(tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADTUNE_")}
    env.update(GRADTUNE_DATA_DIR=str(tmp_path / "data"), GRADTUNE_CHUNK_ITERATIONS="2", PYTHONPATH=str(ROOT))
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "gradtune.cli", "serve", "--port", str(port)],
                            env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    def up():
        try:
            return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, 60, "gradtune serve to answer")
        assert httpx.get(f"{base}/readyz").status_code == 200
        r = httpx.post(f"{base}/v1/jobs", json=small_job(iterations=3, tasks=1))
        assert r.status_code == 202, r.text
        url = base + r.headers["location"]
        job = wait_for(lambda: (j := httpx.get(url).json())["status"] in ("succeeded", "failed") and j,
                       120, "the job to finish")
        assert job["status"] == "succeeded", Path(log.name).read_text()
        s = httpx.get(url + "/settings").json()
        assert s["optimizer"] == "SGD" and s["lr"] > 0
        assert (tmp_path / "data" / "gradtune.db").exists()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
