"""The one-command start: `gradtune serve` with SQLite and the server-less broker, over HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.e2e.conftest import ROOT, small_job, wait_for
from tests.helpers.net import free_port


def _serve(tmp_path: Path, *args: str, name: str = "serve", **extra_env: str) -> tuple[subprocess.Popen, str, dict]:
    """``gradtune serve`` on a free port in tmp_path (its own session, output in ``<name>.log``)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADTUNE_")}
    env.update(GRADTUNE_DATA_DIR=str(tmp_path / "data"), GRADTUNE_CHUNK_ITERATIONS="2", PYTHONPATH=str(ROOT))
    env.update(extra_env)
    log = open(tmp_path / f"{name}.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gradtune.cli", "serve", "--port", str(port), *args],
        env=env,
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    proc.log_path = log.name  # type: ignore[attr-defined]
    return proc, f"http://127.0.0.1:{port}", env


def _admin(tmp_path: Path) -> dict[str, str]:
    """The Authorization header of the admin key serve wrote on its first start (mode 0600)."""
    path = tmp_path / "data" / "admin.key"
    assert path.stat().st_mode & 0o777 == 0o600
    return {"Authorization": f"Bearer {path.read_text().strip()}"}


def _up(base: str, path: str = "/healthz") -> bool:
    try:
        return httpx.get(f"{base}{path}", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_gradtune_serve_runs_a_job_with_no_server(tmp_path):
    proc, base, env = _serve(tmp_path)
    try:
        wait_for(lambda: _up(base), 60, "gradtune serve to answer")
        # ready once its embedded worker has registered
        wait_for(lambda: _up(base, "/readyz"), 60, "gradtune serve to be ready (a live worker)")
        auth = _admin(tmp_path)
        log = Path(proc.log_path).read_text()
        assert "created tenant default and its admin key" in log and auth["Authorization"][7:] in log
        assert httpx.post(f"{base}/v1/jobs", json=small_job()).status_code == 401  # no key
        r = httpx.post(f"{base}/v1/jobs", json=small_job(iterations=3, tasks=1), headers=auth)
        assert r.status_code == 202, r.text
        url = base + r.headers["location"]
        job = wait_for(
            lambda: (j := httpx.get(url, headers=auth).json())["status"] in ("succeeded", "failed") and j,
            120,
            "the job to finish",
        )
        assert job["status"] == "succeeded", Path(proc.log_path).read_text()
        s = httpx.get(url + "/settings", headers=auth).json()
        assert s["optimizer"] == "SGD" and s["lr"] > 0
        assert (tmp_path / "data" / "gradtune.db").exists()
        # Everything lives under the data dir; nothing is dropped into the working directory.
        assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == ["data"]
        _cli_against_live_server(tmp_path, base, env, url.rsplit("/", 1)[1])
        _client_tune_against_live_server(tmp_path, base, env)
        _example_runs_as_is(base, env)
    finally:
        _stop(proc)


def _gradtune(env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gradtune.cli", *args], env=env, capture_output=True, text=True, timeout=180
    )


def _cli_against_live_server(tmp_path: Path, base: str, env: dict, done_id: str) -> None:
    """The client commands, with their exit codes and output, against the running server."""
    env = {**env, "GRADTUNE_URL": base}
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(small_job(iterations=2, tasks=1)))
    r = _gradtune(env, "submit", str(job_file), "--wait", "--timeout", "150")
    assert r.returncode == 0, r.stderr
    new_id = r.stdout.splitlines()[0].strip()
    assert "succeeded" in r.stdout and "2/2" in r.stdout
    assert "no live worker" not in r.stderr  # serve's worker is live

    r = _gradtune(env, "submit", str(job_file), "--timeout", "5")
    assert r.returncode == 1 and "--timeout goes with --wait" in r.stderr

    r = _gradtune(env, "status", new_id)
    assert r.returncode == 0 and r.stdout.startswith(f"{new_id}  succeeded")

    r = _gradtune(env, "jobs", "--status", "succeeded")
    assert r.returncode == 0 and {new_id, done_id} <= {line.split()[0] for line in r.stdout.splitlines()}

    r = _gradtune(env, "settings", new_id)
    assert r.returncode == 0
    body = json.loads(r.stdout)
    assert body == httpx.get(f"{base}/v1/jobs/{new_id}/settings", headers=_admin(tmp_path)).json()

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
    key = _admin(tmp_path)["Authorization"].split()[1]
    with Client(base, api_key=key) as client:
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
            search="stencil",  # its values here beat the pair on the evaluation draws (no fallback)
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


