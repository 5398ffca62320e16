"""The unified search against the pre-refactor loop (tests/worker/engine/legacy_meta_v1.py, frozen):
the same records, the same best settings, and version-1 checkpoints written by the old loop resume
to the result the old loop reaches straight through."""

import json

import pytest
import torch

from tests.helpers.tasks import synthetic_task
from tests.worker.engine import legacy_meta_v1 as legacy
from worker.engine import LINE_SEARCH, EngineError, MetaConfig, best_settings, init_state, meta, run_meta
from worker.engine.meta import STATE_VERSION, MetaState

CASES = {
    "stencil": {"iterations": 10},
    "axis-stencil, verified": {"iterations": 8, "stencil_diagonals": False, "verify_stencil": True},
    "hypergradient only, no population": {"iterations": 8, "stencil": False, "population": False},
    "line, budget preset": {"iterations": 8, **LINE_SEARCH},
    "line, converges": {"iterations": 12, "search": "line", "min_step": 0.3},
    "per layer": {"iterations": 10, "per_layer": True},
    "per layer x 2 segments, line": {"iterations": 10, "per_layer": True, "schedule_segments": 2, "search": "line"},
    "3 segments, margin rejects, converges": {
        "iterations": 12,
        "schedule_segments": 3,
        "stability_margin": 30.0,
        "constant_fraction": 0.25,
    },
    "regression, forward method": {"iterations": 8, "per_layer": True, "method": "forward", "tasks": "mse"},
}


def _tasks(kind="cross_entropy"):
    if kind == "mse":
        return [synthetic_task(loss="mse", hidden=(4,), out=2, seed=s, n=64, steps=12) for s in range(2)]
    return [synthetic_task(seed=s, n=64, steps=16) for s in range(2)]


def _run(module, case, iterations, state=None, records=None):
    kw = dict(CASES[case])
    tasks = _tasks(kw.pop("tasks", "cross_entropy"))
    config = module.MetaConfig(**kw)
    records = [] if records is None else records
    state = module.init_state(config, 0.003, 0.3) if state is None else state
    return module.run_meta(tasks, config, state, iterations, on_iteration=records.append), records


@pytest.fixture(scope="module")
def legacy_runs():
    """Each case run straight through by the old loop (shared by the tests below)."""
    torch.set_num_threads(1)
    return {case: _run(legacy, case, CASES[case]["iterations"]) for case in CASES}


def test_the_cases_cover_every_kind_of_iteration(legacy_runs):
    records = [r for _, recs in legacy_runs.values() for r in recs]
    assert {r["phase"] for r in records} == {"start", "refine", "converged", "rich_start", "rich_refine"}
    moves = {(r["phase"], r.get("move")) for r in records if r["accepted"]}
    assert {
        ("refine", "gradient"),
        ("refine", "stencil"),
        ("refine", "line"),
        ("rich_refine", "stencil"),
        ("rich_refine", "line"),
    } <= moves
    assert any(r.get("margin_rejected") for r in records)
    assert any(r["phase"] == "refine" and r["move"] is None for r in records)  # a rejected stencil


@pytest.mark.parametrize("case", list(CASES))
def test_the_unified_search_reproduces_the_pre_refactor_loop(case, legacy_runs):
    old_state, old_records = legacy_runs[case]
    state, records = _run(meta, case, CASES[case]["iterations"])
    assert records == old_records
    assert [list(r) for r in records] == [list(r) for r in old_records]  # the same keys, in the same order
    assert best_settings(state) == legacy.best_settings(old_state)
    assert best_settings(old_state) == legacy.best_settings(old_state)  # version 1 read as it was meant
    assert state["version"] == STATE_VERSION == 2 and old_state["version"] == 1
    # method_reason quotes the memory estimate, which now comes from the spec's cost model (the
    # legacy loop had its own): the same method, a different number in the sentence
    converted = MetaState.from_json(old_state).to_json()
    assert converted["method"] == state["method"]
    assert {**converted, "method_reason": None} == {**state, "method_reason": None}


@pytest.mark.parametrize(
    "case", ["line, converges", "per layer x 2 segments, line", "3 segments, margin rejects, converges"]
)
def test_a_version_1_checkpoint_resumes_to_the_old_loops_result(case, legacy_runs):
    old_state, old_records = legacy_runs[case]
    n = CASES[case]["iterations"]
    for split in range(1, n):
        checkpoint, records = _run(legacy, case, split)
        assert checkpoint["version"] == 1
        state, records = _run(meta, case, n - split, state=json.loads(json.dumps(checkpoint)), records=records)
        assert records == old_records, split
        assert best_settings(state) == legacy.best_settings(old_state), split


def test_the_json_form_round_trips_and_rejects_what_it_cannot_read(legacy_runs):
    old_state, _ = legacy_runs["per layer x 2 segments, line"]
    state = MetaState.from_json(old_state).to_json()
    assert state["rich"] is not None and state["layout"] is not None
    json.dumps(state, allow_nan=False)
    assert MetaState.from_json(json.loads(json.dumps(state))).to_json() == state
    typed = MetaState.from_json(state)
    assert typed.rich.slots == 2 and typed.rich.segments == 2 and len(typed.rich.theta) == 8
    assert typed.constant.best.lr == old_state["best"]["lr"]
    assert typed.rich.best.lrs == old_state["rich"]["best"]["lrs"]
    # a fresh state is version 2, every field named
    fresh = init_state(MetaConfig(), 0.01, 0.9)
    assert fresh["version"] == 2 and fresh["rich"] is None and fresh["method"] is None and not fresh["screen_next"]
    for bad in ({**state, "version": 3}, {**state, "version": None}, {k: v for k, v in state.items() if k != "step"}):
        with pytest.raises(EngineError):
            MetaState.from_json(bad)
    with pytest.raises(EngineError):
        run_meta(_tasks(), MetaConfig(iterations=3), {**state, "version": 0}, 1)
