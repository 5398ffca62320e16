"""init_state's ``table`` (a study's learned per-layer / scheduled values): the richer phase starts
from it when its meta-loss is lower than the best constant pair's, judged here by plain
torch.optim.SGD on the same draws (evaluate_groups), and says which it started from."""

from __future__ import annotations

import pytest

from tests.helpers.tasks import synthetic_task
from worker.engine import EngineError, MetaConfig, best_settings, evaluate_groups, init_state, run_meta

# 2 constant iterations, then the table: the 3rd iteration is its start
RICH = {"per_layer": True, "schedule_segments": 2, "iterations": 4, "constant_fraction": 0.5, "rich_holdout": 0}


def _tasks():
    return [synthetic_task(seed=i, name=f"t{i}", steps=12) for i in range(3)]


def _run(cfg, table, records):
    state = init_state(cfg, 0.05, 0.5, table=table)
    return run_meta(_tasks(), cfg, state, 3, on_iteration=records.append)


def _ref(table, cfg) -> float:
    return evaluate_groups(_tasks(), table["param_groups"], table["boundaries"], cfg.draws)["mean_val_loss"]


def _scaled(table, lr_by_slot):
    groups = [
        {**g, "lr": [x * f for x in g["lr"]], "momentum": list(g["momentum"])}
        for g, f in zip(table["param_groups"], lr_by_slot, strict=True)
    ]
    return {"param_groups": groups, "boundaries": list(table["boundaries"])}


def _learned():
    """The table a longer cold search ends with (what a study keeps)."""
    cfg = MetaConfig(**{**RICH, "iterations": 14})
    best = best_settings(run_meta(_tasks(), cfg, init_state(cfg, 0.05, 0.5), cfg.iterations))
    return {"param_groups": best["param_groups"], "boundaries": best["boundaries"]}


@pytest.mark.parametrize("given", ["learned", "scaled", "diverging"])
def test_the_table_starts_from_the_given_values_when_they_are_lower(given):
    cfg = MetaConfig(**RICH)
    cold: list[dict] = []
    state = _run(cfg, None, cold)
    pair = best_settings(state)  # the table at its start is the best constant pair on every group
    assert cold[2]["phase"] == "rich_start" and "start_table" not in cold[2]
    table = {
        "learned": _learned,
        "scaled": lambda: _scaled(pair, (1.6, 0.7)),
        "diverging": lambda: _scaled(pair, (200.0, 200.0)),
    }[given]()
    warm: list[dict] = []
    _run(cfg, table, warm)
    start = warm[2]
    assert start["phase"] == "rich_start"
    lower = _ref(table, cfg) < _ref(pair, cfg)  # the independent reference decides which is lower
    assert lower == (given == "learned"), (given, _ref(table, cfg), _ref(pair, cfg))
    assert start["start_table"] == ("started from it" if lower else "the constant pair was lower")
    assert start["meta_loss"] == pytest.approx(min(_ref(table, cfg), _ref(pair, cfg)), rel=1e-9)
    want = table if lower else pair
    for got, group in zip(start["group_lr"], want["param_groups"], strict=True):
        assert got == pytest.approx(group["lr"], rel=1e-9)
    assert start["evaluations"] == 2


def test_a_table_of_another_shape_is_left_out_and_a_malformed_one_refused():
    cfg = MetaConfig(**RICH)
    three = {
        "param_groups": [{"params": [], "lr": [0.1, 0.1], "momentum": [0.5, 0.5]} for _ in range(3)],
        "boundaries": [0, 6],
    }
    records: list[dict] = []
    _run(cfg, three, records)
    assert records[2]["start_table"] == "left out: its groups or segments differ from this job's"
    with pytest.raises(EngineError, match="starting table"):
        init_state(cfg, 0.05, 0.5, table={"param_groups": [{"lr": [0.1], "momentum": [0.5, 0.2]}], "boundaries": [0]})
    with pytest.raises(EngineError, match="positive"):
        init_state(cfg, 0.05, 0.5, table={"param_groups": [{"lr": [-1.0], "momentum": [0.5]}], "boundaries": [0]})
    # without richer values the table is ignored
    assert init_state(MetaConfig(iterations=4), 0.05, 0.5, table=three)["start_table"] is None
