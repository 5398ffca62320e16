"""worker/engine/study.py relearn: each round runs the search PoolConfig.search names (warm: no
population, the smaller first step) on its meta-batch, and keeps its answer only when it is not
worse on the round's check tasks than the settings it started from."""

from __future__ import annotations

import math

import pytest

from tests.helpers.tasks import synthetic_task
from worker.engine import MetaConfig
from worker.engine import study as engine_study
from worker.engine.study import PoolConfig, draw_batch, relearn


@pytest.mark.parametrize("search", ["line", "stencil"])
def test_each_round_runs_the_pools_search_warm_and_keeps_only_what_holds_on_its_check(search, monkeypatch):
    tasks = [synthetic_task(seed=s, steps=8) for s in range(6)]
    configs = []
    real = engine_study.run_meta

    def spy(batch, config, state, iterations, **kw):
        configs.append(config)
        return real(batch, config, state, iterations, **kw)

    monkeypatch.setattr(engine_study, "run_meta", spy)
    pool = PoolConfig(meta_batch=3, rounds=2, iterations=2, check_tasks=3, search=search)
    start = {"lr": 0.01, "momentum": 0.5}
    out = relearn(tasks, MetaConfig(), start, seed=7, pool=pool)
    assert [c.search for c in configs] == [search, search]
    assert all(c.population is False and c.step_size == pool.warm_step for c in configs)
    assert [r["batch"] for r in out["rounds"]] == [draw_batch(6, 3, 7, r) for r in (0, 1)]
    for r in out["rounds"]:
        assert set(r["check"]).isdisjoint(r["batch"]) and len(r["check"]) == 3
        assert r["kept"] == (r["loss_after"] <= r["loss_before"])
    # the rounds ran from the start: with every round refused the start comes back unchanged
    if not any(r["kept"] for r in out["rounds"]):
        assert out["settings"] == start
    else:
        assert out["settings"] != start and math.isfinite(out["settings"]["lr"])
