"""The meta-loop: improvement, backoff, errors, bounds, callbacks and resume through JSON."""

import json
import math

import pytest
import torch

from tests.engine.helpers import synthetic_task
from worker.engine import (
    LINE_SEARCH,
    EngineError,
    MetaConfig,
    best_settings,
    init_state,
    momentum_to_param,
    run_meta,
    state_iteration,
    train_sgd,
)


def _tasks(**kw):
    return [synthetic_task(seed=s, n=64, steps=16, **kw) for s in range(2)]


def _reference(tasks, lr, mom, draws):
    runs = [train_sgd(t, lr, mom, d) for t in tasks for d in draws]
    return sum(runs) / len(runs)


@pytest.mark.parametrize("population", [True, False])
@pytest.mark.parametrize("stencil", [True, False])
def test_meta_loop_improves_on_a_small_problem(population, stencil):
    tasks = _tasks()
    config = MetaConfig(iterations=12, population=population, stencil=stencil)
    records = []
    state = run_meta(tasks, config, init_state(config, 1e-3, 0.0), 12, on_iteration=records.append)
    best = best_settings(state)
    start = _reference(tasks, 1e-3, 0.0, config.draws)
    # the reported meta-loss is the reference's, and far below the start's
    assert best["meta_loss"] == pytest.approx(_reference(tasks, best["lr"], best["momentum"], config.draws), rel=1e-9)
    assert best["meta_loss"] < 0.7 * start
    assert [r["iteration"] for r in records] == list(range(1, 13))
    assert state_iteration(state) == 12
    # the accepted loss never goes up, and the best is the minimum of everything accepted
    losses = [r["meta_loss"] for r in records]
    assert all(b <= a for a, b in zip(losses, losses[1:], strict=False))
    assert best["meta_loss"] <= min(losses)


@pytest.mark.parametrize("preset", [{"search": "line"}, {**LINE_SEARCH}, {**LINE_SEARCH, "population": False}])
def test_line_search_improves_and_moves_along_the_negative_hypergradient(preset):
    tasks = _tasks()
    config = MetaConfig(iterations=8, **preset)
    records = []
    state = run_meta(tasks, config, init_state(config, 1e-3, 0.0), 8, on_iteration=records.append)
    best = best_settings(state)
    assert best["meta_loss"] == pytest.approx(_reference(tasks, best["lr"], best["momentum"], config.draws), rel=1e-9)
    assert best["meta_loss"] < 0.7 * _reference(tasks, 1e-3, 0.0, config.draws)
    losses = [r["meta_loss"] for r in records]
    assert all(b <= a for a, b in zip(losses, losses[1:], strict=False))
    moves = 0
    for prev, rec in zip(records, records[1:], strict=False):
        if rec["phase"] == "converged":
            continue
        # a line that found nothing lower is followed by one stencil screen (move "stencil", or
        # None when nothing was lower there either)
        if rec["move"] != "line":
            assert prev["move"] == "line" and not prev["accepted"]
        if not rec["accepted"] or rec["move"] != "line" or prev["hypergradient"][0] is None:
            continue
        moves += 1
        # the accepted point lies on the ray from the previous point along -hypergradient
        g = prev["hypergradient"]
        d = [
            math.log(rec["lr"]) - math.log(prev["lr"]),
            momentum_to_param(rec["momentum"], config.momentum_bounds)
            - momentum_to_param(prev["momentum"], config.momentum_bounds),
        ]
        cos = -(g[0] * d[0] + g[1] * d[1]) / (math.hypot(*g) * math.hypot(*d))
        assert cos == pytest.approx(1.0, abs=1e-6)
        assert rec["meta_loss"] < prev["meta_loss"]
    assert moves >= 1


def test_line_search_continues_a_stencil_state_and_resumes_through_json():
    tasks = _tasks()
    stencil = MetaConfig(iterations=3)
    line = MetaConfig(iterations=9, search="line")
    s0 = run_meta(tasks, stencil, init_state(stencil, 0.003, 0.3), 3)
    full = run_meta(tasks, line, s0, 6)
    half = json.loads(json.dumps(run_meta(tasks, line, s0, 3)))
    assert run_meta(tasks, line, half, 3) == full
    assert best_settings(full)["meta_loss"] <= best_settings(s0)["meta_loss"]


