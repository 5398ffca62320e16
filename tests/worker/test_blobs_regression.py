"""Issue 10 item 7, "never worse than the start", on the job that showed it.

tests/worker/data/blobs.npz (three separable blobs, x (400, 8) float32, y (400,) int64, a copy of
the report's file) uploaded and used as one task: mlp [16] relu, cross-entropy, 100 steps of batch
32, val_fraction 0.2, split seed 0, start lr 0.01 momentum 0.9, 20 iterations, meta seed 0. It
used to succeed with lr 0.1, momentum 0.99, a meta-loss of exactly 0.0 from iteration 1, and a
validation loss of 1.676 on the evaluation draws against 0.0114 for the start.

The cause (tests/worker/engine/test_zero_loss.py): float32 cross-entropy rounded to 0.0, and ties at zero
loss kept the most aggressive settings. The guard (worker/runner.choose_fallback): settings that
evaluate worse than the start are not returned; `fallback` says so and both evaluations are kept.
"""

from __future__ import annotations

import math
import pathlib

import pytest
import torch

from service.db import session as db_session
from service.main import create_app
from service.schemas import JobCreate
from service.settings import get_settings
from tests.helpers.support import keyed_client
from worker import engine, runner
from worker.engine.meta import evaluate as meta_evaluate

BLOBS = pathlib.Path(__file__).resolve().parent / "data" / "blobs.npz"
START = {"lr": 0.01, "momentum": 0.9}


