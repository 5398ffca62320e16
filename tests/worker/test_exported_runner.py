"""``kind: exported`` below the meta-loop: a .pt2 uploaded through the API -> runner.build_tasks ->
a ModuleTask whose parameters carry the program's own names -> ModuleObjective, which gives the
same loss and hypergradient as the same architecture declared as an ``mlp`` (functional.Objective).
And the worker's side of a model that disappeared: the job fails with a sentence."""

from __future__ import annotations

import dataclasses
import io
import math

import pytest
import torch
from torch import nn

from service.schemas import JobCreate
from tests.worker.test_runner import env  # noqa: F401  (the fixture)
from worker import engine, runner
from worker.engine.functional import Objective
from worker.engine.modules import ModuleObjective, ModuleTask, param_layout, train_sgd_module
from worker.engine.tasks import derive_seed

BOUNDS = (0.0, 0.999)


pytestmark = pytest.mark.usefixtures("fresh_program_cache")


def pt2(model: nn.Module, example: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.export.save(torch.export.export(model, (example,)), buf)
    return buf.getvalue()


def upload_model(client, data: bytes) -> dict:
    r = client.post("/v1/models", files={"file": ("net.pt2", data)})
    assert r.status_code in (200, 201), r.text
    return r.json()


def iris_job(model: dict, steps: int = 12, batch: int = 16, seed: int = 5, iterations: int = 3) -> dict:
    return {
        "name": "iris",
        "tasks": [
            {
                "name": "t0",
                "data": {"source": "builtin", "name": "iris", "val_fraction": 0.3, "seed": 1},
                "model": model,
                "loss": "cross_entropy",
                "steps": steps,
                "batch_size": batch,
            }
        ],
        "hyperparameters": {"lr": 0.05, "momentum": 0.8},
        "meta": {"iterations": iterations, "seed": seed},
    }


def to64(task):
    if isinstance(task, ModuleTask):
        return ModuleTask(**{**task.__dict__, "x_train": task.x_train.double(), "x_val": task.x_val.double()})
    return dataclasses.replace(task, x_train=task.x_train.double(), x_val=task.x_val.double())


def test_runner_builds_the_exported_task_and_it_trains_like_the_declared_mlp(env):  # noqa: F811
    client, _sent = env
    torch.manual_seed(123)  # the uploaded weights are not used (init: default)
    model = upload_model(client, pt2(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)), torch.randn(7, 4)))
    cpu = torch.device("cpu")
    (mlp,) = runner.build_tasks(
        JobCreate.model_validate(iris_job({"kind": "mlp", "hidden": [8], "activation": "tanh"})), cpu
    )
    (exp,) = runner.build_tasks(JobCreate.model_validate(iris_job({"kind": "exported", "model": model["id"]})), cpu)
    assert isinstance(mlp, engine.Task) and isinstance(exp, ModuleTask)
    assert exp.seed == mlp.seed and exp.steps == 12 and exp.batch_size == 16 and exp.loss == "cross_entropy"
    assert torch.equal(exp.x_train, mlp.x_train) and torch.equal(exp.y_val, mlp.y_val)
    assert exp.x_train.dtype == torch.float32
    # parameters under the program's own names, grouped by layer as the settings name them
    assert [n for n, _ in exp.model(0).named_parameters()] == [p["name"] for p in model["parameters"]]
    assert param_layout(exp) == param_layout(mlp) == [["0.weight", "0.bias"], ["2.weight", "2.bias"]]
    for d in (0, 1, 1001):  # the declared mlp's PyTorch-default initialization, draw by draw
        want, got = engine.build_model(mlp, d).state_dict(), exp.model(d).state_dict()
        assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)

    draws, a, z = (0, 1), math.log(0.3), 0.7
    # float64: the same loss and hypergradient to rounding
    loss, (ga, gz) = ModuleObjective([to64(exp)], draws).value_and_grad(a, z, BOUNDS)
    ref, (rga, rgz) = Objective([to64(mlp)], draws).value_and_grad(a, z, BOUNDS)
    assert abs(ga) > 1e-4 and abs(gz) > 1e-5
    assert loss == pytest.approx(ref, rel=1e-12)
    assert ga == pytest.approx(rga, rel=1e-9) and gz == pytest.approx(rgz, rel=1e-9)
    # float32, as the worker runs it
    obj = ModuleObjective([exp], draws)
    loss32, (ga32, gz32) = obj.value_and_grad(a, z, BOUNDS)
    assert loss32 == pytest.approx(ref, rel=1e-5)
    assert ga32 == pytest.approx(rga, rel=1e-3) and gz32 == pytest.approx(rgz, rel=1e-3)
    assert obj.losses([0.05, 0.5], [0.9, 0.3]) == pytest.approx(
        Objective([mlp], draws).losses([0.05, 0.5], [0.9, 0.3]), rel=1e-5
    )


def test_init_uploaded_starts_every_draw_from_the_files_weights(env):  # noqa: F811
    client, _sent = env

    class Net(nn.Module):  # registered in another order than called; names are the program's
        def __init__(self):
            super().__init__()
            self.out = nn.Linear(6, 3)
            self.hidden = nn.Linear(4, 6)

        def forward(self, x):
            return self.out(torch.relu(self.hidden(x)))

    torch.manual_seed(7)
    net = Net()
    model = upload_model(client, pt2(net, torch.randn(3, 4)))
    assert [p["name"] for p in model["parameters"]] == ["hidden.weight", "hidden.bias", "out.weight", "out.bias"]
    job = JobCreate.model_validate(iris_job({"kind": "exported", "model": model["id"], "init": "uploaded"}))
    (task,) = runner.build_tasks(job, torch.device("cpu"))
    for d in (0, 3):
        params = dict(task.model(d).named_parameters())
        assert set(params) == {"hidden.weight", "hidden.bias", "out.weight", "out.bias"}
        assert all(torch.equal(params[n], p) for n, p in net.named_parameters())
    x = task.x_val
    assert torch.allclose(task.model(0)(x), net(x))
    # trained from those weights, the objective is plain torch.optim.SGD on the user's model
    assert ModuleObjective([task], (0,)).losses([0.1], [0.5])[0] == pytest.approx(
        train_sgd_module(task, 0.1, 0.5, 0), rel=1e-5
    )
    # a default-initialized program of the same graph draws in call order: hidden first
    job = JobCreate.model_validate(iris_job({"kind": "exported", "model": model["id"]}))
    (task,) = runner.build_tasks(job, torch.device("cpu"))
    torch.manual_seed(derive_seed("init", task.seed, 0))
    first, second = nn.Linear(4, 6), nn.Linear(6, 3)
    params = dict(task.model(0).named_parameters())
    assert torch.equal(params["hidden.weight"], first.weight) and torch.equal(params["out.bias"], second.bias)


def test_a_model_whose_file_is_gone_fails_the_job_with_a_sentence(env):  # noqa: F811
    client, sent = env
    model = upload_model(client, pt2(nn.Sequential(nn.Linear(4, 3)), torch.randn(2, 4)))
    r = client.post("/v1/jobs", json=iris_job({"kind": "exported", "model": model["id"]}))
    assert r.status_code == 202, r.text
    jid = r.json()["id"]
    client.app.state.store.delete(model["sha256"])  # the object is lost; the row is still there
    assert runner.run_chunk(jid, 0, owner="w") == "failed"
    job = client.get(f"/v1/jobs/{jid}").json()
    assert job["status"] == "failed"
    assert model["id"] in job["error"] and "missing from the artifact store" in job["error"]
    assert "Traceback" not in job["error"]
