"""The exported-model round trip (issue 4, "Done means"): a whole small job run through
``worker.runner.run_chunk`` twice, once with the architecture declared as ``{"kind": "mlp"}`` and
once as the ``torch.export`` program of the same ``nn.Sequential`` uploaded to ``/v1/models``
(``{"kind": "exported"}``, init default), learns the same settings: the same lr and momentum, the
same history, and the same evaluation losses.

The mlp job runs on the batched functional path (functional.Objective), the exported one on the
generic module path (modules.ModuleObjective through meta's dispatch, make_objective); both
reproduce torch.optim.SGD from the same PyTorch-default initializations and batches.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from tests.worker.test_runner import _drain, env  # noqa: F401  (env is the fixture)

pytestmark = pytest.mark.usefixtures("fresh_program_cache")


def job(model: dict) -> dict:
    return {
        "name": "round-trip",
        "tasks": [
            {
                "name": f"iris{i}",
                "data": {"source": "builtin", "name": "iris", "val_fraction": 0.3, "seed": i},
                "model": model,
                "loss": "cross_entropy",
                "steps": 15,
                "batch_size": 16,
            }
            for i in range(2)
        ],
        "hyperparameters": {"lr": 0.02, "momentum": 0.9},
        "meta": {"iterations": 4, "seed": 3},
    }


def run(client, sent, body: dict) -> tuple[dict, list[dict]]:
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    jid = r.json()["id"]
    sent.append((jid, 0))
    outcomes = _drain(sent)
    job_ = client.get(f"/v1/jobs/{jid}").json()
    assert outcomes[-1] == "succeeded", (outcomes, job_["error"])
    settings = client.get(f"/v1/jobs/{jid}/settings").json()
    return settings, client.get(f"/v1/jobs/{jid}/history").json()["items"]


def test_settings_learned_through_an_exported_program_equal_the_declared_mlps(env):  # noqa: F811
    client, sent = env
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    buf = io.BytesIO()
    torch.export.save(torch.export.export(net, (torch.randn(16, 4),)), buf)
    r = client.post("/v1/models", files={"file": ("iris-mlp.pt2", buf.getvalue())})
    assert r.status_code == 201, r.text
    model_id = r.json()["id"]

    declared, declared_history = run(client, sent, job({"kind": "mlp", "hidden": [8], "activation": "tanh"}))
    exported, exported_history = run(client, sent, job({"kind": "exported", "model": model_id}))

    assert exported["lr"] == pytest.approx(declared["lr"], rel=1e-9)
    assert exported["momentum"] == pytest.approx(declared["momentum"], rel=1e-9)
    assert declared["lr"] != 0.02 or declared["momentum"] != 0.9  # the job did learn something
    assert len(exported_history) == len(declared_history) == 4
    for got, want in zip(exported_history, declared_history, strict=True):
        assert (got["iteration"], got["accepted"]) == (want["iteration"], want["accepted"])
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-9)
        assert got["momentum"] == pytest.approx(want["momentum"], rel=1e-9)
        assert got["meta_loss"] == pytest.approx(want["meta_loss"], rel=1e-4)
    ev_got, ev_want = exported["evaluation"], declared["evaluation"]
    assert ev_got["draws"] == ev_want["draws"] and ev_got["initial"] == ev_want["initial"]
    assert ev_got["mean_initial_val_loss"] == pytest.approx(ev_want["mean_initial_val_loss"], rel=1e-4)
    assert ev_got["mean_learned_val_loss"] == pytest.approx(ev_want["mean_learned_val_loss"], rel=1e-4)