def test_records_and_state_are_plain_json():
    tasks = _tasks()
    config = MetaConfig(iterations=4)
    records = []
    state = run_meta(tasks, config, init_state(config, 0.01, 0.5), 4, on_iteration=records.append)
    json.dumps(state, allow_nan=False)
    for r in records:
        json.dumps(r, allow_nan=False)
        for key in (
            "iteration",
            "meta_loss",
            "lr",
            "momentum",
            "accepted",
            "step_size",
            "hypergradient",
            "candidate_loss",
        ):
            assert key in r
        assert len(r["hypergradient"]) == 2


@pytest.mark.parametrize("population", [True, False])
def test_diverging_start_backs_off(population):
    tasks = _tasks(loss="mse", hidden=(), out=2, dtype=torch.float32)
    assert train_sgd(tasks[0], 500.0, 0.9) == math.inf
    config = MetaConfig(iterations=3, population=population, lr_bounds=(1e-5, 1e3))
    records = []
    state = run_meta(tasks, config, init_state(config, 500.0, 0.9), 3, on_iteration=records.append)
    first = records[0]
    assert first["phase"] == "start" and first["meta_loss"] is not None
    assert first["lr"] < 500.0
    if not population:
        assert first["backoffs"] >= 1
    best = best_settings(state)
    assert math.isfinite(_reference(tasks, best["lr"], best["momentum"], config.draws))


@pytest.mark.parametrize("population", [True, False])
def test_hopeless_start_raises_engine_error(population):
    tasks = _tasks()
    for t in tasks:
        t.x_train[:, 0] = float("nan")  # every run sees NaN features
    config = MetaConfig(iterations=3, population=population)
    state = init_state(config, 0.1, 0.9)
    with pytest.raises(EngineError, match="diverged") as err:
        run_meta(tasks, config, state, 3)
    assert str(err.value).endswith(".") and "\n" not in str(err.value)
    assert state_iteration(state) == 0  # the caller's state is untouched


def test_resume_through_json_gives_the_same_result():
    tasks = _tasks()
    config = MetaConfig(iterations=10, min_step=1e-3)
    s0 = init_state(config, 0.003, 0.3)
    full_records, split_records = [], []
    full = run_meta(tasks, config, s0, 10, on_iteration=full_records.append)
    half = run_meta(tasks, config, s0, 5, on_iteration=split_records.append)
    assert state_iteration(half) == 5
    half = json.loads(json.dumps(half))
    rest = run_meta(tasks, config, half, 5, on_iteration=split_records.append)
    assert rest == full
    assert split_records == full_records
    assert state_iteration(s0) == 0  # run_meta returns a new state


def test_bounds_are_never_exceeded():
    tasks = _tasks()
    config = MetaConfig(iterations=10, lr_bounds=(1e-3, 0.02), momentum_bounds=(0.2, 0.6))
    records = []
    state = run_meta(tasks, config, init_state(config, 5.0, 0.95), 10, on_iteration=records.append)
    assert state_iteration(state) == 10
    for r in records:
        for lr_key, mom_key in (
            ("lr", "momentum"),
            ("candidate_lr", "candidate_momentum"),
            ("best_lr", "best_momentum"),
        ):
            if r[lr_key] is not None:
                assert 1e-3 <= r[lr_key] <= 0.02
                assert 0.2 <= r[mom_key] <= 0.6
    best = best_settings(state)
    assert 1e-3 <= best["lr"] <= 0.02 and 0.2 <= best["momentum"] <= 0.6
    # the optimum of this problem lies above 0.02: the loop should end on the upper lr bound
    assert best["lr"] == pytest.approx(0.02)


def test_max_iterations_and_should_stop():
    tasks = _tasks()
    config = MetaConfig(iterations=3)
    state = run_meta(tasks, config, init_state(config, 0.01, 0.5), 100)
    assert state_iteration(state) == 3
    assert run_meta(tasks, config, state, 5) == state  # never past config.iterations
    calls = []
    stopped = run_meta(
        tasks,
        MetaConfig(iterations=10),
        init_state(config, 0.01, 0.5),
        10,
        on_iteration=calls.append,
        should_stop=lambda: len(calls) >= 2,
    )
    assert state_iteration(stopped) == 2 and len(calls) == 2


def test_best_settings_before_any_iteration_is_the_start():
    config = MetaConfig()
    best = best_settings(init_state(config, 0.02, 0.8))
    assert best["lr"] == pytest.approx(0.02) and best["momentum"] == pytest.approx(0.8)
    assert best["meta_loss"] is None


