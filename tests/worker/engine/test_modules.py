"""The generic module path (worker/engine/modules.py) and the cnn builder, in float64.

Checked against plain torch.optim.SGD (train_sgd_module), central finite differences of it, and,
for an MLP, the hand-written batched unroll of functional.py on the same weights and batches.
"""

import math

import pytest
import torch
from torch import nn

from tests.helpers.tasks import synthetic_task
from worker.engine import EngineError, batch_indices, build_model, evaluate, evaluate_groups, train_sgd
from worker.engine.cnn import build_cnn, cnn_shapes, cnn_task
from worker.engine.functional import Objective, unrolled_val_loss
from worker.engine.modules import (
    ModuleObjective,
    ModuleTask,
    as_module_task,
    layer_groups,
    module_costs,
    seeded_builder,
    train_sgd_module,
    train_sgd_module_groups,
    unrolled_val_loss_module,
)
from worker.engine.reference import apply_schedule, make_optimizer

H = 1e-5
BOUNDS = (0.0, 0.999)

LAYERS = [
    {"type": "conv2d", "out_channels": 3, "kernel_size": 3, "stride": 1, "padding": 1},
    {"type": "tanh"},
    {"type": "maxpool", "kernel_size": 2},
    {"type": "conv2d", "out_channels": 2, "kernel_size": 2},
    {"type": "relu"},
    {"type": "flatten"},
    {"type": "linear", "out_features": 5},
    {"type": "tanh"},
    {"type": "linear"},
]


def image_task(loss="cross_entropy", layers=LAYERS, steps=8, batch=10, seed=3, n=40, n_val=16, side=6):
    g = torch.Generator().manual_seed(50 + seed)
    x = torch.randn(n + n_val, 2, side, side, generator=g, dtype=torch.float64)
    if loss == "cross_entropy":
        y = (x[:, 0].mean(dim=(1, 2)) > 0).long() + (x[:, 1, 0, 0] > 0).long()
        out = 3
    else:
        y = torch.stack([x[:, 0].mean(dim=(1, 2)), x[:, 1, :2, :2].mean(dim=(1, 2))], dim=1)
        out = 2
    return cnn_task("img", x[:n], y[:n], x[n:], y[n:], layers, loss, out, steps, batch, seed)


def _mom(z):
    return BOUNDS[0] + (BOUNDS[1] - BOUNDS[0]) / (1.0 + math.exp(-z))


def _ref_meta(tasks, draws, a, z):
    runs = [train_sgd_module(t, math.exp(a), _mom(z), d) for t in tasks for d in draws]
    return sum(runs) / len(runs)


# --------------------------------------------------------------------------- cnn builder


def test_cnn_names_shapes_and_seeded_init():
    model = build_cnn(LAYERS, (2, 6, 6), draw_seed=7, out_features=3)
    assert [n for n, _ in model.named_parameters()] == [
        "0.weight",
        "0.bias",
        "3.weight",
        "3.bias",
        "6.weight",
        "6.bias",
        "8.weight",
        "8.bias",
    ]
    assert layer_groups(model) == [
        ["0.weight", "0.bias"],
        ["3.weight", "3.bias"],
        ["6.weight", "6.bias"],
        ["8.weight", "8.bias"],
    ]
    x = torch.randn(4, 2, 6, 6)
    h = x
    for layer, shape in zip(model, cnn_shapes(LAYERS, (2, 6, 6), 3), strict=True):
        h = layer(h)
        assert tuple(h.shape[1:]) == shape
    assert h.shape == (4, 3)
    before = torch.random.get_rng_state()
    again = build_cnn(LAYERS, (2, 6, 6), draw_seed=7, out_features=3)
    other = build_cnn(LAYERS, (2, 6, 6), draw_seed=8, out_features=3)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters(), strict=True))
    assert not torch.equal(model[0].weight, other[0].weight)


@pytest.mark.parametrize(
    "layers, in_shape, match",
    [
        (
            [{"type": "conv2d", "out_channels": 2, "kernel_size": 5}, {"type": "flatten"}, {"type": "linear"}],
            (1, 4, 4),
            "layer 0",
        ),
        ([{"type": "flatten"}, {"type": "maxpool", "kernel_size": 2}, {"type": "linear"}], (1, 4, 4), "after flatten"),
        ([{"type": "linear", "out_features": 3}], (1, 4, 4), "flatten"),
        ([{"type": "flatten"}, {"type": "linear", "out_features": 4}], (1, 4, 4), "4 outputs but the targets need 3"),
        ([{"type": "flatten"}, {"type": "relu"}], (1, 4, 4), "end with a linear"),
    ],
)
def test_cnn_shapes_refuses_impossible_stacks(layers, in_shape, match):
    with pytest.raises(EngineError, match=match):
        cnn_shapes(layers, in_shape, 3)


