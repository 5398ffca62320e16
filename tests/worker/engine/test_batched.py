"""Tasks batched across tasks on the module path (module_unroll.py, batched.py, batched_reference.py),
in float64: one unroll over every (task, draw, candidate) gives the per-task meta-losses and
hypergradients, the losses of plain torch.optim.SGD (train_sgd_module), and hypergradients equal to
central finite differences of it."""

import math

import pytest
import torch
from torch import nn

from service.exported_files import read_pt2, read_weights
from worker.engine import batched, evaluate, evaluate_groups
from worker.engine.cnn import cnn_task
from worker.engine.exported import exported_task
from worker.engine.functional import segment_boundaries
from worker.engine.modules import ModuleObjective, ModuleTask, seeded_builder, train_sgd_module, train_sgd_module_groups

BOUNDS = (0.0, 0.999)
H = 1e-5
# the network (conv, relu, maxpool, linear) and one with padding, a second conv and tanh
DIGITS = [
    {"type": "conv2d", "out_channels": 4, "kernel_size": 3},
    {"type": "relu"},
    {"type": "maxpool", "kernel_size": 2},
    {"type": "flatten"},
    {"type": "linear"},
]
DEEP = [
    {"type": "conv2d", "out_channels": 3, "kernel_size": 3, "stride": 1, "padding": 1},
    {"type": "tanh"},
    {"type": "avgpool", "kernel_size": 2},
    {"type": "conv2d", "out_channels": 2, "kernel_size": 2, "stride": 2},
    {"type": "relu"},
    {"type": "flatten"},
    {"type": "linear", "out_features": 5},
    {"type": "tanh"},
    {"type": "linear"},
]


def images(seed, n, n_val, side=6, loss="cross_entropy"):
    g = torch.Generator().manual_seed(70 + seed)
    x = torch.randn(n + n_val, 2, side, side, generator=g, dtype=torch.float64)
    if loss == "cross_entropy":
        y = (x[:, 0].mean(dim=(1, 2)) > 0).long() + (x[:, 1, 0, 0] > 0).long()
    else:
        y = torch.stack([x[:, 0].mean(dim=(1, 2)), x[:, 1, :2, :2].mean(dim=(1, 2))], dim=1)
    return x[:n], y[:n], x[n:], y[n:]


def family(layers=DIGITS, loss="cross_entropy", sizes=((40, 16), (36, 12), (40, 16)), steps=7, batch=8):
    """Tasks of one shape: different data, training and validation sizes, seeds."""
    out = 3 if loss == "cross_entropy" else 2
    return [
        cnn_task(f"t{i}", *images(i, n, nv, loss=loss), layers, loss, out, steps, batch, seed=10 + i)
        for i, (n, nv) in enumerate(sizes)
    ]


def _z(mom):
    return math.log((mom - BOUNDS[0]) / (BOUNDS[1] - mom))


def _sgd_mean(tasks, draws, lr, mom):
    return sum(train_sgd_module(t, lr, mom, d) for t in tasks for d in draws) / (len(tasks) * len(draws))


@pytest.mark.parametrize("layers,loss", [(DIGITS, "cross_entropy"), (DEEP, "cross_entropy"), (DEEP, "mse")])
def test_one_unroll_over_tasks_equals_each_task_alone_and_torch_sgd(layers, loss):
    tasks = family(layers, loss)
    draws = (0, 2)
    obj = ModuleObjective(tasks, draws)
    assert len(obj.groups) == 1 and obj.groups[0].n_sources == 6 and obj.groups[0].program is not None
    assert len(obj.groups[0].val) == 2  # 16 and 12 validation rows: two validation passes
    lrs, moms = [0.05, 0.01, 0.2], [0.9, 0.0, 0.5]
    batched_losses = obj.losses(lrs, moms)
    alone = [ModuleObjective([t], draws).losses(lrs, moms) for t in tasks]
    for k, (lr, mom) in enumerate(zip(lrs, moms, strict=True)):
        want = _sgd_mean(tasks, draws, lr, mom)
        assert math.isfinite(want)
        assert batched_losses[k] == pytest.approx(want, rel=1e-10)
        assert batched_losses[k] == pytest.approx(sum(a[k] for a in alone) / len(tasks), rel=1e-12)


@pytest.mark.parametrize("method", ["reverse", "forward", "truncated"])
def test_cross_task_hypergradient_equals_the_per_task_ones(method):
    tasks = family(DEEP)
    draws = (1, 3)
    a, z = math.log(0.05), _z(0.8)
    loss, (ga, gz) = ModuleObjective(tasks, draws).value_and_grad(a, z, BOUNDS, method, truncation=3)
    parts = [ModuleObjective([t], draws).value_and_grad(a, z, BOUNDS, method, truncation=3) for t in tasks]
    assert loss == pytest.approx(sum(p[0] for p in parts) / len(tasks), rel=1e-12)
    assert ga == pytest.approx(sum(p[1][0] for p in parts) / len(tasks), rel=1e-9)
    assert gz == pytest.approx(sum(p[1][1] for p in parts) / len(tasks), rel=1e-9)


