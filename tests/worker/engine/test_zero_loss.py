"""Validation losses that do not round to zero, and ties at zero loss going to the safer point.

The cause of issue 10 item 7 (tests/worker/data/blobs.npz, three separable blobs): F.cross_entropy
in float32 rounds the validation loss of a confident network to exactly 0.0, so the meta-loss was
0.0 from the first iteration at lr 0.1, momentum 0.99, where nothing can beat it, although two of
the three evaluation draws diverge there. tests/worker/test_blobs_regression.py runs the same job
through the runner.
"""

from __future__ import annotations

import math
import pathlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradtune.spec.hyper import momentum_to_param
from tests.helpers.tasks import synthetic_task
from worker.engine import EVAL_DRAWS, MetaConfig, Task, best_settings, evaluate, init_state, run_meta
from worker.engine.functional import Objective
from worker.engine.losses import cross_entropy_terms, mean_floor, val_loss, zero_loss_floor
from worker.engine.meta.loop import _population
from worker.engine.meta.search import Search, clamp_theta, constant_policy, lower, values
from worker.engine.tasks import batch_indices, build_model

BLOBS = pathlib.Path(__file__).resolve().parents[1] / "data" / "blobs.npz"
EPS32 = 2.0**-23


def _exact_ce(logits: list[float], target: int) -> float:
    """logsumexp(z) - z_y with Python floats: exp of the differences from the target's logit."""
    zy = logits[target]
    others = [math.exp(z - zy) for i, z in enumerate(logits) if i != target]
    if max(logits) == zy:
        return math.log1p(math.fsum(others))
    return math.log(1.0 + math.fsum(others))


@pytest.mark.parametrize("margin", [0.5, 5.0, 17.0, 40.0, 100.0, 700.0])
def test_cross_entropy_keeps_the_loss_of_a_confident_prediction(margin):
    logits = [0.0, -margin, -margin - 3.0]
    want = _exact_ce(logits, 0)
    got = float(cross_entropy_terms(torch.tensor([logits], dtype=torch.float32), torch.tensor([0]))[0])
    assert want > 0.0 and got == pytest.approx(want, rel=1e-12)
    float32 = float(F.cross_entropy(torch.tensor([logits], dtype=torch.float32), torch.tensor([0])))
    if math.exp(-margin) < EPS32 / 2:  # the cause: float32's log(1 + tiny) is exactly 0
        assert float32 == 0.0
    else:
        assert float32 == pytest.approx(want, rel=1e-5)


def test_cross_entropy_matches_the_reference_and_its_gradient_is_softmax_minus_onehot():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(64, 5, generator=g, dtype=torch.float64) * 30.0).requires_grad_(True)
    target = torch.randint(0, 5, (64,), generator=g)
    mine = cross_entropy_terms(logits, target)
    assert mine.dtype == torch.float64
    ref = F.cross_entropy(logits, target, reduction="none")
    big = ref > 1e-6  # below, float64's log(1 + tiny) rounds too (the exact reference covers those)
    assert big.sum() > 32 and (~big).sum() > 0
    assert torch.allclose(mine[big], ref[big], rtol=1e-12, atol=0.0)
    exact = [_exact_ce(row, int(t)) for row, t in zip(logits.tolist(), target.tolist(), strict=True)]
    assert torch.allclose(mine, torch.tensor(exact, dtype=torch.float64), rtol=1e-12, atol=0.0)
    (grad,) = torch.autograd.grad(mine.sum(), logits)
    want = torch.softmax(logits.detach(), dim=-1) - F.one_hot(target, 5).double()
    assert torch.allclose(grad, want, rtol=1e-10, atol=1e-15)
    mean = float(val_loss("cross_entropy", logits.detach(), target))
    assert mean == pytest.approx(float(ref.detach().mean()), rel=1e-9)
    y = torch.randn(64, 5, generator=g, dtype=torch.float64)
    assert float(val_loss("mse", logits, y)) == float(F.mse_loss(logits, y))


def test_the_floor_is_the_precision_of_the_task():
    t32 = synthetic_task(dtype=torch.float32)
    t64 = synthetic_task()
    assert zero_loss_floor("cross_entropy", t32.y_val, torch.float32) == EPS32
    assert zero_loss_floor("cross_entropy", t64.y_val, torch.float64) == 2.0**-52
    reg = synthetic_task(loss="mse", out=2, dtype=torch.float32)
    assert zero_loss_floor("mse", reg.y_val) == pytest.approx(EPS32**2 * float((reg.y_val.double() ** 2).mean()))
    assert mean_floor([t32, reg]) == pytest.approx((EPS32 + EPS32**2 * float((reg.y_val.double() ** 2).mean())) / 2)


# --------------------------------------------------------------------------- ties at the floor


class _Floor:
    def __init__(self, floor: float):
        self._floor = floor

    def floor(self) -> float:
        return self._floor