# --------------------------------------------------------------------------- unroll == torch.optim.SGD


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("lr,mom", [(0.05, 0.0), (0.3, 0.9)])
def test_cnn_unroll_equals_torch_optim_sgd(loss, lr, mom):
    task = image_task(loss)
    for draw in (0, 2):
        ref = train_sgd_module(task, lr, mom, draw)
        got = float(unrolled_val_loss_module(task, lr, mom, draw, create_graph=False))
        assert math.isfinite(ref)
        assert got == pytest.approx(ref, rel=1e-12, abs=1e-14)
    # draws differ (otherwise the check above could not tell them apart)
    assert train_sgd_module(task, lr, mom, 0) != train_sgd_module(task, lr, mom, 2)
    obj = ModuleObjective([task], [0, 2])
    both = obj.losses([lr, 2 * lr], [mom, mom / 2])
    assert both[0] == pytest.approx(
        (train_sgd_module(task, lr, mom, 0) + train_sgd_module(task, lr, mom, 2)) / 2, rel=1e-12
    )
    assert both[1] == pytest.approx(
        (train_sgd_module(task, 2 * lr, mom / 2, 0) + train_sgd_module(task, 2 * lr, mom / 2, 2)) / 2, rel=1e-12
    )


def test_many_candidates_are_chunked_and_divergence_is_inf():
    task = image_task(steps=5)
    obj = ModuleObjective([task], [0, 1], max_runs=4)  # 2 candidates per chunk
    # after one step at a huge lr every relu is dead and the loss grows only linearly with lr,
    # so only an lr near the float64 limit overflows for certain
    lrs, moms = [0.01, 0.1, 0.5, 1e308, 0.2], [0.0, 0.5, 0.9, 0.9, 0.99]
    got = obj.losses(lrs, moms)
    want = [sum(train_sgd_module(task, lr, m, d) for d in (0, 1)) / 2 for lr, m in zip(lrs, moms, strict=True)]
    assert got[3] == math.inf and want[3] == math.inf
    for g, w in zip(got[:3] + got[4:], want[:3] + want[4:], strict=True):
        assert g == pytest.approx(w, rel=1e-12)
    loss, (ga, gz) = obj.value_and_grad(math.log(1e308), 2.0, BOUNDS)
    assert loss == math.inf and math.isnan(ga) and math.isnan(gz)


# --------------------------------------------------------------------------- hypergradients


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("method", ["reverse", "forward"])
def test_cnn_hypergradient_matches_central_finite_differences(loss, method):
    task = image_task(loss, steps=6)
    draws = (0, 1)
    a, z = math.log(0.2), 1.2
    loss_v, (ga, gz) = ModuleObjective([task], draws).value_and_grad(a, z, BOUNDS, method=method)
    assert loss_v == pytest.approx(_ref_meta([task], draws, a, z), rel=1e-12)
    fa = (_ref_meta([task], draws, a + H, z) - _ref_meta([task], draws, a - H, z)) / (2 * H)
    fz = (_ref_meta([task], draws, a, z + H) - _ref_meta([task], draws, a, z - H)) / (2 * H)
    assert abs(fa) > 1e-4 and abs(fz) > 1e-5
    assert ga == pytest.approx(fa, rel=1e-5, abs=1e-9)
    assert gz == pytest.approx(fz, rel=1e-5, abs=1e-9)


def test_truncated_hypergradient_differs_and_full_window_is_exact():
    task = image_task(steps=6)
    obj = ModuleObjective([task], (0,))
    a, z = math.log(0.2), 1.0
    _, full = obj.value_and_grad(a, z, BOUNDS)
    _, whole = obj.value_and_grad(a, z, BOUNDS, method="truncated", truncation=6)
    _, short = obj.value_and_grad(a, z, BOUNDS, method="truncated", truncation=2)
    assert whole == pytest.approx(full, rel=1e-12)
    assert short[0] != pytest.approx(full[0], rel=1e-3)


