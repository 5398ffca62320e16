"""The models resource (uploaded torch.export programs) on a real database (SQLite and PostgreSQL)
and the local artifact store: upload, describe, list, delete (409 while a job uses the model),
every refused archive (nothing left behind), and jobs that name a model (validated at submit)."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile

import numpy as np
import torch
from sqlalchemy import func, select
from torch import nn

from service.db.models import ExportedModel, JobModel
from tests.helpers.dataset_files import safetensors_bytes
from tests.helpers.support import stored_files, temp_files
from tests.service.conftest import count_jobs, job_body


def pt2_bytes(model: nn.Module, example: torch.Tensor, **export_kw) -> bytes:
    buf = io.BytesIO()
    torch.export.save(torch.export.export(model, (example,), **export_kw), buf)
    return buf.getvalue()


def rewrite(data: bytes, change) -> bytes:
    """The archive with each entry's bytes passed through change(name, bytes)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, change(info.filename, zin.read(info.filename)))
    return out.getvalue()


def mlp_pt2(features=4, hidden=8, out=3, seed=0) -> bytes:
    torch.manual_seed(seed)
    return pt2_bytes(
        nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, out)), torch.randn(5, features)
    )


def upload(client, filename: str, data: bytes):
    return client.post("/v1/models", files={"file": (filename, data, "application/octet-stream")})


def uploaded(client, data: bytes, filename: str = "net.pt2") -> dict:
    r = upload(client, filename, data)
    assert r.status_code == 201, r.text
    return r.json()


def count_models(app) -> int:
    with app.state.sessionmaker() as s:
        return s.scalar(select(func.count()).select_from(ExportedModel))


def assert_nothing_stored(app) -> None:
    assert count_models(app) == 0, "a refused upload stored a model row"
    assert stored_files(app) == [], "a refused upload left an object in the artifact store"
    assert temp_files(app) == [], "a refused upload left a temporary file"


def refusal(r, status: int = 422) -> str:
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, list) and len(detail) == 1, detail
    assert detail[0]["loc"] == ["body", "file"] and detail[0]["field"] == "file"
    assert "Traceback" not in r.text
    return detail[0]["msg"]


def exported_task(model_id: str, x, y, loss="cross_entropy", **model_kw) -> dict:
    return {
        "name": "t0",
        "data": {"source": "inline", "x_train": x, "y_train": y, "x_val": x[:2], "y_val": y[:2]},
        "model": {"kind": "exported", "model": model_id, **model_kw},
        "loss": loss,
        "steps": 5,
        "batch_size": 2,
    }


ROWS4 = [[0.0, 1.0, 0.5, 0.2], [1.0, 0.0, 0.1, 0.3], [1.0, 1.0, 0.4, 0.4], [0.0, 0.0, 0.9, 0.1]]


# ------------------------------------------------------------------ upload, describe, list


def test_upload_describes_the_program_and_stores_it_by_sha256(client, app):
    data = mlp_pt2()
    r = upload(client, "net.pt2", data)
    assert r.status_code == 201, r.text
    body = r.json()
    assert r.headers["location"] == f"/v1/models/{body['id']}"
    assert body["filename"] == "net.pt2" and body["size"] == len(data)
    assert body["sha256"] == hashlib.sha256(data).hexdigest()
    assert body["input_shape"] == [4] and body["output_width"] == 3
    assert body["operators"] == ["linear", "tanh", "linear"]
    assert [n["output_shape"] for n in body["nodes"]] == [[8], [8], [3]]
    assert body["nodes"][0]["parameters"] == ["0.weight", "0.bias"] and body["nodes"][1]["parameters"] == []
    assert body["parameters"] == [
        {"name": "0.weight", "shape": [8, 4], "dtype": "float32"},
        {"name": "0.bias", "shape": [8], "dtype": "float32"},
        {"name": "2.weight", "shape": [3, 8], "dtype": "float32"},
        {"name": "2.bias", "shape": [3], "dtype": "float32"},
    ]
    assert body["parameter_count"] == 8 * 4 + 8 + 3 * 8 + 3 and body["default_init"] is True
    assert app.state.store.local_path(body["sha256"]).read_bytes() == data
    assert temp_files(app) == []
    got = client.get(f"/v1/models/{body['id']}")
    assert got.status_code == 200 and got.json() == body
    # the same bytes again: the same model (200), one row, one object
    again = upload(client, "other-name.pt2", data)
    assert again.status_code == 200 and again.json() == body
    assert count_models(app) == 1 and len(stored_files(app)) == 1


def test_parameters_are_listed_in_call_order_with_the_programs_own_names(client):
    class Net(nn.Module):  # registered in another order than they are called
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(6, 2)
            self.conv = nn.Conv2d(1, 2, 3)
            self.pool = nn.MaxPool2d(2)

        def forward(self, x):
            return self.head(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))

    body = uploaded(client, pt2_bytes(Net(), torch.randn(3, 1, 5, 8)))
    assert body["input_shape"] == [1, 5, 8] and body["output_width"] == 2
    assert body["operators"] == ["conv2d", "relu", "max_pool2d", "flatten", "linear"]
    assert [p["name"] for p in body["parameters"]] == ["conv.weight", "conv.bias", "head.weight", "head.bias"]
    assert body["nodes"][2]["output_shape"] == [2, 1, 3]


