"""The functional, batched unroll reproduces the reference (torch.optim.SGD on nn.Sequential)."""

import math

import pytest
import torch

from tests.helpers.tasks import synthetic_task
from worker.engine import EVAL_DRAWS, MetaConfig, evaluate, train_sgd, unrolled_val_loss
from worker.engine.functional import Objective


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


@pytest.mark.parametrize("activation", ["tanh", "relu", "sigmoid", "gelu"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("hidden", [(), (8,), (6, 5)])
def test_unrolled_val_loss_equals_train_sgd(activation, loss, hidden):
    task = synthetic_task(loss=loss, hidden=hidden, activation=activation, steps=9)
    for lr, mom in [(0.1, 0.0), (0.05, 0.9)]:
        ref = train_sgd(task, lr, mom, draw=2)
        got = unrolled_val_loss(task, _t(lr), _t(mom), draw=2)
        assert math.isfinite(ref)
        assert got.item() == pytest.approx(ref, rel=1e-12, abs=1e-13)
        plain = unrolled_val_loss(task, lr, mom, draw=2, create_graph=False)
        assert not plain.requires_grad
        assert plain.item() == pytest.approx(ref, rel=1e-12, abs=1e-13)


def test_unroll_spans_several_epochs():
    task = synthetic_task(n=40, batch=16, steps=11)  # 2 batches per epoch, 6 epochs
    assert unrolled_val_loss(task, 0.2, 0.5).item() == pytest.approx(train_sgd(task, 0.2, 0.5), rel=1e-12)


def test_batched_objective_equals_train_sgd_for_every_candidate_and_source():
    tasks = [
        synthetic_task(seed=0),
        synthetic_task(seed=1, n_val=13),  # another validation size, same group
        synthetic_task(seed=2, hidden=(), loss="mse", out=2),  # another shape: a second group
    ]
    draws = (0, 3)
    lrs, moms = [0.01, 0.1, 0.3, 0.05], [0.0, 0.5, 0.9, 0.99]
    got = Objective(tasks, draws, max_runs=5).losses(lrs, moms)  # max_runs forces chunking
    for lr, mom, value in zip(lrs, moms, got, strict=True):
        ref = sum(train_sgd(t, lr, mom, d) for t in tasks for d in draws) / (len(tasks) * len(draws))
        assert value == pytest.approx(ref, rel=1e-12)


def test_divergence_is_reported_not_raised():
    task = synthetic_task(loss="mse", hidden=(), out=2, steps=40)
    assert train_sgd(task, 1e4, 0.9) == math.inf
    assert not math.isfinite(unrolled_val_loss(task, 1e4, 0.9).item())
    assert Objective([task], (0,)).losses([1e4, 0.1], [0.9, 0.0])[0] == math.inf


def test_evaluate_averages_draws_then_tasks():
    tasks = [synthetic_task(seed=0), synthetic_task(seed=1)]
    out = evaluate(tasks, 0.1, 0.5, draws=(1, 2))
    per = [[train_sgd(t, 0.1, 0.5, d) for d in (1, 2)] for t in tasks]
    assert [r["name"] for r in out["tasks"]] == [t.name for t in tasks]
    for row, values in zip(out["tasks"], per, strict=True):
        assert row["val_loss"] == pytest.approx(sum(values) / 2, rel=1e-15)
    assert out["mean_val_loss"] == pytest.approx(sum(sum(v) for v in per) / 4, rel=1e-15)


def test_evaluation_draws_are_disjoint_from_training_draws():
    assert not set(EVAL_DRAWS) & set(MetaConfig().draws)
