"""``exported`` models: .pt2 archives read as data (service/exported_files.py, no torch.export.load,
no pickle) and interpreted by the engine (worker/engine/exported.py)."""

import io
import json
import math
import os
import zipfile

import pytest
import torch
from torch import nn

from service.exported_files import ExportedProgramError, read_pt2, read_weights
from tests.helpers.tasks import synthetic_task
from worker.engine import build_model
from worker.engine.exported import ProgramModule, exported_task
from worker.engine.functional import Objective
from worker.engine.modules import ModuleObjective, train_sgd_module

BOUNDS = (0.0, 0.999)


def export(model, example, path):
    torch.export.save(torch.export.export(model, (example,)), str(path))
    return path


def rewrite(src, dst, change):
    """Copy a zip archive, passing each (name, bytes) through change (None drops the entry)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = change(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info, data)
    return dst


def test_exported_mlp_trains_exactly_like_the_declared_mlp(tmp_path):
    task = synthetic_task(hidden=(8,), activation="tanh", features=5, out=3, steps=9)
    mlp = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    path = export(mlp, torch.randn(4, 5), tmp_path / "mlp.pt2")
    program = read_pt2(path)
    assert [op["short"] for op in program["ops"]] == ["linear", "tanh", "linear"]
    assert [p["name"] for p in program["params"]] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    etask = exported_task(
        "exp",
        task.x_train,
        task.y_train,
        task.x_val,
        task.y_val,
        program,
        read_weights(path, program),
        task.loss,
        task.steps,
        task.batch_size,
        task.seed,
    )
    for d in (0, 1):  # fresh default initializations, the same values build_model draws
        want = build_model(task, d).state_dict()
        got = etask.model(d).state_dict()
        assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    draws, a, z = (0, 1), math.log(0.2), 0.8
    mlp_obj = Objective([task], draws)
    exp_obj = ModuleObjective([etask], draws)
    loss, (ga, gz) = exp_obj.value_and_grad(a, z, BOUNDS)
    ref_loss, (rga, rgz) = mlp_obj.value_and_grad(a, z, BOUNDS)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    assert ga == pytest.approx(rga, rel=1e-9) and gz == pytest.approx(rgz, rel=1e-9)
    assert exp_obj.losses([0.05, 0.5], [0.9, 0.3]) == pytest.approx(mlp_obj.losses([0.05, 0.5], [0.9, 0.3]), rel=1e-12)


def test_exported_cnn_runs_the_uploaded_weights(tmp_path):
    torch.manual_seed(0)
    cnn = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(2, 2, 2),
        nn.Tanh(),
        nn.AvgPool2d(2, stride=1),
        nn.Flatten(),
        nn.Linear(8, 3),
        nn.GELU(),
        nn.Linear(3, 3),
        nn.Sigmoid(),
    )
    path = export(cnn, torch.randn(5, 1, 8, 8), tmp_path / "cnn.pt2")
    program = read_pt2(path)
    module = ProgramModule(program, read_weights(path, program))
    x = torch.randn(7, 1, 8, 8)
    assert [n for n, _ in module.named_parameters()] == [n for n, _ in cnn.named_parameters()]
    assert torch.equal(module(x), cnn(x))  # another batch size than the example's
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(30, 1, 8, 8, generator=g, dtype=torch.float64)
    ys = torch.randint(0, 3, (30,), generator=g)
    t = exported_task(
        "e",
        xs[:20],
        ys[:20],
        xs[20:],
        ys[20:],
        program,
        read_weights(path, program),
        "cross_entropy",
        5,
        4,
        0,
        init="uploaded",
    )
    assert torch.equal(dict(t.model(3).named_parameters())["0.weight"], cnn[0].weight.double())
    obj = ModuleObjective([t], (0,))
    assert obj.losses([0.3], [0.5])[0] == pytest.approx(train_sgd_module(t, 0.3, 0.5, 0), rel=1e-12)


def test_reading_never_unpickles(tmp_path):
    mlp = nn.Sequential(nn.Linear(3, 2))
    good = export(mlp, torch.randn(2, 3), tmp_path / "good.pt2")
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    buf = io.BytesIO()
    torch.save(Payload(), buf)
    evil = rewrite(good, tmp_path / "evil.pt2", lambda n, b: buf.getvalue() if "sample_inputs" in n else b)
    program = read_pt2(evil)  # torch.export.load(evil) would run the payload (README)
    ProgramModule(program, read_weights(evil, program))(torch.randn(1, 3))
    assert not marker.exists()

    def pickled_weights(name, data):
        if name.endswith("model_weights_config.json"):
            cfg = json.loads(data)
            cfg["config"]["0.weight"]["use_pickle"] = True
            return json.dumps(cfg).encode()
        return data

    with pytest.raises(ExportedProgramError, match="stored with pickle"):
        read_pt2(rewrite(good, tmp_path / "p.pt2", pickled_weights))

    def os_target(name, data):
        if name.endswith("models/model.json"):
            return data.replace(b"torch.ops.aten.linear.default", b"torch.os.system")
        return data

    with pytest.raises(ExportedProgramError, match="node 0 calls 'torch.os.system'"):
        read_pt2(rewrite(good, tmp_path / "t.pt2", os_target))
    assert not marker.exists()
    (tmp_path / "x.pt2").write_bytes(b"not a zip")
    with pytest.raises(ExportedProgramError, match="not a .pt2 archive"):
        read_pt2(tmp_path / "x.pt2")


def test_refusals_name_the_reason(tmp_path):
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).eval()
    with pytest.raises(ExportedProgramError, match="no buffers"):
        read_pt2(export(bn, torch.randn(5, 3), tmp_path / "bn.pt2"))

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return torch.softmax(self.lin(x), dim=1)

    with pytest.raises(ExportedProgramError, match="calls 'softmax.int'.*supported: "):
        read_pt2(export(Odd(), torch.randn(5, 3), tmp_path / "odd.pt2"))
    dyn = torch.export.export(
        nn.Sequential(nn.Linear(3, 2)), (torch.randn(5, 3),), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    torch.export.save(dyn, str(tmp_path / "dyn.pt2"))
    with pytest.raises(ExportedProgramError, match="static shapes"):
        read_pt2(tmp_path / "dyn.pt2")
