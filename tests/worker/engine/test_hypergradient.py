"""Reverse-mode hypergradients against central finite differences of the reference, in float64."""

import math

import pytest

from tests.helpers.tasks import synthetic_task
from worker.engine import MetaConfig, hypergradient, momentum_to_param, param_to_momentum, train_sgd

H = 1e-5


def _reference_meta_loss(tasks, log_lr, z, config):
    mom = param_to_momentum(z, config.momentum_bounds)
    runs = [train_sgd(t, math.exp(log_lr), mom, d) for t in tasks for d in config.draws]
    return sum(runs) / len(runs)


def _check(tasks, lr, mom, config):
    a, z = math.log(lr), momentum_to_param(mom, config.momentum_bounds)
    loss, (ga, gz) = hypergradient(tasks, a, z, config)
    assert loss == pytest.approx(_reference_meta_loss(tasks, a, z, config), rel=1e-12)
    fa = (_reference_meta_loss(tasks, a + H, z, config) - _reference_meta_loss(tasks, a - H, z, config)) / (2 * H)
    fz = (_reference_meta_loss(tasks, a, z + H, config) - _reference_meta_loss(tasks, a, z - H, config)) / (2 * H)
    # both coordinates matter here: the check would catch a dropped or mis-scaled term
    assert abs(fa) > 1e-4 and abs(fz) > 1e-5
    assert ga == pytest.approx(fa, rel=1e-5, abs=1e-9)
    assert gz == pytest.approx(fz, rel=1e-5, abs=1e-9)


@pytest.mark.parametrize(
    "loss,hidden,activation",
    [
        ("cross_entropy", (8,), "tanh"),
        ("cross_entropy", (), "tanh"),
        ("mse", (8,), "gelu"),
        ("mse", (), "tanh"),
        ("cross_entropy", (6, 5), "sigmoid"),
    ],
)
@pytest.mark.parametrize("lr,mom", [(0.05, 0.5), (0.2, 0.9)])
def test_hypergradient_matches_central_finite_differences(loss, hidden, activation, lr, mom):
    config = MetaConfig(draws=(0,))
    tasks = [synthetic_task(loss=loss, hidden=hidden, activation=activation, steps=10)]
    _check(tasks, lr, mom, config)


def test_hypergradient_over_several_tasks_and_draws_with_other_bounds():
    config = MetaConfig(draws=(0, 4), momentum_bounds=(0.1, 0.95))
    tasks = [
        synthetic_task(seed=0, steps=8),
        synthetic_task(seed=1, steps=8, hidden=(), loss="mse", out=2),
    ]
    _check(tasks, 0.08, 0.7, config)
