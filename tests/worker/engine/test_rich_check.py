"""The richer values' check on held-back tasks (MetaConfig.rich_holdout, meta.loop.check_rich): the
richer search never sees every 4th task; at the end the table is kept only if it beats the constant
pair there, judged with plain torch.optim.SGD's losses; otherwise the pair comes back, saying so."""

import json
import math

import pytest

from tests.helpers.tasks import synthetic_task
from worker.engine import EngineError, MetaConfig, best_settings, check_rich, init_state, run_meta, train_sgd_groups
from worker.engine.meta import held_back
from worker.engine.meta.loop import CHECK_DRAWS
from worker.engine.meta.state import MetaState

# checked at the end, from 4 tasks on (the default waits for 16)
RICH = {"per_layer": True, "schedule_segments": 2, "iterations": 8, "rich_refit": 0, "rich_holdout_min_tasks": 4}


def _tasks(n: int):
    return [synthetic_task(seed=i, name=f"t{i}") for i in range(n)]


def test_held_back_is_every_kth_task_from_k_tasks_on():
    cfg = MetaConfig(**RICH)
    assert held_back(3, cfg) == []
    assert held_back(4, cfg) == [3]
    assert held_back(9, cfg) == [3, 7]
    assert held_back(9, MetaConfig(**RICH, rich_holdout=3)) == [2, 5, 8]
    assert held_back(9, MetaConfig(**RICH, rich_holdout=0)) == []
    assert held_back(9, MetaConfig(iterations=8)) == []  # no richer values: nothing to check
    default = MetaConfig(per_layer=True)
    assert held_back(15, default) == [] and held_back(16, default) == [3, 7, 11, 15]
    with pytest.raises(EngineError, match="rich_holdout"):
        init_state(MetaConfig(**RICH, rich_holdout=1), 0.1, 0.5)
    with pytest.raises(EngineError, match="rich_refit"):
        init_state(MetaConfig(**{**RICH, "rich_refit": -1}), 0.1, 0.5)


def test_the_richer_search_never_sees_a_held_back_task(monkeypatch):
    """Every objective the run builds is recorded: the constant pair's sees all tasks, every richer
    one none of the held-back tasks, and the check's only them."""
    from worker.engine import modules

    seen: list[list[str]] = []
    real = modules.make_objective

    def spy(tasks, draws, config=None):
        seen.append([t.name for t in tasks])
        return real(tasks, draws, config)

    monkeypatch.setattr(modules, "make_objective", spy)
    tasks = _tasks(8)
    cfg = MetaConfig(**RICH)
    state = run_meta(tasks, cfg, init_state(cfg, 0.05, 0.5), cfg.iterations)
    held = {"t3", "t7"}
    assert state["rich_check"]["held_back"] == [3, 7]
    assert seen[0] == [t.name for t in tasks]  # the constant pair: every task
    assert seen[-1] == ["t3", "t7"]  # the check: the held-back tasks only
    assert len(seen) == 3 and not held & set(seen[1])  # the richer search: none of them


def test_the_check_judges_with_torch_sgd_and_keeps_a_better_table():
    tasks = _tasks(4)
    cfg = MetaConfig(**RICH)
    state = run_meta(tasks, cfg, init_state(cfg, 0.05, 0.5), cfg.iterations)
    check = state["rich_check"]
    s = MetaState.from_json(state)
    # The reported losses are the mean over the check's draws of plain torch.optim.SGD on task 3.
    held = tasks[3]
    rich = best_settings({**state, "rich_check": None})
    n = len(CHECK_DRAWS)
    assert not set(CHECK_DRAWS) & set(cfg.draws)
    table = sum(train_sgd_groups(held, rich["param_groups"], rich["boundaries"], d) for d in CHECK_DRAWS) / n
    pair = [
        {**g, "lr": [s.constant.best.lr] * 2, "momentum": [s.constant.best.momentum] * 2} for g in rich["param_groups"]
    ]
    constant = sum(train_sgd_groups(held, pair, rich["boundaries"], d) for d in CHECK_DRAWS) / n
    assert check["table_loss"] == pytest.approx(table, rel=1e-5)
    assert check["constant_loss"] == pytest.approx(constant, rel=1e-5)
    assert check["kept"] == ("table" if table < constant else "constant")
    json.dumps(state)  # still plain JSON