@pytest.fixture
def env(db_url, tmp_path, monkeypatch):
    """Worker settings from the environment (as a real worker reads them), messages captured."""
    monkeypatch.setenv("GRADTUNE_DATABASE_URL", db_url)
    monkeypatch.setenv("GRADTUNE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("GRADTUNE_CHUNK_ITERATIONS", "5")
    for f in (get_settings, db_session.get_engine, db_session.get_sessionmaker):
        f.cache_clear()
    sent: list[tuple[str, int]] = []
    monkeypatch.setattr(runner, "enqueue", lambda job_id, it, device=None: sent.append((job_id, it)))
    torch.set_num_threads(1)
    with keyed_client(create_app(get_settings())) as client:
        yield client, sent
    db_session.get_engine().dispose()
    for f in (get_settings, db_session.get_engine, db_session.get_sessionmaker):
        f.cache_clear()


def _blobs_job(client, per_layer: bool = False) -> dict:
    r = client.post("/v1/datasets", files={"file": ("blobs.npz", BLOBS.read_bytes())})
    assert r.status_code == 201, r.text
    return {
        "name": "blobs",
        "tasks": [
            {
                "data": {
                    "source": "dataset",
                    "train": {"dataset": r.json()["id"], "x": "x", "y": "y"},
                    "val_fraction": 0.2,
                    "seed": 0,
                },
                "model": {"kind": "mlp", "hidden": [16], "activation": "relu"},
                "loss": "cross_entropy",
                "steps": 100,
                "batch_size": 32,
            }
        ],
        "hyperparameters": {**START, "per_layer": per_layer},
        "meta": {"iterations": 20, "seed": 0},
    }


def _run(client, sent, spec: dict) -> tuple[str, dict, list[dict]]:
    r = client.post("/v1/jobs", json=spec)
    assert r.status_code == 202, r.text
    jid = r.json()["id"]
    sent.append((jid, 0))
    outcomes = []
    while sent:
        job_id, it = sent.pop(0)
        outcomes.append(runner.run_chunk(job_id, it, owner=f"t-{it}"))
    assert outcomes[-1] == "succeeded", outcomes
    body = client.get(f"/v1/jobs/{jid}/settings").json()
    history = client.get(f"/v1/jobs/{jid}/history").json()["items"]
    assert len(history) == 20
    return jid, body, history


def _reference(spec: dict, lr: float, momentum: float) -> float:
    """The evaluation recomputed: plain torch.optim.SGD on the evaluation draws."""
    tasks = runner.build_tasks(JobCreate.model_validate(spec), torch.device("cpu"))
    return engine.evaluate(tasks, lr, momentum, engine.EVAL_DRAWS)["mean_val_loss"]


def test_the_blobs_job_learns_settings_better_than_the_start_with_a_positive_meta_loss(env):
    """With the stencil search (the default for a constant pair). The line search drives this job's
    training meta-loss down to 5e-8 at lr 0.081, momentum 0.962, which evaluates worse than the start
    (0.048 against 0.0114): the guard returns the start (next test)."""
    client, sent = env
    spec = _blobs_job(client)
    spec["meta"]["search"] = "stencil"
    jid, body, history = _run(client, sent, spec)
    # The cause: the training did not converge to exact zero, so neither is the meta-loss.
    losses = [h["meta_loss"] for h in history]
    assert all(loss is not None and 0.0 < loss < math.inf for loss in losses), losses
    ev = body["evaluation"]
    assert body["fallback"] is None
    assert (body["lr"], body["momentum"]) == (ev["learned"]["lr"], ev["learned"]["momentum"])
    assert ev["initial"] == START
    # Not worse than the start on the evaluation draws (it was 1.676 against 0.0114).
    assert ev["mean_learned_val_loss"] < ev["mean_initial_val_loss"]
    assert ev["mean_learned_val_loss"] == pytest.approx(_reference(spec, body["lr"], body["momentum"]), rel=1e-9)
    assert ev["mean_initial_val_loss"] == pytest.approx(_reference(spec, **START), rel=1e-9)
    job = client.get(f"/v1/jobs/{jid}").json()
    assert (job["progress"]["lr"], job["progress"]["momentum"]) == (body["lr"], body["momentum"])


def test_with_the_line_search_the_blobs_job_is_never_worse_than_the_start(env):
    client, sent = env
    spec = _blobs_job(client)
    spec["meta"]["search"] = "line"
    _, body, _ = _run(client, sent, spec)
    ev = body["evaluation"]
    assert body["search"] == "line"
    returned = _reference(spec, body["lr"], body["momentum"])
    assert returned <= ev["mean_initial_val_loss"] + 1e-12
    assert body["fallback"] == ("start" if ev["mean_learned_val_loss"] > ev["mean_initial_val_loss"] else None)


def test_when_the_search_lands_on_the_edge_the_job_returns_the_start_and_says_so(env, monkeypatch):
    """The search as it was before ties at zero loss went to the safer point (no floor): it lands
    where the training draws reach zero loss and the evaluation draws diverge; the guard returns
    the start."""
    monkeypatch.setattr(meta_evaluate.PairEvaluator, "floor", lambda self: 0.0)
    client, sent = env
    spec = _blobs_job(client)
    jid, body, history = _run(client, sent, spec)
    ev = body["evaluation"]
    learned = ev["learned"]
    best = min(history, key=lambda h: h["meta_loss"])  # the search's best point is what it learned
    assert (learned["lr"], learned["momentum"]) == (best["lr"], best["momentum"])
    # Both evaluations are recorded, each what plain SGD gives; the learned values lost.
    assert ev["mean_learned_val_loss"] == pytest.approx(_reference(spec, learned["lr"], learned["momentum"]), rel=1e-9)
    assert ev["mean_initial_val_loss"] == pytest.approx(_reference(spec, **START), rel=1e-9)
    assert ev["mean_learned_val_loss"] > ev["mean_initial_val_loss"]
    assert body["fallback"] == "start"
    assert (body["lr"], body["momentum"]) == (START["lr"], START["momentum"]) and "param_groups" not in body
    job = client.get(f"/v1/jobs/{jid}").json()
    assert job["status"] == "succeeded"
    assert (job["progress"]["lr"], job["progress"]["momentum"]) == (START["lr"], START["momentum"])


NO_GROUPS = "no per-layer or scheduled values"


@pytest.mark.parametrize(
    ("initial", "learned", "groups", "want"),
    [
        (0.5, 0.3, NO_GROUPS, None),
        (0.5, 0.5, NO_GROUPS, None),  # a tie keeps the learned values
        (0.3, 0.5, NO_GROUPS, "start"),
        (0.3, None, NO_GROUPS, "start"),  # None: the learned values diverged on an evaluation draw
        (None, None, NO_GROUPS, None),
        (None, 0.3, NO_GROUPS, None),
        (0.5, 0.3, 0.2, None),
        (0.5, 0.3, 0.3, None),
        (0.5, 0.3, 0.4, "constant"),  # groups worse than the constant pair, which beats the start
        (0.5, 0.3, None, "constant"),
        (0.3, 0.5, 0.4, "start"),  # groups beat the constant pair but not the start
        (0.3, 0.5, None, "start"),
        (0.3, 0.5, 0.2, None),  # groups beat both
        (0.4, 0.5, 0.3, None),
    ],
)
def test_choose_fallback(initial, learned, groups, want):
    args = (initial, learned) if groups == NO_GROUPS else (initial, learned, groups)
    assert runner.choose_fallback(*args) == want


def test_per_layer_values_that_evaluate_worse_fall_back_to_the_constant_pair_or_the_start(env):
    """evaluate_settings on a per-layer state whose values are set by hand: the groups as the edge
    (lr 0.3, momentum 0.99 on every layer), the constant pair the search finds, then the constant
    pair at the edge too."""
    client, sent = env
    spec = _blobs_job(client, per_layer=True)
    job = JobCreate.model_validate(spec)
    tasks = runner.build_tasks(job, torch.device("cpu"))
    config = runner.meta_config(job)
    config.iterations, config.constant_fraction = 2, 0.5  # iteration 1: start, 2: the table's start
    state = engine.run_meta(tasks, config, engine.init_state(config, **START), 2)
    assert state["rich"] is not None
    edge = {"lr": 0.3, "momentum": 0.99}
    state["rich"]["best"]["lrs"] = [[edge["lr"]], [edge["lr"]]]
    state["rich"]["best"]["momenta"] = [[edge["momentum"]], [edge["momentum"]]]

    body = runner.evaluate_settings(tasks, job, state)
    ev = body["evaluation"]
    assert ev["mean_learned_groups_val_loss"] is None or (
        ev["mean_learned_groups_val_loss"] > ev["mean_learned_val_loss"]
    )
    assert ev["mean_learned_val_loss"] <= ev["mean_initial_val_loss"]
    assert body["fallback"] == "constant" and "param_groups" not in body and "boundaries" not in body
    assert (body["lr"], body["momentum"]) == (ev["learned"]["lr"], ev["learned"]["momentum"])
    assert [g["lr"] for g in ev["learned"]["param_groups"]] == [[edge["lr"]], [edge["lr"]]]

    state["best"]["lr"], state["best"]["momentum"] = edge["lr"], edge["momentum"]
    body = runner.evaluate_settings(tasks, job, state)
    ev = body["evaluation"]
    assert ev["mean_learned_val_loss"] is None or ev["mean_learned_val_loss"] > ev["mean_initial_val_loss"]
    assert body["fallback"] == "start" and "param_groups" not in body
    assert (body["lr"], body["momentum"]) == (START["lr"], START["momentum"])
    assert ev["learned"]["lr"] == edge["lr"] and ev["learned"]["param_groups"] is not None