def _train_groups(task, draw, groups, lrs, moms, boundaries):
    """torch.optim.SGD with per-layer param groups and a piecewise-constant schedule."""
    model = task.model(draw)
    spec = [{"params": g, "lr": lr, "momentum": m} for g, lr, m in zip(groups, lrs, moms, strict=True)]
    opt = make_optimizer(model, spec, boundaries)
    idx = batch_indices(task, draw)
    for t in range(task.steps):
        apply_schedule(opt, spec, boundaries, t)
        rows = idx[t]
        loss = nn.functional.cross_entropy(model(task.x_train[rows]), task.y_train[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(task.x_val), task.y_val))


def test_per_layer_and_scheduled_values_equal_sgd_param_groups_and_fd():
    task = image_task(steps=7)
    obj = ModuleObjective([task], (1,))
    groups = obj.layer_groups()
    assert len(groups) == 4
    lrs = [[0.1, 0.3], [0.2, 0.05], [0.15, 0.15], [0.4, 0.1]]
    moms = [[0.5, 0.9], [0.05, 0.7], [0.8, 0.2], [0.6, 0.6]]  # no exact 0 in a schedule: see below
    boundaries = [0, 3]  # segment_boundaries(7, 2)
    # (An exact momentum of 0 in one segment is avoided: torch.optim.SGD keeps no buffer while
    # momentum == 0 and restarts it at g afterwards; the engine's momenta are never exactly 0.)
    want = _train_groups(task, 1, groups, lrs, moms, boundaries)
    spec = [{"params": g, "lr": lr, "momentum": m} for g, lr, m in zip(groups, lrs, moms, strict=True)]
    assert train_sgd_module_groups(task, spec, boundaries, 1) == pytest.approx(want, rel=1e-12)
    assert evaluate_groups([task], spec, boundaries, [1])["mean_val_loss"] == pytest.approx(want, rel=1e-12)
    got = obj.losses_values(torch.tensor([lrs], dtype=torch.float64), torch.tensor([moms], dtype=torch.float64))
    assert got[0] == pytest.approx(want, rel=1e-12)
    # gradient of one table entry (layer 2, segment 1) against central differences
    a = torch.tensor(lrs, dtype=torch.float64).log()
    m = torch.tensor(moms, dtype=torch.float64)
    z = torch.log(m / (BOUNDS[1] - m))
    loss, ga, gz = obj.value_and_grad_values(a, z, BOUNDS)
    assert loss == pytest.approx(want, rel=1e-12)

    def at(da, dz):
        a2, z2 = a.clone(), z.clone()
        a2[2, 1] += da
        z2[2, 1] += dz
        l2 = a2.exp().tolist()
        m2 = (BOUNDS[1] * torch.sigmoid(z2)).tolist()
        return _train_groups(task, 1, groups, l2, m2, boundaries)

    fa = (at(H, 0) - at(-H, 0)) / (2 * H)
    fz = (at(0, H) - at(0, -H)) / (2 * H)
    assert abs(fa) > 1e-5 and abs(fz) > 1e-6
    assert float(ga[2, 1]) == pytest.approx(fa, rel=1e-5, abs=1e-9)
    assert float(gz[2, 1]) == pytest.approx(fz, rel=1e-5, abs=1e-9)
    _, fga, fgz = obj.value_and_grad_values(a, z, BOUNDS, method="forward")
    assert torch.allclose(fga, ga, rtol=1e-9) and torch.allclose(fgz, gz, rtol=1e-9)


# --------------------------------------------------------------------------- the MLP, both ways


