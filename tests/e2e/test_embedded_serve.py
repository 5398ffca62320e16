"""The one-command start: `gradtune serve` with SQLite and the server-less broker, over HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.e2e.conftest import ROOT, small_job, wait_for
from tests.helpers.net import free_port


def test_gradtune_serve_runs_a_job_with_no_server(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADTUNE_")}
    env.update(GRADTUNE_DATA_DIR=str(tmp_path / "data"), GRADTUNE_CHUNK_ITERATIONS="2", PYTHONPATH=str(ROOT))
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gradtune.cli", "serve", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
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
        job = wait_for(
            lambda: (j := httpx.get(url).json())["status"] in ("succeeded", "failed") and j, 120, "the job to finish"
        )
        assert job["status"] == "succeeded", Path(log.name).read_text()
        s = httpx.get(url + "/settings").json()
        assert s["optimizer"] == "SGD" and s["lr"] > 0
        assert (tmp_path / "data" / "gradtune.db").exists()
        # Everything lives under the data dir; nothing is dropped into the working directory.
        assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == ["data"]
        _cli_against_live_server(tmp_path, base, env, url.rsplit("/", 1)[1])
        _client_tune_against_live_server(tmp_path, base, env)
        _example_runs_as_is(base, env)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _gradtune(env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gradtune.cli", *args], env=env, capture_output=True, text=True, timeout=180
    )


def _cli_against_live_server(tmp_path: Path, base: str, env: dict, done_id: str) -> None:
    """The client commands, with their exit codes and output, against the running server."""
    env = {**env, "GRADTUNE_URL": base}
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(small_job(iterations=2, tasks=1)))
    r = _gradtune(env, "submit", str(job_file), "--wait")
    assert r.returncode == 0, r.stderr
    new_id = r.stdout.splitlines()[0].strip()
    assert "succeeded" in r.stdout and "2/2" in r.stdout

    r = _gradtune(env, "status", new_id)
    assert r.returncode == 0 and r.stdout.startswith(f"{new_id}  succeeded")

    r = _gradtune(env, "jobs", "--status", "succeeded")
    assert r.returncode == 0 and {new_id, done_id} <= {line.split()[0] for line in r.stdout.splitlines()}

    r = _gradtune(env, "settings", new_id)
    assert r.returncode == 0
    body = json.loads(r.stdout)
    assert body == httpx.get(f"{base}/v1/jobs/{new_id}/settings").json()

    r = _gradtune(env, "settings", new_id, "--format", "python")
    assert r.returncode == 0
    code = r.stdout
    assert f"lr={body['lr']!r}" in code and f"momentum={body['momentum']!r}" in code
    ns: dict = {}
    import torch

    exec(code, ns | {"model": torch.nn.Linear(2, 1)})  # the printed code runs as is

    r = _gradtune(env, "cancel", new_id)  # already finished: the server's 409 becomes exit 1
    assert r.returncode == 1 and "409" in r.stderr and "succeeded" in r.stderr

    r = _gradtune(env, "status", "no-such-job")
    assert r.returncode == 1 and "404" in r.stderr and "not found" in r.stderr

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x", "tasks": []}))
    r = _gradtune(env, "submit", str(bad))
    assert r.returncode == 1 and "tasks" in r.stderr


def _client_tune_against_live_server(tmp_path: Path, base: str, env: dict) -> None:
    """Client.tune from a training script, and `gradtune datasets upload`, on the live server."""
    import numpy as np
    import torch
    from sklearn.datasets import load_iris

    from gradtune import Client, GradtuneError

    x, y = load_iris(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(x))
    xt, yt = torch.tensor(x[perm[:100]], dtype=torch.float32), torch.tensor(y[perm[:100]])
    xv, yv = torch.tensor(x[perm[100:]], dtype=torch.float32), torch.tensor(y[perm[100:]])
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    with Client(base) as client:
        s = client.tune(
            model,
            (xt, yt),
            (xv, yv),
            loss="cross_entropy",
            steps=30,
            batch_size=16,
            iterations=2,
            progress=False,
            timeout=120,
        )
        opt = s.sgd(model.parameters())
        assert isinstance(opt, torch.optim.SGD)
        assert opt.param_groups[0]["lr"] == s.lr and opt.param_groups[0]["momentum"] == s.momentum
        ev = s.evaluation
        assert ev["mean_learned_val_loss"] <= ev["mean_initial_val_loss"]
        # Server errors surface as exceptions carrying the server's message.
        try:
            client.settings("nope")
        except GradtuneError as exc:
            assert exc.status_code == 404 and "not found" in str(exc)
        else:
            raise AssertionError("no error for an unknown job")

        # A model that is not a Sequential goes through torch.export and /v1/models, with per-layer
        # and scheduled settings that build param groups by the model's own parameter names.
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.hidden = torch.nn.Linear(4, 8)
                self.out = torch.nn.Linear(8, 3)

            def forward(self, x):
                return self.out(torch.tanh(self.hidden(x)))

        net = Net()
        rich = client.tune(
            net,
            (xt, yt),
            (xv, yv),
            loss="cross_entropy",
            steps=30,
            batch_size=16,
            iterations=4,
            per_layer=True,
            schedule_segments=2,
            progress=False,
            timeout=120,
        )
        assert [g["params"] for g in rich.param_groups] == [
            ["hidden.weight", "hidden.bias"],
            ["out.weight", "out.bias"],
        ]
        opt = rich.sgd(net)
        rich.apply_schedule(opt, 29)  # the last step is in the second segment
        assert [g["lr"] for g in opt.param_groups] == [g["lr"][1] for g in rich.param_groups]
        assert rich.evaluation["mean_learned_groups_val_loss"] is not None
        assert client.models()["total"] == 1
        bad = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 5))
        try:
            client.tune(bad, (xt, yt), (xv, yv), loss="cross_entropy", steps=30, batch_size=16)
        except ValueError as exc:
            assert "5 outputs" in str(exc)
        else:
            raise AssertionError("a model with the wrong output width was accepted")

    csv = tmp_path / "small.csv"
    csv.write_text("a,b,label\n" + "\n".join(f"{i},{i * 2},{i % 2}" for i in range(10)) + "\n")
    r = _gradtune({**env, "GRADTUNE_URL": base}, "datasets", "upload", str(csv))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines[0].strip()) >= 8 and any(line.split()[0] == "label" for line in lines[1:])
    r = _gradtune({**env, "GRADTUNE_URL": base}, "datasets", "list")
    assert r.returncode == 0 and lines[0].strip() in r.stdout and "small.csv" in r.stdout
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("a,b\n1,2\n3\n")
    r = _gradtune({**env, "GRADTUNE_URL": base}, "datasets", "upload", str(bad_csv))
    assert r.returncode == 1 and "422" in r.stderr and "bad.csv" in r.stderr


def _example_runs_as_is(base: str, env: dict) -> None:
    """examples/digits_cnn.py, unchanged, against the live server: the learned settings win."""
    import re

    r = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "digits_cnn.py")],
        cwd=ROOT,
        env={**env, "GRADTUNE_URL": base},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    losses = dict(re.findall(r"validation loss with the (starting|learned) settings.*: ([0-9.]+)$", r.stdout, re.M))
    assert set(losses) == {"starting", "learned"}, r.stdout
    assert float(losses["learned"]) < float(losses["starting"]), r.stdout