def test_a_table_that_does_not_transfer_falls_back_to_the_pair_and_says_why():
    tasks = _tasks(4)
    cfg = MetaConfig(**RICH)
    state = run_meta(tasks, cfg, init_state(cfg, 0.05, 0.5), cfg.iterations - 1)
    assert state["rich_check"] is None  # not yet at the end
    # Make the table's best point one that diverges (lr at the upper bound, momentum near 1).
    rich = state["rich"]
    half = len(rich["best"]["theta"]) // 2
    rich["best"]["theta"] = [math.log(10.0)] * half + [8.0] * half
    checked = check_rich(tasks, cfg, state)
    assert checked["rich_check"]["kept"] == "constant" and "held back" in checked["rich_check"]["reason"]
    best = best_settings(checked)
    assert best["rich_check"]["kept"] == "constant"
    for g in best["param_groups"]:  # the constant pair, in the table's form
        assert g["lr"] == [best["lr"]] * 2 and g["momentum"] == [best["momentum"]] * 2
    assert check_rich(tasks, cfg, checked) == checked  # once only


def test_without_enough_tasks_or_with_the_check_off_the_table_sees_every_task():
    cfg = MetaConfig(**RICH, rich_holdout=0)
    tasks = _tasks(4)
    state = run_meta(tasks, cfg, init_state(cfg, 0.05, 0.5), cfg.iterations)
    assert state["rich_check"] is None and "param_groups" in best_settings(state)
    three = MetaConfig(**RICH)
    state = run_meta(tasks[:3], three, init_state(three, 0.05, 0.5), three.iterations)
    assert state["rich_check"] is None


def _run(loss: str, hidden: tuple[int, ...], records: list | None = None):
    tasks = [synthetic_task(loss=loss, hidden=hidden, seed=i, name=f"t{i}") for i in range(4)]
    cfg = MetaConfig(
        per_layer=True, schedule_segments=2, iterations=16, rich_refit=3, search="line", rich_holdout_min_tasks=4
    )
    on = None if records is None else records.append
    return tasks, cfg, run_meta(tasks, cfg, init_state(cfg, 0.05, 0.5), cfg.iterations, on_iteration=on)


def test_a_table_that_passes_is_refit_over_every_task():
    """rich_refit=3: the check is the 3rd-last iteration; after it the table's losses are those of
    every task (held-back ones too), and the table returned is the refit one."""
    import torch

    from worker.engine.functional import Objective

    records: list[dict] = []
    tasks, cfg, state = _run("mse", (8,), records)
    phases = [r["phase"] for r in records]
    assert phases[-3] == "rich_check" and "rich_check" not in phases[:-3]
    check = records[-3]["rich_check"]
    assert check == state["rich_check"] and check["held_back"] == [3] and check["kept"] == "table"
    assert check["table_loss"] < check["constant_loss"]
    best = best_settings(state)
    every = Objective(tasks, cfg.draws)
    lr = torch.tensor([[g["lr"] for g in best["param_groups"]]], dtype=torch.float64)
    mom = torch.tensor([[g["momentum"] for g in best["param_groups"]]], dtype=torch.float64)
    assert best["meta_loss_groups"] == pytest.approx(every.losses_values(lr, mom)[0], rel=1e-6)
    # after the check the table's loss is over every task (the refit's starting point), never worse after
    assert records[-3]["meta_loss"] == pytest.approx(records[-3]["candidate_loss"], rel=1e-9)
    assert best["meta_loss_groups"] <= records[-3]["meta_loss"]


def test_a_deeper_table_that_overfits_falls_back_on_its_own():
    """Two hidden layers, cross-entropy: the table beats the pair on the tasks it learned from but
    not on the held-back task; the pair comes back and the table's search ends at the check."""
    records: list[dict] = []
    _, _, state = _run("cross_entropy", (16, 8), records)
    check = state["rich_check"]
    assert check["kept"] == "constant" and check["table_loss"] > check["constant_loss"]
    assert [r["phase"] for r in records[-2:]] == ["converged", "converged"]
    best = best_settings(state)
    assert all(g["lr"] == [best["lr"]] * 2 for g in best["param_groups"])


def test_a_table_that_has_not_moved_is_not_checked():
    """Due right after the table starts (few iterations): the check waits until the table has left
    the constant pair, so it never compares the pair with itself and ends the table's search."""
    tasks = [synthetic_task(loss="mse", seed=i, name=f"t{i}") for i in range(4)]
    cfg = MetaConfig(
        per_layer=True, schedule_segments=2, iterations=6, rich_refit=3, search="line", rich_holdout_min_tasks=4
    )
    records: list[dict] = []
    state = run_meta(tasks, cfg, init_state(cfg, 0.05, 0.5), cfg.iterations, on_iteration=records.append)
    start = [r["phase"] for r in records].index("rich_start")
    assert records[start + 1]["phase"] != "rich_check"  # the table had not moved yet
    check = state["rich_check"]
    assert check is None or check["table_loss"] != check["constant_loss"]