def test_cross_task_hypergradient_equals_finite_differences_of_torch_sgd():
    tasks = family(DIGITS)
    draws = (0, 1)
    a, z = math.log(0.05), _z(0.7)
    loss, (ga, gz) = ModuleObjective(tasks, draws).value_and_grad(a, z, BOUNDS)

    def f(av, zv):
        mom = BOUNDS[0] + (BOUNDS[1] - BOUNDS[0]) / (1.0 + math.exp(-zv))
        return _sgd_mean(tasks, draws, math.exp(av), mom)

    assert loss == pytest.approx(f(a, z), rel=1e-10)
    assert ga == pytest.approx((f(a + H, z) - f(a - H, z)) / (2 * H), rel=1e-5, abs=1e-9)
    assert gz == pytest.approx((f(a, z + H) - f(a, z - H)) / (2 * H), rel=1e-5, abs=1e-9)
    assert abs(ga) > 1e-4 and abs(gz) > 1e-4  # not a trivially flat point


def test_per_layer_scheduled_values_across_tasks_equal_torch_sgd_groups():
    tasks = family(DIGITS)
    obj = ModuleObjective(tasks, (0, 1))
    groups = obj.layer_groups()
    lrs = [[0.05, 0.02], [0.1, 0.03]]
    moms = [[0.9, 0.5], [0.3, 0.8]]
    boundaries = segment_boundaries(7, 2)  # the engine's equal blocks of the 7 steps
    spec = [{"params": g, "lr": lr, "momentum": m} for g, lr, m in zip(groups, lrs, moms, strict=True)]
    want = sum(train_sgd_module_groups(t, spec, boundaries, d) for t in tasks for d in (0, 1)) / 6
    got = obj.losses_values(torch.tensor([lrs], dtype=torch.float64), torch.tensor([moms], dtype=torch.float64))
    assert got[0] == pytest.approx(want, rel=1e-10)
    assert evaluate_groups(tasks, spec, boundaries, (0, 1))["mean_val_loss"] == pytest.approx(want, rel=1e-10)


def test_batched_evaluation_equals_one_reference_run_per_task_and_draw():
    tasks = family(DEEP, "mse")
    draws = [5, 6, 7]
    out = evaluate(tasks, 0.05, 0.9, draws)
    for row, t in zip(out["tasks"], tasks, strict=True):
        want = sum(train_sgd_module(t, 0.05, 0.9, d) for d in draws) / len(draws)
        assert row["val_loss"] == pytest.approx(want, rel=1e-10)
    # a diverging setting scores inf, as torch.optim.SGD's fit does
    assert _sgd_mean(tasks, draws, 1e30, 0.99) == math.inf
    assert evaluate(tasks, 1e30, 0.99, draws)["mean_val_loss"] == math.inf


def test_tasks_of_other_shapes_or_unknown_modules_get_groups_of_their_own():
    base = family(DIGITS)[:2]
    other_steps = cnn_task("s", *images(5, 40, 16), DIGITS, "cross_entropy", 3, 6, 8, seed=3)  # 6 steps, not 7
    wider = cnn_task("w", *images(6, 40, 16, side=8), DIGITS, "cross_entropy", 3, 7, 8, seed=4)

    class Custom(nn.Module):  # not a chain the engine reads: vmap over functional_call, per task
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3)
            self.out = nn.Linear(32, 3)

        def forward(self, x):
            return self.out(torch.relu(self.conv(x)).flatten(1))

    x, y, xv, yv = images(7, 40, 16)
    custom = [
        ModuleTask(f"c{i}", x, y, xv, yv, "cross_entropy", 7, 8, i, seeded_builder(lambda: Custom().double(), i))
        for i in range(2)
    ]
    tasks = [*base, other_steps, wider, *custom]
    obj = ModuleObjective(tasks, (0,))
    assert [len(g.tasks) for g in obj.groups] == [2, 1, 1, 1, 1]
    assert [g.program is None for g in obj.groups] == [False, False, False, True, True]
    got = obj.losses([0.05], [0.5])[0]
    assert got == pytest.approx(_sgd_mean(tasks, (0,), 0.05, 0.5), rel=1e-10)


def test_exported_programs_batch_across_tasks_like_the_cnn(tmp_path):
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16, 3))
    path = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(net, (torch.randn(5, 2, 6, 6),)), str(path))
    program = read_pt2(path)
    weights = read_weights(path, program)
    cnns = family(DIGITS)
    exported = [
        exported_task(f"e{i}", t.x_train, t.y_train, t.x_val, t.y_val, program, weights, t.loss, 7, 8, t.seed)
        for i, t in enumerate(cnns)
    ]
    obj = ModuleObjective(exported, (0, 1))
    assert len(obj.groups) == 1 and obj.groups[0].program is not None
    a, z = math.log(0.05), _z(0.6)
    loss, grad = obj.value_and_grad(a, z, BOUNDS)
    want_loss, want_grad = ModuleObjective(cnns, (0, 1)).value_and_grad(a, z, BOUNDS)  # the same network
    assert loss == pytest.approx(want_loss, rel=1e-12) and grad == pytest.approx(want_grad, rel=1e-9)
    assert obj.losses([0.05], [0.6])[0] == pytest.approx(_sgd_mean(exported, (0, 1), 0.05, 0.6), rel=1e-10)


def test_program_of_refuses_what_it_cannot_batch():
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    grouped = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(64, 3)).double()
    flat0 = nn.Sequential(nn.Conv2d(2, 1, 3), nn.Flatten(0), nn.Linear(32, 3)).double()
    norm = nn.Sequential(nn.Conv2d(2, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(32, 3)).double()
    for model in (grouped, flat0, norm):
        assert batched.program_of(model, x) is None
    plain = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16, 3)).double()
    program = batched.program_of(plain, x)
    assert program is not None
    assert [op[0] for op in program.ops] == ["conv2d", "max_pool2d", "relu", "flatten", "linear"]
