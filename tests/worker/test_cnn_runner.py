"""A cnn job end to end below the meta-loop: the job body -> runner.build_tasks -> ModuleTask ->
ModuleObjective, on scikit-learn's digits as (N, 1, 8, 8) images; and 4-D uploaded tensors through
the dataset loader."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from service.main import create_app
from service.schemas import JobCreate
from tests.helpers.dataset_files import npz_bytes
from tests.helpers.support import keyed_client
from worker import dataset_loader, engine, runner
from worker.dataset_loader import load_dataset_task_data
from worker.engine.cnn import build_cnn
from worker.engine.modules import ModuleObjective, ModuleTask, train_sgd_module
from worker.engine.tasks import derive_seed

LAYERS = [
    {"type": "conv2d", "out_channels": 4, "kernel_size": 3, "padding": 1},
    {"type": "tanh"},
    {"type": "maxpool", "kernel_size": 2},
    {"type": "flatten"},
    {"type": "linear"},
]
BOUNDS = (0.0, 0.999)
H = 1e-5


def digits_images(n_train=160, n_val=60):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).reshape(-1, 1, 8, 8)
    perm = np.random.default_rng(0).permutation(len(x))
    tr, va = perm[:n_train], perm[n_train : n_train + n_val]
    return x[tr], d.target[tr], x[va], d.target[va]


def cnn_job(steps=8, batch=16, with_mlp=False) -> JobCreate:
    xt, yt, xv, yv = digits_images()
    task = {
        "name": "digits-cnn",
        "data": {
            "source": "inline",
            "x_train": xt.tolist(),
            "y_train": yt.tolist(),
            "x_val": xv.tolist(),
            "y_val": yv.tolist(),
        },
        "model": {"kind": "cnn", "layers": LAYERS},
        "loss": "cross_entropy",
        "steps": steps,
        "batch_size": batch,
    }
    tasks = [task]
    if with_mlp:
        tasks.append(
            {
                "name": "mlp",
                "data": {"source": "builtin", "name": "iris"},
                "model": {"kind": "mlp", "hidden": [4]},
                "loss": "cross_entropy",
                "steps": 5,
                "batch_size": 8,
            }
        )
    return JobCreate.model_validate({"name": "j", "tasks": tasks, "meta": {"seed": 3}})


def test_build_tasks_gives_a_module_task_with_the_declared_cnn():
    job = cnn_job(with_mlp=True)
    cnn, mlp = runner.build_tasks(job, torch.device("cpu"))
    assert isinstance(mlp, engine.Task) and mlp.hidden == (4,)
    assert isinstance(cnn, ModuleTask)
    assert cnn.x_train.shape == (160, 1, 8, 8) and cnn.x_train.dtype == torch.float32
    assert cnn.y_train.dtype == torch.int64 and cnn.seed == runner.task_seed(3, 0)
    model = cnn.model(1)
    assert [n for n, _ in model.named_parameters()] == ["0.weight", "0.bias", "4.weight", "4.bias"]
    assert model[4].out_features == 10  # inferred: labels 0..9
    want = build_cnn(LAYERS, (1, 8, 8), derive_seed("init", cnn.seed, 1), 10)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), want.parameters(), strict=True))


def test_module_objective_on_digits_matches_sgd_and_finite_differences():
    (task,) = runner.build_tasks(cnn_job(), torch.device("cpu"))
    # float32 as the worker runs it: the objective equals plain torch.optim.SGD on the same model
    lr, mom = 0.5, 0.8
    obj32 = ModuleObjective([task], (0, 1))
    ref32 = (train_sgd_module(task, lr, mom, 0) + train_sgd_module(task, lr, mom, 1)) / 2
    assert obj32.losses([lr], [mom])[0] == pytest.approx(ref32, rel=1e-5)
    # by hand, independently of the engine: build_cnn + torch.optim.SGD on batch_indices
    model = build_cnn(LAYERS, (1, 8, 8), derive_seed("init", task.seed, 0), 10)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=mom)
    for rows in engine.batch_indices(task, 0):
        loss = torch.nn.functional.cross_entropy(model(task.x_train[rows]), task.y_train[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        by_hand = float(torch.nn.functional.cross_entropy(model(task.x_val), task.y_val))
    assert train_sgd_module(task, lr, mom, 0) == pytest.approx(by_hand, rel=1e-6)

    # float64: value_and_grad against central finite differences of torch.optim.SGD training
    t64 = ModuleTask(**{**task.__dict__, "x_train": task.x_train.double(), "x_val": task.x_val.double()})
    draws = (0, 1)
    a, z = math.log(0.3), 1.5

    def meta(a_, z_):
        m = BOUNDS[1] / (1.0 + math.exp(-z_))
        return sum(train_sgd_module(t64, math.exp(a_), m, d) for d in draws) / len(draws)

    loss, (ga, gz) = ModuleObjective([t64], draws).value_and_grad(a, z, BOUNDS)
    assert loss == pytest.approx(meta(a, z), rel=1e-12)
    fa = (meta(a + H, z) - meta(a - H, z)) / (2 * H)
    fz = (meta(a, z + H) - meta(a, z - H)) / (2 * H)
    assert abs(fa) > 1e-3 and abs(fz) > 1e-4
    assert ga == pytest.approx(fa, rel=1e-5)
    assert gz == pytest.approx(fz, rel=1e-5)


# ------------------------------------------------------------------ uploaded 4-D tensors


@pytest.fixture
def settings(tmp_path, sqlite_url, make_settings):
    return make_settings(tmp_path, database_url=sqlite_url)


def test_dataset_loader_reads_images(tmp_path, settings):
    dataset_loader.clear_cache()
    xt, yt, _, _ = digits_images(50, 0)
    x = xt.astype(np.float32)
    with keyed_client(create_app(settings)) as client:
        r = client.post("/v1/datasets", files={"file": ("digits.npz", npz_bytes(x=x, y=yt.astype(np.int64)))})
        assert r.status_code == 201, r.text
        ds = r.json()["id"]
        spec = {"source": "dataset", "train": {"dataset": ds, "x": "x", "y": "y"}, "val_fraction": 0.2, "seed": 4}
        a, b, c, d = load_dataset_task_data(spec, settings)
    perm = np.random.default_rng(4).permutation(50)
    assert a.shape == (40, 1, 8, 8) and c.shape == (10, 1, 8, 8) and a.dtype == np.float32
    np.testing.assert_array_equal(c, x[perm[:10]])
    np.testing.assert_array_equal(b, yt[perm[10:]])
    dataset_loader.clear_cache()
