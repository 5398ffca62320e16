"""The runner in-process (no Celery): failures, cancellation, stale messages, the settings body."""

from __future__ import annotations

import pytest

from service.db import session as db_session
from service.main import create_app
from service.settings import get_settings
from tests.e2e.conftest import small_job
from tests.helpers.support import keyed_client
from worker import runner


@pytest.fixture
def env(db_url, tmp_path, monkeypatch):
    """Worker settings from the environment (as a real worker reads them), messages captured."""
    monkeypatch.setenv("GRADTUNE_DATABASE_URL", db_url)
    monkeypatch.setenv("GRADTUNE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("GRADTUNE_CHUNK_ITERATIONS", "2")
    for f in (get_settings, db_session.get_engine, db_session.get_sessionmaker):
        f.cache_clear()
    sent: list[tuple[str, int]] = []
    monkeypatch.setattr(runner, "enqueue", lambda job_id, it, device=None: sent.append((job_id, it)))
    with keyed_client(create_app(get_settings())) as client:
        yield client, sent
    db_session.get_engine().dispose()
    for f in (get_settings, db_session.get_engine, db_session.get_sessionmaker):
        f.cache_clear()


def _drain(sent, limit=50):
    """Deliver queued messages to the runner until none is left, like a worker would."""
    outcomes = []
    while sent and len(outcomes) < limit:
        job_id, it = sent.pop(0)
        outcomes.append(runner.run_chunk(job_id, it, owner=f"t-{job_id}-{it}"))
    return outcomes


def test_chunks_chain_to_succeeded_and_duplicates_do_nothing(env):
    client, sent = env
    jid = client.post("/v1/jobs", json=small_job(iterations=5, tasks=2)).json()["id"]
    sent.append((jid, 0))
    outcomes = _drain(sent)
    assert outcomes == ["committed"] * 3 + ["succeeded"]
    # A redelivered first message, and one for the final step, change nothing.
    assert runner.run_chunk(jid, 0, owner="late") == "skipped"
    assert runner.run_chunk(jid, 5, owner="late2") == "skipped"
    job = client.get(f"/v1/jobs/{jid}").json()
    assert job["status"] == "succeeded" and job["progress"]["iteration"] == 5
    body = client.get(f"/v1/jobs/{jid}/settings").json()
    assert body["search"] == "stencil"  # the default search for a constant pair
    ev = body["evaluation"]
    # The evaluation is the engine's reference training: recompute one task independently.
    import torch

    from service.schemas import JobCreate
    from worker import engine

    tasks = runner.build_tasks(JobCreate.model_validate(small_job(iterations=5, tasks=2)), torch.device("cpu"))
    ref = engine.evaluate(tasks, body["lr"], body["momentum"], ev["draws"])
    assert ev["mean_learned_val_loss"] == pytest.approx(ref["mean_val_loss"], rel=1e-6)
    assert ev["tasks"][1]["learned_val_loss"] == pytest.approx(ref["tasks"][1]["val_loss"], rel=1e-6)
    # The randomness is recorded: each task's seed, and the draws trained on and evaluated on.
    assert [t["seed"] for t in ev["tasks"]] == [t.seed for t in tasks] and len(set(t.seed for t in tasks)) == 2
    assert set(ev["training_draws"]).isdisjoint(ev["draws"])
    hist = client.get(f"/v1/jobs/{jid}/history").json()["items"]
    assert [h["iteration"] for h in hist] == [1, 2, 3, 4, 5]
    # Once succeeded, progress shows the learned settings.
    assert (job["progress"]["lr"], job["progress"]["momentum"]) == (body["lr"], body["momentum"])


def test_cancel_stops_at_the_next_chunk_boundary(env):
    client, sent = env
    jid = client.post("/v1/jobs", json=small_job(iterations=6)).json()["id"]
    assert runner.run_chunk(jid, 0, owner="a") == "committed"
    r = client.post(f"/v1/jobs/{jid}/cancel")
    assert r.status_code == 202 and r.json()["status"] == "running"
    assert runner.run_chunk(jid, 2, owner="b") == "cancelled"
    job = client.get(f"/v1/jobs/{jid}").json()
    assert job["status"] == "cancelled" and job["progress"]["iteration"] == 2 and job["finished_at"]
    r = client.get(f"/v1/jobs/{jid}/settings")
    assert r.status_code == 409 and "cancelled" in r.json()["detail"]


def test_training_that_diverges_everywhere_fails_with_a_sentence(env):
    client, sent = env
    big = 1e18  # finite input, but any learning rate down to the lower bound blows up
    job = {
        "name": "hopeless",
        "tasks": [
            {
                "data": {
                    "source": "inline",
                    "x_train": [[big, -big], [-big, big], [big, big], [-big, -big]],
                    "y_train": [0, 1, 1, 0],
                    "x_val": [[big, big]],
                    "y_val": [1],
                },
                "model": {"kind": "mlp", "hidden": [4], "activation": "relu"},
                "loss": "mse",
                "steps": 20,
                "batch_size": 2,
            }
        ],
        "hyperparameters": {"lr": 1.0, "lr_bounds": [0.01, 10]},
        "meta": {"iterations": 3},
    }
    r = client.post("/v1/jobs", json=job)
    assert r.status_code == 202, r.text
    jid = r.json()["id"]
    assert runner.run_chunk(jid, 0, owner="a") == "failed"
    job = client.get(f"/v1/jobs/{jid}").json()
    assert job["status"] == "failed"
    assert "diverge" in job["error"] and "Traceback" not in job["error"] and job["error"].endswith(".")
    r = client.get(f"/v1/jobs/{jid}/settings")
    assert r.status_code == 409 and "failed" in r.json()["detail"]


def test_inline_data_builds_the_tasks_the_user_described():
    import torch

    from service.schemas import JobCreate

    job = JobCreate.model_validate(
        {
            "tasks": [
                {
                    "data": {
                        "source": "inline",
                        "x_train": [[0, 1], [1, 0], [1, 1]],
                        "y_train": [0, 2, 1],
                        "x_val": [[1, 1]],
                        "y_val": [2],
                    },
                    "model": {"kind": "mlp", "hidden": [3]},
                    "loss": "cross_entropy",
                    "steps": 2,
                    "batch_size": 2,
                },
                {
                    "data": {
                        "source": "inline",
                        "x_train": [[0.5], [1.5]],
                        "y_train": [[1, 2], [3, 4]],
                        "x_val": [[1.0]],
                        "y_val": [[2, 3]],
                    },
                    "model": {"kind": "mlp"},
                    "loss": "mse",
                    "steps": 1,
                    "batch_size": 1,
                },
                {
                    "data": {"source": "builtin", "name": "wine"},
                    "model": {"kind": "mlp"},
                    "loss": "cross_entropy",
                    "steps": 1,
                    "batch_size": 8,
                },
            ]
        }
    )
    t0, t1, t2 = runner.build_tasks(job, torch.device("cpu"))
    assert t0.out_features == 3 and t0.y_train.dtype == torch.int64 and t0.x_train.shape == (3, 2)
    assert t1.out_features == 2 and t1.y_train.shape == (2, 2) and t1.hidden == ()
    assert t2.out_features == 3 and t2.x_train.shape[1] == 13
    assert len({t.seed for t in (t0, t1, t2)}) == 3  # each task its own draws


def test_a_job_on_an_uploaded_dataset_runs_to_settings(env):
    """Upload safetensors through the API, name its tensors in a task, run the chunks."""
    import numpy as np

    from tests.helpers.dataset_files import safetensors_bytes

    client, sent = env
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    r = client.post("/v1/datasets", files={"file": ("blobs.safetensors", safetensors_bytes({"x": x, "y": y}))})
    assert r.status_code == 201, r.text
    ds = r.json()["id"]
    job = {
        "name": "own-data",
        "tasks": [
            {
                "data": {
                    "source": "dataset",
                    "train": {"dataset": ds, "x": "x", "y": "y"},
                    "val_fraction": 0.25,
                    "seed": 1,
                },
                "model": {"kind": "mlp", "hidden": [4]},
                "loss": "cross_entropy",
                "steps": 10,
                "batch_size": 8,
            }
        ],
        "meta": {"iterations": 2},
    }
    r = client.post("/v1/jobs", json=job)
    assert r.status_code == 202, r.text
    jid = r.json()["id"]
    sent.append((jid, 0))
    assert _drain(sent) == ["committed", "succeeded"]
    body = client.get(f"/v1/jobs/{jid}/settings").json()
    assert body["evaluation"]["mean_learned_val_loss"] <= body["evaluation"]["mean_initial_val_loss"]
    # The worker saw the split the user asked for: 15 validation rows, 45 for training.
    from service.schemas import JobCreate

    (task,) = runner.build_tasks(JobCreate.model_validate(job), None)
    assert task.x_val.shape == (15, 4) and task.x_train.shape == (45, 4) and task.out_features == 2


def test_a_line_search_job_learns_what_the_engine_learns_with_line_search(env):
    import torch

    from service.schemas import JobCreate
    from worker import engine

    client, sent = env
    spec = small_job(iterations=4, tasks=2)
    spec["meta"]["search"] = "line"
    jid = client.post("/v1/jobs", json=spec).json()["id"]
    sent.append((jid, 0))
    assert _drain(sent)[-1] == "succeeded"
    body = client.get(f"/v1/jobs/{jid}/settings").json()
    assert body["search"] == "line"  # the settings say how they were found
    job = JobCreate.model_validate(spec)
    config = runner.meta_config(job)
    assert config.search == "line" and config.population_momenta == ()
    assert runner.meta_config(JobCreate.model_validate(small_job())).search == "stencil"  # the pair's default
    tasks = runner.build_tasks(job, torch.device("cpu"))
    direct = engine.run_meta(tasks, config, engine.init_state(config, 0.01, 0.9), 4)
    best = engine.best_settings(direct)
    assert (body["lr"], body["momentum"]) == pytest.approx((best["lr"], best["momentum"]), rel=1e-9)


def test_an_unknown_search_is_a_422_naming_the_field(env):
    client, _ = env
    spec = small_job()
    spec["meta"]["search"] = "grid"
    r = client.post("/v1/jobs", json=spec)
    assert r.status_code == 422
    assert "meta.search" in r.text and "stencil" in r.text


def _killed_mid_chunk(job_id: str) -> int:
    """Run the job's next chunk in a worker process that is killed (SIGKILL) inside the engine."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    code = (
        "import os, signal, sys\n"
        "from worker import engine, runner\n"
        "engine.run_meta = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
        "runner.run_chunk(sys.argv[1], None, owner='doomed')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", code, job_id], env=env, cwd=root, capture_output=True, timeout=300)
    return out.returncode


def test_a_chunk_that_kills_its_worker_fails_the_job_after_three_attempts(env, monkeypatch):
    """The worker process dies (kill -9) in the same chunk three times; the sweep re-enqueues it
    twice, then fails it with "worker lost 3 times at iteration 2" rather than retry forever."""
    from datetime import timedelta

    from service.db.clock import database_now
    from service.db.models import Job

    client, sent = env
    jid = client.post("/v1/jobs", json=small_job(iterations=6)).json()["id"]
    assert runner.run_chunk(jid, 0, owner="a") == "committed"  # iterations 1-2
    sent.clear()
    codes = []
    for _ in range(3):
        codes.append(_killed_mid_chunk(jid))
        with db_session.session_scope() as db:  # its heartbeat goes stale
            job = db.get(Job, jid)
            assert job.status == "running" and job.lease_owner is not None
            job.heartbeat_at = database_now(db) - timedelta(minutes=5)
        runner.sweep_once()
    assert codes == [-9, -9, -9]
    assert sent == [(jid, 2), (jid, 2)]  # two re-enqueues, then no more
    job = client.get(f"/v1/jobs/{jid}").json()
    assert job["status"] == "failed" and job["progress"]["iteration"] == 2
    assert job["error"].startswith("worker lost 3 times at iteration 2")
    assert [h["iteration"] for h in client.get(f"/v1/jobs/{jid}/history").json()["items"]] == [1, 2]
    assert runner.run_chunk(jid, 2, owner="late") == "skipped"