def _children(pid: int) -> list[int]:
    """The live (not zombie) processes whose parent is ``pid``."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            state, ppid = (d / "stat").read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):
            continue
        if int(ppid) == pid and state not in ("Z", "X"):
            found.append(int(d.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) not in ("Z", "X")
    except OSError:
        return False


def _live_workers(base: str, auth: dict[str, str]) -> list[dict]:
    return [w for w in httpx.get(f"{base}/v1/workers", headers=auth).json()["items"] if w["live"]]


def test_serve_restarts_a_killed_worker_and_leaves_none_after_sigterm(tmp_path):
    """kill -9 of serve's worker: a new one (new pid) starts, registers and runs the next job; SIGTERM
    to serve alone (not its process group): no worker is left 10 s later."""
    proc, base, env = _serve(tmp_path, GRADTUNE_HEARTBEAT_SECONDS="0.5", GRADTUNE_WORKER_STALE_SECONDS="3")
    pids: list[int] = []
    try:
        wait_for(lambda: _up(base, "/readyz"), 90, "serve's worker to register")
        auth = _admin(tmp_path)
        (first,) = _live_workers(base, auth)
        pids.append(first["pid"])
        assert first["pid"] in _children(proc.pid)
        # the shared queue and its device's (an embedded worker is auto: CUDA where available)
        assert first["queues"] in (["gradtune", "gradtune.cpu"], ["gradtune", "gradtune.cuda"])
        assert os.getsid(first["pid"]) == first["pid"]  # its own session: a Ctrl-C reaches serve only

        killed = time.monotonic()
        os.kill(first["pid"], signal.SIGKILL)
        (new_pid,) = wait_for(lambda: [p for p in _children(proc.pid) if p != first["pid"]], 30, "a new worker")
        started = time.monotonic() - killed
        pids.append(new_pid)
        wait_for(lambda: [w["pid"] for w in _live_workers(base, auth)] == [new_pid], 60, "only the new worker live")
        registered = time.monotonic() - killed
        log = Path(proc.log_path).read_text()
        assert f"worker 1 (pid {first['pid']}) died after" in log, log[-3000:]
        assert "killed by SIGKILL; restarting in 0.5 s" in log
        assert _up(base, "/readyz")

        r = httpx.post(f"{base}/v1/jobs", json=small_job(iterations=4, tasks=2, steps=200), headers=auth)
        assert r.status_code == 202, r.text
        url = base + r.headers["location"]
        seen_running: set[str | None] = set()

        def finished():
            seen_running.update(w["current_job"] for w in _live_workers(base, auth))
            return (j := httpx.get(url, headers=auth).json())["status"] in ("succeeded", "failed", "cancelled") and j

        job = wait_for(finished, 180, "the job to finish", interval=0.05)
        assert job["status"] == "succeeded", Path(proc.log_path).read_text()[-3000:]
        assert job["id"] in seen_running  # /v1/workers showed the job while its chunks ran
        wait_for(lambda: _live_workers(base, auth)[0]["current_job"] is None, 10, "current_job cleared")

        stopping = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)  # serve alone, as systemd or docker stop would
        wait_for(lambda: proc.poll() is not None and not any(_alive(p) for p in pids), 10, "serve and its workers")
        gone = time.monotonic() - stopping
        assert proc.returncode == -signal.SIGTERM
        assert not _children(proc.pid)
        forced = "SIGKILL" in Path(proc.log_path).read_text().split("Shutting down", 1)[1]
        print(
            f"kill -9 of the worker: new process after {started:.2f} s, registered after {registered:.2f} s; "
            f"SIGTERM to serve: serve and 0 workers left after {gone:.2f} s "
            f"({'SIGKILL after 5 s' if forced else 'the worker exited on SIGTERM'})"
        )
    finally:
        _stop(proc)
        for p in pids:
            if _alive(p):
                os.kill(p, signal.SIGKILL)


def test_serve_exits_1_with_the_reason_when_its_worker_cannot_start(tmp_path):
    """A worker that dies right after each start (here: torch fails to import) makes serve give up:
    exit 1, naming the worker and how it died, and no process left."""
    fake = tmp_path / "fake" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("torch is broken on purpose (a test)")\n')
    proc, base, _env = _serve(tmp_path, PYTHONPATH=f"{fake.parent}{os.pathsep}{ROOT}")
    try:
        proc.wait(timeout=150)
        log = Path(proc.log_path).read_text()
        assert proc.returncode == 1, log[-3000:]
        assert "error: worker 1 cannot start: it died 5 times in a row within 20 s of starting" in log
        assert "exit code 1" in log and "torch is broken on purpose" in log
        delays = [line.rsplit("restarting in ", 1)[1] for line in log.splitlines() if "restarting in" in line]
        assert delays == ["0.5 s", "1 s", "2 s", "4 s"]
        assert not _children(proc.pid)
    finally:
        _stop(proc)