def test_list_is_newest_first_and_paginated(client):
    ids = [uploaded(client, mlp_pt2(seed=s))["id"] for s in range(3)]
    page = client.get("/v1/models", params={"limit": 2}).json()
    assert page["total"] == 3 and page["limit"] == 2 and page["offset"] == 0
    assert [m["id"] for m in page["items"]] == ids[::-1][:2]
    rest = client.get("/v1/models", params={"limit": 2, "offset": 2}).json()
    assert [m["id"] for m in rest["items"]] == ids[:1]
    assert client.get("/v1/models", params={"limit": 0}).status_code == 422


def test_unknown_model_is_404(client):
    assert client.get("/v1/models/nope").status_code == 404
    r = client.delete("/v1/models/nope")
    assert r.status_code == 404 and "model nope not found" in r.json()["detail"]


# ------------------------------------------------------------------ refusals


def test_refused_archives_say_why_and_leave_nothing(client, app, tmp_path):
    good = mlp_pt2()

    def pickled(name, data):
        if name.endswith("model_weights_config.json"):
            cfg = json.loads(data)
            cfg["config"]["0.weight"]["use_pickle"] = True
            return json.dumps(cfg).encode()
        return data

    class Soft(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return torch.softmax(self.lin(x), dim=1)

    dynamic = pt2_bytes(
        nn.Sequential(nn.Linear(4, 3)), torch.randn(5, 4), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    cases = [
        ("pickled.pt2", rewrite(good, pickled), "stored with pickle"),
        ("dynamic.pt2", dynamic, "static shapes"),
        (
            "softmax.pt2",
            pt2_bytes(Soft(), torch.randn(5, 4)),
            "calls 'softmax.int', which gradtune cannot train through",
        ),
        (
            "bn.pt2",
            pt2_bytes(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).eval(), torch.randn(5, 4)),
            "no buffers",
        ),
        ("notzip.pt2", b"this is not a zip archive at all", "not a .pt2 archive"),
        ("truncated.pt2", good[: len(good) // 2], "not a .pt2 archive"),
        ("vector.pt2", pt2_bytes(nn.Sequential(nn.Linear(4, 3), nn.Flatten(0)), torch.randn(5, 4)), "(rows, outputs)"),
    ]
    for filename, data, words in cases:
        msg = refusal(upload(client, filename, data))
        assert msg.startswith(f"{filename}: ") and words in msg, (filename, msg)
        assert_nothing_stored(app)
    msg = refusal(upload(client, "net.onnx", good))
    assert ".pt2" in msg and "'.onnx'" in msg
    assert_nothing_stored(app)
    r = client.post("/v1/models", files={"model": ("net.pt2", good)})  # the wrong field name
    assert r.status_code == 422 and "multipart field named 'file' (curl -F file=@model.pt2)" in r.text
    assert_nothing_stored(app)
    r = client.post("/v1/models", content=good, headers={"content-type": "application/octet-stream"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]
    assert_nothing_stored(app)


def test_a_model_over_the_upload_limit_is_413(tmp_path, db_url, make_settings):
    from service.main import create_app
    from tests.helpers.support import keyed_client

    app = create_app(make_settings(tmp_path, database_url=db_url, max_upload_bytes=4096))
    with keyed_client(app) as c:
        r = upload(c, "big.pt2", mlp_pt2(features=64, hidden=64))
        assert r.status_code == 413 and "upload limit" in r.json()["detail"]
    assert_nothing_stored(app)


# ------------------------------------------------------------------ jobs that name a model


def test_a_job_naming_a_model_is_recorded_and_the_model_cannot_be_deleted_meanwhile(client, app):
    model = uploaded(client, mlp_pt2())
    r = client.post("/v1/jobs", json=job_body(exported_task(model["id"], ROWS4, [0, 1, 2, 1])))
    assert r.status_code == 202, r.text
    jid = r.json()["id"]
    with app.state.sessionmaker() as s:
        assert s.scalars(select(JobModel.model_id).where(JobModel.job_id == jid)).all() == [model["id"]]
    r = client.delete(f"/v1/models/{model['id']}")
    assert r.status_code == 409 and jid in r.json()["detail"] and "queued" in r.json()["detail"]
    assert client.get(f"/v1/models/{model['id']}").status_code == 200
    assert client.post(f"/v1/jobs/{jid}/cancel").status_code == 202
    r = client.delete(f"/v1/models/{model['id']}")
    assert r.status_code == 204
    assert client.get(f"/v1/models/{model['id']}").status_code == 404
    assert stored_files(app) == []
    assert client.get(f"/v1/jobs/{jid}").json()["status"] == "cancelled"  # the finished job stays


def test_jobs_are_checked_against_the_model(client, app, nothing_changed):
    model = uploaded(client, mlp_pt2())  # 4 features -> 3 outputs
    mid = model["id"]

    def refused(task, field, *words, meta=None):
        body = job_body(task)
        if meta:
            body["meta"] = meta
        r = client.post("/v1/jobs", json=body)
        assert r.status_code == 422, r.text
        detail = r.json()["detail"]
        assert [d["field"] for d in detail] == [field], detail
        for w in words:
            assert w in detail[0]["msg"], detail
        nothing_changed()

    refused(exported_task("no-such-model", ROWS4, [0, 1, 2, 1]), "tasks[0].model.model", "not found", "POST /v1/models")
    refused(exported_task(mid, [r[:3] for r in ROWS4], [0, 1, 2, 1]), "tasks[0].data.x_train", "shape [3]", "shape [4]")
    refused(exported_task(mid, ROWS4, [0, 1, 3, 1]), "tasks[0].model.model", "4 classes", "3 outputs")
    refused(exported_task(mid, ROWS4, [[0.5, 1.0]] * 4, loss="mse"), "tasks[0].model.model", "width 2", "3 outputs")
    refused(
        {**exported_task(mid, ROWS4, [0, 1, 2, 1]), "data": {"source": "builtin", "name": "wine"}},
        "tasks[0].data.name",
        "shape [13]",
    )
    images = [[[[0.0] * 4] * 4]] * 4
    r = client.post("/v1/jobs", json=job_body(exported_task(mid, images, [0, 1, 2, 1])))
    assert r.status_code == 422 and [d["field"] for d in r.json()["detail"]] == [
        "tasks[0].data.x_train",
        "tasks[0].data.x_val",
    ]
    assert "this exported model needs rows of features" in r.json()["detail"][0]["msg"]
    nothing_changed()
    big = exported_task(mid, ROWS4, [0, 1, 2, 1])
    big["steps"] = 10_000
    with_limit = app.state.settings.max_unroll_bytes
    app.state.settings.max_unroll_bytes = 1_000_000
    try:
        refused(big, "tasks[0].steps", "to differentiate through", meta={"method": "reverse"})
    finally:
        app.state.settings.max_unroll_bytes = with_limit
    r = client.post(
        "/v1/jobs",
        json=job_body(
            {**exported_task(mid, ROWS4, [0, 1, 2, 1]), "model": {"kind": "exported", "model": mid, "init": "random"}}
        ),
    )
    assert r.status_code == 422, r.text
    assert [d["field"] for d in r.json()["detail"]] == ["tasks[0].model.init"], r.text
    nothing_changed()
    # a cross_entropy model may have more outputs than the labels use; mse targets of its width pass
    for task in (
        exported_task(mid, ROWS4, [0, 1, 1, 0]),
        exported_task(mid, ROWS4, [[0.5, 1.0, 0.0]] * 4, loss="mse", init="uploaded"),
    ):
        r = client.post("/v1/jobs", json=job_body(task))
        assert r.status_code == 202, r.text
    assert count_jobs(app) == 2


def test_init_default_needs_layers_it_can_redraw(client, nothing_changed):
    class Scaled(nn.Module):  # one weight used by two linear nodes: no default initialization
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(torch.tanh(self.lin(x)))

    model = uploaded(client, pt2_bytes(Scaled(), torch.randn(5, 4)))
    assert model["default_init"] is False
    r = client.post("/v1/jobs", json=job_body(exported_task(model["id"], ROWS4, [0, 1, 2, 3])))
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "tasks[0].model.init"
    assert "init 'uploaded'" in r.json()["detail"][0]["msg"]
    nothing_changed()
    r = client.post("/v1/jobs", json=job_body(exported_task(model["id"], ROWS4, [0, 1, 2, 3], init="uploaded")))
    assert r.status_code == 202, r.text


def test_a_dataset_task_with_images_is_checked_against_the_programs_input(client):
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))
    model = uploaded(client, pt2_bytes(cnn, torch.randn(2, 1, 6, 6)))
    assert model["input_shape"] == [1, 6, 6]
    rng = np.random.default_rng(0)
    data = safetensors_bytes(
        {
            "x": rng.normal(size=(20, 1, 6, 6)).astype(np.float32),
            "x8": rng.normal(size=(20, 1, 8, 8)).astype(np.float32),
            "y": (np.arange(20) % 3).astype(np.int64),
        }
    )
    ds = client.post("/v1/datasets", files={"file": ("img.safetensors", data)}).json()["id"]

    def task(x):
        return {
            "data": {"source": "dataset", "train": {"dataset": ds, "x": x, "y": "y"}},
            "model": {"kind": "exported", "model": model["id"]},
            "loss": "cross_entropy",
            "steps": 3,
            "batch_size": 4,
        }

    assert client.post("/v1/jobs", json=job_body(task("x"))).status_code == 202
    r = client.post("/v1/jobs", json=job_body(task("x8")))
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "tasks[0].data.train.x"
    assert "[1, 8, 8]" in r.json()["detail"][0]["msg"] and "[1, 6, 6]" in r.json()["detail"][0]["msg"]
