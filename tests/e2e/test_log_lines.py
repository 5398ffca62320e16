"""`gradtune serve` with GRADTUNE_LOG_FORMAT=json: uvicorn's own lines (startup, access, shutdown) and
serve's own come out as JSON objects, the access line with the request's X-Request-ID; the admin key
created on first start stays in its file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.e2e.conftest import ROOT, wait_for
from tests.helpers.net import free_port


def _up(base: str) -> bool:
    try:
        return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_serve_prints_uvicorns_lines_as_json(tmp_path: Path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADTUNE_")}
    env.update(GRADTUNE_DATA_DIR=str(tmp_path / "data"), GRADTUNE_LOG_FORMAT="json", PYTHONPATH=str(ROOT))
    out, err = open(tmp_path / "out.log", "wb"), open(tmp_path / "err.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gradtune.cli", "serve", "--workers", "0", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdout=out,
        stderr=err,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _up(base), 60, "gradtune serve to answer")
        r = httpx.get(f"{base}/healthz", headers={"X-Request-ID": "e2e-trace-1"})
        assert r.headers["x-request-id"] == "e2e-trace-1"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    text = (tmp_path / "err.log").read_text()
    lines = [json.loads(line) for line in text.splitlines()]  # every line of stderr is a JSON object
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    by = {(line["logger"], line["message"].split(" (")[0]) for line in lines}
    assert ("uvicorn.error", "Application startup complete.") in by
    assert ("uvicorn.error", f"Uvicorn running on {base}") in by
    assert ("uvicorn.error", "Shutting down") in by
    access = [line for line in lines if line["logger"] == "uvicorn.access" and "e2e-trace-1" == line.get("request_id")]
    assert len(access) == 1 and '"GET /healthz HTTP/1.1" 200' in access[0]["message"]
    # serve's own words are log lines too, and the admin key it created is in its file, not the log
    assert (tmp_path / "out.log").read_text() == ""
    said = [line["message"] for line in lines if line["logger"] == "gradtune.serve"]
    assert any(m.startswith("gradtune: database sqlite:") for m in said), said
    assert any("admin key, written to" in m and "not logged" in m for m in said), said
    key = (tmp_path / "data" / "admin.key").read_text().strip()
    assert key and key not in text