@pytest.mark.parametrize(
    "loss,hidden,activation", [("cross_entropy", (8,), "tanh"), ("mse", (6, 5), "gelu"), ("cross_entropy", (), "relu")]
)
def test_mlp_through_modules_equals_the_batched_mlp_path(loss, hidden, activation):
    task = synthetic_task(loss=loss, hidden=hidden, activation=activation, out=3, steps=9)
    mtask = as_module_task(task)
    # the same nn.Sequential, built the documented way (seeded_builder + the mlp naming rule)
    sizes = [task.x_train.shape[1], *hidden, task.out_features]
    acts = {"tanh": nn.Tanh, "gelu": nn.GELU, "relu": nn.ReLU}

    def build():
        layers = []
        for i in range(len(sizes) - 1):
            if i:
                layers.append(acts[activation]())
            layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        return nn.Sequential(*layers)

    seeded = ModuleTask(
        name="seeded",
        x_train=task.x_train,
        y_train=task.y_train,
        x_val=task.x_val,
        y_val=task.y_val,
        loss=loss,
        steps=task.steps,
        batch_size=task.batch_size,
        seed=task.seed,
        make_model=seeded_builder(build, task.seed),
    )
    for d in (0, 3):
        ref = build_model(task, d).state_dict()
        for t in (mtask, seeded):
            got = t.model(d).state_dict()
            assert all(torch.equal(ref[k], got[k]) for k in ref)
    lr, mom = 0.15, 0.8
    ref = train_sgd(task, lr, mom, 3)
    assert train_sgd_module(seeded, lr, mom, 3) == pytest.approx(ref, rel=1e-12)
    assert float(unrolled_val_loss_module(seeded, lr, mom, 3)) == pytest.approx(
        float(unrolled_val_loss(task, lr, mom, 3, create_graph=False)), rel=1e-12
    )
    draws = (0, 3)
    a, z = math.log(lr), 0.7
    mlp = Objective([task], draws).value_and_grad(a, z, BOUNDS)
    gen = ModuleObjective([seeded], draws).value_and_grad(a, z, BOUNDS)
    assert gen[0] == pytest.approx(mlp[0], rel=1e-12)
    assert gen[1][0] == pytest.approx(mlp[1][0], rel=1e-9)
    assert gen[1][1] == pytest.approx(mlp[1][1], rel=1e-9)
    assert abs(mlp[1][0]) > 1e-4
    lrs, moms = [0.05, 0.3], [0.9, 0.2]
    assert ModuleObjective([task], draws).losses(lrs, moms) == pytest.approx(
        Objective([task], draws).losses(lrs, moms), rel=1e-12
    )


def test_mixed_tasks_and_evaluate():
    mlp = synthetic_task(steps=5)
    img = image_task(steps=5)
    obj = ModuleObjective([mlp, img], (0, 1))
    got = obj.losses([0.1], [0.5])[0]
    want = (
        sum(train_sgd(mlp, 0.1, 0.5, d) for d in (0, 1)) + sum(train_sgd_module(img, 0.1, 0.5, d) for d in (0, 1))
    ) / 4
    assert got == pytest.approx(want, rel=1e-12)
    ev = evaluate([mlp, img], 0.1, 0.5, (0, 1))
    assert ev["mean_val_loss"] == pytest.approx(want, rel=1e-12)
    assert [r["name"] for r in ev["tasks"]] == [mlp.name, img.name]


# --------------------------------------------------------------------------- refusals and costs


def test_refusals_are_sentences():
    task = image_task()
    bad_labels = ModuleTask(**{**task.__dict__, "y_val": task.y_val + 5})
    with pytest.raises(EngineError, match="between 0 and 2"):
        ModuleObjective([bad_labels], (0,))
    bn = ModuleTask(
        **{
            **task.__dict__,
            "make_model": lambda d: nn.Sequential(
                nn.Conv2d(2, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(32, 3)
            ),
        }
    )
    with pytest.raises(EngineError, match="BatchNorm2d"):
        ModuleObjective([bn], (0,))
    with pytest.raises(EngineError, match="batch size"):
        ModuleObjective([ModuleTask(**{**task.__dict__, "batch_size": 41})], (0,))


def test_module_costs_counts_parameters_and_activations():
    task = image_task()
    c = module_costs(task)
    model = task.model(0)
    assert c["params"] == sum(p.numel() for p in model.parameters())
    # input 2*6*6, conv 3*6*6, tanh 3*6*6, pool 3*3*3, conv 2*2*2, relu 2*2*2, flatten 8, linear 5, tanh 5, linear 3
    assert c["activations_per_example"] == 72 + 108 + 108 + 27 + 8 + 8 + 8 + 5 + 5 + 3


def test_dispatch_helpers_for_the_meta_loop():
    from worker.engine.modules import cost_terms, make_objective, param_layout

    mlp = synthetic_task(hidden=(8,), features=5, out=3)
    img = image_task()
    assert type(make_objective([mlp], (0,))) is Objective
    assert type(make_objective([mlp, img], (0,))) is ModuleObjective
    assert param_layout(mlp) == param_layout(as_module_task(mlp)) == [["0.weight", "0.bias"], ["2.weight", "2.bias"]]
    assert param_layout(img) == ModuleObjective([img], (0,)).layer_groups()
    assert cost_terms(mlp) == (5 * 8 + 8 + 8 * 3 + 3, 5 + 2 * (8 + 3))
    # module view of the same MLP: same parameters; activations = input + Linear, Tanh, Linear outputs
    assert cost_terms(as_module_task(mlp)) == (5 * 8 + 8 + 8 * 3 + 3, 5 + 8 + 8 + 3)
