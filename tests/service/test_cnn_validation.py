"""cnn models in a job body: schema, shapes through the layers, data rank, field paths, memory."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from gradtune.spec import costs
from service.schemas import JobCreate
from service.settings import Settings
from service.validation import check_job
from tests.helpers.dataset_files import csv_bytes, safetensors_bytes
from tests.service.conftest import BUILTIN_TASK, INLINE_TASK, job_body

LAYERS = [
    {"type": "conv2d", "out_channels": 4, "kernel_size": 3, "stride": 1, "padding": 1},
    {"type": "relu"},
    {"type": "maxpool", "kernel_size": 2},
    {"type": "flatten"},
    {"type": "linear", "out_features": 3},
]


def images(n: int, c: int = 1, h: int = 4, w: int = 4, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, c, h, w)).round(3).tolist()


def cnn_task(layers=LAYERS, **data) -> dict:
    task = copy.deepcopy(INLINE_TASK)
    task["model"] = {"kind": "cnn", "layers": copy.deepcopy(layers)}
    task["data"] = {
        "source": "inline",
        "x_train": images(6),
        "y_train": [1, 1, 0, 0, 2, 1],
        "x_val": images(2, seed=1),
        "y_val": [1, 0],
    }
    task["data"].update(data)
    return task


def post(client, *tasks, meta=None):
    body = job_body(*tasks)
    if meta:
        body["meta"] = meta
    return client.post("/v1/jobs", json=body)


def errors(r) -> dict[str, dict]:
    assert r.status_code == 422, r.text
    return {e["field"]: e for e in r.json()["detail"]}


def one(r) -> dict:
    errs = errors(r)
    assert len(errs) == 1, errs
    return next(iter(errs.values()))


def test_inline_cnn_job_is_accepted_and_stored_as_sent(client, app):
    r = post(client, cnn_task())
    assert r.status_code == 202, r.text
    layers = [
        dict(LAYERS[0]),
        {"type": "tanh"},
        {"type": "avgpool", "kernel_size": 2, "stride": 1},
        {"type": "flatten"},
        {"type": "linear", "out_features": 5},
        {"type": "relu"},
        {"type": "linear"},
    ]
    r = post(client, cnn_task(layers))
    assert r.status_code == 202, r.text
    job = JobCreate.model_validate(job_body(cnn_task(layers)))
    assert job.tasks[0].model.kind == "cnn"
    assert [layer.type for layer in job.tasks[0].model.layers] == [layer["type"] for layer in layers]
    assert job.tasks[0].model.layers[6].out_features is None


@pytest.mark.parametrize(
    "layers, field, words, type_",
    [
        # conv output would be 0x0 on 4x4 images
        (
            [{"type": "conv2d", "out_channels": 2, "kernel_size": 5}, {"type": "flatten"}, {"type": "linear"}],
            "tasks[0].model.layers[0].kernel_size",
            ["4x4 images", "kernel of 5"],
            "cnn_shape",
        ),
        # the pool shrinks 4x4 to 2x2, then a 3x3 conv does not fit
        (
            [
                {"type": "maxpool", "kernel_size": 2},
                {"type": "conv2d", "out_channels": 2, "kernel_size": 3},
                {"type": "flatten"},
                {"type": "linear"},
            ],
            "tasks[0].model.layers[1].kernel_size",
            ["2x2 images"],
            "cnn_shape",
        ),
        (
            [{"type": "conv2d", "out_channels": 2, "kernel_size": 3}, {"type": "linear", "out_features": 3}],
            "tasks[0].model.layers[1].type",
            ["flatten layer before"],
            "cnn_structure",
        ),
        (
            [{"type": "flatten"}, {"type": "avgpool", "kernel_size": 2}, {"type": "linear"}],
            "tasks[0].model.layers[1].type",
            ["after flatten"],
            "cnn_structure",
        ),
        (
            [{"type": "flatten"}, {"type": "flatten"}, {"type": "linear"}],
            "tasks[0].model.layers[1].type",
            ["second flatten"],
            "cnn_structure",
        ),
        (
            [{"type": "flatten"}, {"type": "linear", "out_features": 8}, {"type": "relu"}],
            "tasks[0].model.layers[2].type",
            ["must end with a linear layer"],
            "cnn_structure",
        ),
        (
            [{"type": "flatten"}, {"type": "linear", "out_features": 10}],
            "tasks[0].model.layers[1].out_features",
            ["10 outputs", "need 3"],
            "cnn_outputs",
        ),
        (
            [{"type": "flatten"}, {"type": "linear"}, {"type": "linear"}],
            "tasks[0].model.layers[1].out_features",
            ["needs out_features"],
            "missing",
        ),
    ],
)
def test_layer_shapes_and_structure_errors_name_the_layer(client, nothing_changed, layers, field, words, type_):
    e = one(post(client, cnn_task(layers)))
    assert e["field"] == field, e
    for w in words:
        assert w in e["msg"], e["msg"]
    assert e["type"] == type_
    nothing_changed()


@pytest.mark.parametrize(
    "layer, field, needle",
    [
        (
            {"type": "conv2d", "out_channels": 0, "kernel_size": 3},
            "tasks[0].model.layers[0].out_channels",
            "greater than or equal to 1",
        ),
        ({"type": "conv2d", "out_channels": 2}, "tasks[0].model.layers[0].kernel_size", "required"),
        (
            {"type": "conv2d", "out_channels": 2, "kernel_size": 3, "dilation": 2},
            "tasks[0].model.layers[0].dilation",
            "not permitted",
        ),
        ({"type": "batchnorm"}, "tasks[0].model.layers[0].type", "'conv2d'"),
        ({"type": "maxpool", "kernel_size": 0}, "tasks[0].model.layers[0].kernel_size", "greater than or equal to 1"),
    ],
)
def test_schema_errors_have_layer_field_paths(client, nothing_changed, layer, field, needle):
    e = one(post(client, cnn_task([layer, {"type": "flatten"}, {"type": "linear"}])))
    assert e["field"] == field, e
    assert needle in e["msg"]
    nothing_changed()


def test_model_kind_is_checked(client, nothing_changed):
    task = cnn_task()
    task["model"]["kind"] = "resnet"
    e = one(post(client, task))
    assert e["field"] == "tasks[0].model.kind" and "'cnn'" in e["msg"]
    task["model"] = {"kind": "cnn"}
    e = one(post(client, task))
    assert e["field"] == "tasks[0].model.layers" and "required" in e["msg"].lower()
    nothing_changed()


def test_rank_of_x_must_match_the_model(client, nothing_changed):
    flat = cnn_task(x_train=INLINE_TASK["data"]["x_train"], x_val=INLINE_TASK["data"]["x_val"])
    errs = errors(post(client, flat))
    assert set(errs) == {"tasks[0].data.x_train", "tasks[0].data.x_val"}
    assert "a cnn needs images (N, C, H, W)" in errs["tasks[0].data.x_train"]["msg"]
    mlp = copy.deepcopy(INLINE_TASK)
    mlp["data"].update(x_train=images(6), x_val=images(2))
    errs = errors(post(client, mlp))
    assert "use model kind cnn" in errs["tasks[0].data.x_train"]["msg"]
    assert errs["tasks[0].data.x_train"]["type"] == "x_not_2d"
    builtin = dict(BUILTIN_TASK, model={"kind": "cnn", "layers": LAYERS})
    e = one(post(client, builtin))
    assert e["field"] == "tasks[0].model" and "builtin dataset 'digits' is a table" in e["msg"]
    nothing_changed()


def test_ragged_and_mismatched_images(client, nothing_changed):
    x = images(6)
    x[3][0][2] = x[3][0][2][:3]
    e = one(post(client, cnn_task(x_train=x)))
    assert e["field"] == "tasks[0].data.x_train[3]" and "image 3 is not 1x4x4" in e["msg"]
    e = one(post(client, cnn_task(x_val=images(2, h=5))))
    assert e["field"] == "tasks[0].data.x_val"
    assert "x_val images are 1x5x4 but x_train images are 1x4x4" in e["msg"]
    x = images(6)
    x[2][0][1][3] = float("nan")
    r = client.post(
        "/v1/jobs",
        content=__import__("json").dumps(job_body(cnn_task(x_train=x))),
        headers={"content-type": "application/json"},
    )
    e = one(r)
    assert e["field"] == "tasks[0].data.x_train[2][0][1][3]" and e["type"] == "finite_number"
    nothing_changed()


def test_memory_estimate_refuses_a_huge_cnn(client, nothing_changed, settings):
    layers = [
        {"type": "conv2d", "out_channels": 4096, "kernel_size": 3, "padding": 1},
        {"type": "flatten"},
        {"type": "linear"},
    ]
    task = dict(cnn_task(layers), steps=settings.max_steps)
    e = one(post(client, task, meta={"method": "reverse"}))
    assert e["field"] == "tasks[0].steps" and e["type"] == "unroll_too_large"
    assert "this cnn on 1x4x4 images needs about" in e["msg"]
    nothing_changed()


def test_memory_estimate_formula():
    """gradtune.spec.costs' reverse hypergradient of the task's 2 draws, with P and A counted by
    hand for a small stack (the validation pass aside: the job check counts it)."""
    task = dict(cnn_task(), steps=10, batch_size=2)
    job = JobCreate.model_validate(job_body(task))
    settings = Settings(max_unroll_bytes=1)
    (e,) = check_job(job, settings)
    # conv 1->4 k3: 4*(9+1)=40; linear (4*2*2=16 -> 3): 17*3=51; P=91
    # outputs: conv 4*4*4=64, relu 64, pool 16, flatten 16, linear 3 -> 163; input 16
    params, acts = 91, 16 + 163
    r, s = costs.REVERSE["module"], costs.SCREEN["module"]
    want = int(4 * 2 * (10 * (r["P"] * params + r["A"] * 2 * acts) + s["P"] * params + s["A"] * 2 * acts))
    from service.validation import cnn_layer_shapes, cnn_unroll_bytes

    shapes, errs = cnn_layer_shapes(["m"], job.tasks[0].model.layers, (1, 4, 4), 3)
    assert not errs and shapes == [(4, 4, 4), (4, 4, 4), (4, 2, 2), (16,), (3,)]
    assert cnn_unroll_bytes(10, 2, (1, 4, 4), job.tasks[0].model.layers, shapes) == want
    assert e["type"] == "unroll_too_large"


# ------------------------------------------------------------------ uploaded image tensors


def _upload(client, name, data):
    r = client.post("/v1/datasets", files={"file": (name, data, "application/octet-stream")})
    assert r.status_code in (200, 201), r.text
    return r.json()["id"]


def _dataset_task(ds, layers=LAYERS, x="x", **extra):
    data = {"source": "dataset", "train": {"dataset": ds, "x": x, "y": "y"}, "val_fraction": 0.25, "seed": 0}
    data.update(extra)
    return dict(INLINE_TASK, data=data, model={"kind": "cnn", "layers": layers}, batch_size=4)


def test_uploaded_images(client, nothing_changed):
    rng = np.random.default_rng(0)
    ds = _upload(
        client,
        "img.safetensors",
        safetensors_bytes(
            {
                "x": rng.normal(size=(20, 1, 4, 4)).astype(np.float32),
                "flat": rng.normal(size=(20, 16)).astype(np.float32),
                "y": (np.arange(20) % 3).astype(np.int64),
            }
        ),
    )
    r = post(client, _dataset_task(ds))
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    e = one(post(client, _dataset_task(ds, x="flat")))
    assert e["field"] == "tasks[0].data.train.x" and "x must be 4-D" in e["msg"] and e["type"] == "x_not_images"
    e = one(post(client, _dataset_task(ds, layers=[{"type": "flatten"}, {"type": "linear", "out_features": 4}])))
    assert e["field"] == "tasks[0].model.layers[1].out_features" and "need 3" in e["msg"]
    e = one(post(client, dict(_dataset_task(ds), model={"kind": "mlp", "hidden": []})))
    assert e["field"] == "tasks[0].data.train.x" and "use model kind cnn" in e["msg"]
    table = _upload(client, "t.csv", csv_bytes(["a", "y"], [[i, i % 2] for i in range(20)]))
    e = one(post(client, _dataset_task(table, x=["a"])))
    assert e["field"] == "tasks[0].data.train.x" and "a cnn needs images" in e["msg"]
    other = _upload(
        client,
        "img2.safetensors",
        safetensors_bytes(
            {"x": rng.normal(size=(8, 1, 5, 4)).astype(np.float32), "y": (np.arange(8) % 3).astype(np.int64)}
        ),
    )
    task = _dataset_task(ds, val={"dataset": other, "x": "x", "y": "y"})
    del task["data"]["val_fraction"], task["data"]["seed"]
    e = one(post(client, task))
    assert e["field"] == "tasks[0].data.val.x"
    assert "validation images are 1x5x4 but training images are 1x4x4" in e["msg"]
    assert client.get(f"/v1/jobs/{job_id}").status_code == 200


def test_cnn_tasks_the_engine_batches_share_one_group_in_the_admitted_memory():
    """worker/engine/module_unroll.py trains cnn tasks of one model, example shape, loss, steps and
    batch size as one unroll: the admission's cost model groups them alike, so 16 such tasks are
    admitted for one unroll over all their runs, not 16 unrolls one after another."""
    from gradtune.spec.shapes import cnn_shapes
    from service.validation.admission import cnn_cost, meta_cost
    from service.validation.common import task_io

    def cost(**change):
        task = JobCreate.model_validate(job_body({**cnn_task(), **change})).tasks[0]
        io = task_io(task)
        return cnn_cost(task, io, cnn_shapes(task.model.layers, io.features, io.d_out))

    a, b, other = cost(), cost(), cost(steps=7)
    assert a.group is not None and a.group == b.group and other.group != a.group
    job = JobCreate.model_validate(job_body(cnn_task()))
    meta = meta_cost(job, Settings())
    batched = costs.estimate([a] * 16, meta)
    apart = costs.estimate([costs.TaskCost(**{**a.__dict__, "group": None})] * 16, meta)
    assert batched.peak_bytes > apart.peak_bytes  # one unroll over 16 tasks' runs holds more at once