@pytest.mark.parametrize(
    "kwargs,lr,mom",
    [
        ({"draws": (0, 1001)}, 0.1, 0.5),
        ({"lr_bounds": (0.1, 0.01)}, 0.1, 0.5),
        ({"momentum_bounds": (0.0, 1.0)}, 0.1, 0.5),
        ({}, -1.0, 0.5),
        ({}, float("nan"), 0.5),
        ({"search": "newton"}, 0.1, 0.5),
        ({"search": "line", "line_steps": (0.0, 1.0)}, 0.1, 0.5),
    ],
)
def test_invalid_configuration_is_an_engine_error(kwargs, lr, mom):
    with pytest.raises(EngineError):
        init_state(MetaConfig(**kwargs), lr, mom)


def test_unverified_stencil_moves_keep_the_true_meta_loss():
    """verify_stencil=False (default) accepts a stencil move on its screened forward loss: that loss
    must be the meta-loss a reverse pass and the reference loop give at the same settings."""
    from worker.engine.functional import Objective

    tasks = _tasks()
    config = MetaConfig(iterations=12)
    assert not config.verify_stencil
    records = []
    state = run_meta(tasks, config, init_state(config, 0.003, 0.3), 12, on_iteration=records.append)
    stencil = [r for r in records if r["accepted"] and r.get("move") == "stencil"]
    assert stencil, "the test needs at least one accepted stencil move"
    best = best_settings(state)
    ref = _reference(tasks, best["lr"], best["momentum"], config.draws)
    assert math.isclose(best["meta_loss"], ref, rel_tol=1e-4)
    obj = Objective(tasks, config.draws)
    a, z = state["best"]["theta"]
    loss, _ = obj.value_and_grad(a, z, config.momentum_bounds, "reverse", config.truncation)
    assert math.isclose(best["meta_loss"], float(loss), rel_tol=1e-5)
    verified = run_meta(tasks, MetaConfig(iterations=12, verify_stencil=True), init_state(config, 0.003, 0.3), 12)
    assert math.isclose(best_settings(verified)["meta_loss"], best["meta_loss"], rel_tol=0.05)


def test_the_last_line_iteration_accepts_on_the_screened_loss_and_a_longer_run_goes_on_from_it():
    tasks = _tasks()
    short = MetaConfig(iterations=3, **LINE_SEARCH)
    records = []
    state = run_meta(tasks, short, init_state(short, 1e-3, 0.0), 3, on_iteration=records.append)
    last = records[-1]
    assert last["accepted"], "the test needs the last iteration to move"
    # no hypergradient pass: only the screened points were evaluated, and none is known there
    assert last["evaluations"] <= len(short.line_steps) and state["grad"] is None
    best = best_settings(state)
    assert best["meta_loss"] == pytest.approx(_reference(tasks, best["lr"], best["momentum"], short.draws), rel=1e-9)
    longer = MetaConfig(iterations=6, **LINE_SEARCH)
    records = []
    more = run_meta(tasks, longer, json.loads(json.dumps(state)), 3, on_iteration=records.append)
    assert records[0]["evaluations"] >= 1 and records[0]["hypergradient"][0] is not None
    assert best_settings(more)["meta_loss"] <= best["meta_loss"]


def test_line_search_without_a_finite_hypergradient_falls_back_to_the_stencil(monkeypatch):
    """Near the edge of stability a float32 hypergradient can overflow; the line search then has no
    direction and screens the stencil's neighbours instead of stopping."""
    from worker.engine.meta.evaluate import PairEvaluator

    real = PairEvaluator.value_and_grad
    monkeypatch.setattr(
        PairEvaluator, "value_and_grad", lambda self, theta: (real(self, theta)[0], [math.inf, math.nan])
    )
    tasks = _tasks()
    config = MetaConfig(iterations=6, search="line")
    records = []
    state = run_meta(tasks, config, init_state(config, 1e-3, 0.0), 6, on_iteration=records.append)
    assert {r["move"] for r in records[1:] if r["phase"] == "refine"} == {"stencil"}
    assert any(r["accepted"] for r in records[1:])
    best = best_settings(state)
    assert best["meta_loss"] < records[0]["meta_loss"]
    assert best["meta_loss"] == pytest.approx(_reference(tasks, best["lr"], best["momentum"], config.draws), rel=1e-9)