def test_losses_at_the_floor_tie_and_go_to_the_smaller_effective_learning_rate():
    assert lower(1.0, 2.0, 0.1) and not lower(2.0, 1.0, 0.1) and not lower(1.0, 1.0, 0.1)
    assert lower(0.05, 0.2, 0.1)  # reaching the floor from above is an improvement
    assert not lower(0.0, 0.05, 0.1) and not lower(1e-60, 0.1, 0.1)  # both at the floor: a tie
    config = MetaConfig()
    search = Search(config, constant_policy(config), _Floor(1e-6))  # type: ignore[arg-type]

    def theta(lr: float, m: float) -> list[float]:
        return [math.log(lr), momentum_to_param(m, config.momentum_bounds)]

    cands = [theta(0.1, 0.99), theta(0.01, 0.99), theta(0.1, 0.5), theta(0.03, 0.9), theta(1.0, 0.9)]
    losses = [0.0, 4e-9, 3e-6, 2e-6, math.inf]
    # reach lr / (1 - m): 10, 1, 0.2, 0.3; the two at the floor tie, the safer first; then by loss
    assert [i for _, i in search.rank(cands, losses)] == [1, 0, 3, 2]
    assert search.reach(cands[0]) == pytest.approx(10.0) and search.reach(cands[2]) == pytest.approx(0.2)
    # above the floor nothing changes: the lower loss first, equal losses in candidate order
    assert [i for _, i in search.rank(cands[:4], [0.3, 0.2, 0.2, 0.1])] == [3, 1, 2, 0]


def blobs_task(split_seed: int = 0) -> Task:
    """The issue's job as the runner builds it: val_fraction 0.2, split seed 0, mlp [16] relu,
    cross-entropy, 100 steps of batch 32, task seed of meta seed 0 and index 0."""
    data = np.load(BLOBS)
    x, y = data["x"], data["y"]
    perm = np.random.default_rng(split_seed).permutation(len(x))
    n_val = round(len(x) * 0.2)
    val, train = perm[:n_val], perm[n_val:]
    return Task(
        name="blobs",
        x_train=torch.from_numpy(x[train]),
        y_train=torch.from_numpy(y[train]),
        x_val=torch.from_numpy(x[val]),
        y_val=torch.from_numpy(y[val]),
        hidden=(16,),
        activation="relu",
        loss="cross_entropy",
        out_features=3,
        steps=100,
        batch_size=32,
        seed=0,
    )


def test_on_separable_blobs_float32_cross_entropy_is_exactly_zero_and_ours_is_not():
    task = blobs_task()
    model = build_model(task, 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.99)
    for rows in batch_indices(task, 0):
        loss = F.cross_entropy(model(task.x_train[rows]), task.y_train[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = model(task.x_val)
    margins = out.gather(1, task.y_val.unsqueeze(1)).squeeze(1) - out.scatter(1, task.y_val.unsqueeze(1), -1e30).amax(1)
    assert float(margins.min()) > 17.0  # every validation example: exp(-margin) < eps32 / 2
    assert float(F.cross_entropy(out, task.y_val)) == 0.0
    ours = float(val_loss("cross_entropy", out, task.y_val))
    assert 0.0 < ours < EPS32


def test_the_blobs_search_keeps_a_positive_meta_loss_and_is_not_worse_than_the_start():
    task = blobs_task()
    config = MetaConfig(iterations=20)
    records: list[dict] = []
    state = run_meta([task], config, init_state(config, 0.01, 0.9), 20, on_iteration=records.append)
    assert all(r["meta_loss"] is not None and r["meta_loss"] > 0.0 for r in records)
    best = best_settings(state)
    assert best["meta_loss"] > 0.0
    start = evaluate([task], 0.01, 0.9, EVAL_DRAWS)["mean_val_loss"]
    learned = evaluate([task], best["lr"], best["momentum"], EVAL_DRAWS)["mean_val_loss"]
    assert learned < start
    # The start's population (the starting lr times 10**(k/2), |k| <= 4, at 5 momenta) had several
    # points at the floor; the one kept has the smallest lr / (1 - momentum) among them.
    cands = _population(config, clamp_theta(config, [math.log(0.01), momentum_to_param(0.9, config.momentum_bounds)]))
    pairs = [values(config, c, 1, 1) for c in cands]
    lrs, moms = [p[0][0][0] for p in pairs], [p[1][0][0] for p in pairs]
    losses = Objective([task], config.draws).losses(lrs, moms)
    at_floor = sorted((lr / (1.0 - m), lr, m) for lr, m, loss in zip(lrs, moms, losses, strict=True) if loss <= EPS32)
    assert len(at_floor) >= 2 and min(losses) < records[0]["meta_loss"]  # a tie, not the lowest loss
    assert records[0]["phase"] == "start" and records[0]["meta_loss"] <= EPS32
    assert (records[0]["lr"], records[0]["momentum"]) == pytest.approx(at_floor[0][1:], rel=1e-12)
