"""gradtune.Client with a CNN: describe_model's cnn spec, and tune() with 4-D images (against a
recording transport: the body it submits is a valid job)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gradtune.client import describe_model
from service.schemas import JobCreate
from tests.helpers.support import mock_client
from worker.engine.cnn import build_cnn


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, (2, 2), stride=2),
        nn.Tanh(),
        nn.AvgPool2d(2, stride=1),
        nn.Flatten(),
        nn.Linear(6, 16),
        nn.Tanh(),
        nn.Linear(16, 10),
    )


def test_describe_cnn_round_trips_through_the_engine_builder():
    model = small_cnn()
    spec = describe_model(model)
    assert spec == {
        "kind": "cnn",
        "layers": [
            {"type": "conv2d", "out_channels": 4, "kernel_size": 3, "stride": 1, "padding": 1},
            {"type": "relu"},
            {"type": "maxpool", "kernel_size": 2, "stride": 2},
            {"type": "conv2d", "out_channels": 6, "kernel_size": 2, "stride": 2, "padding": 0},
            {"type": "tanh"},
            {"type": "avgpool", "kernel_size": 2, "stride": 1},
            {"type": "flatten"},
            {"type": "linear", "out_features": 16},
            {"type": "tanh"},
            {"type": "linear", "out_features": 10},
        ],
    }
    JobCreate.model_validate(
        {
            "tasks": [
                {
                    "data": {"source": "builtin", "name": "digits"},
                    "model": spec,
                    "loss": "cross_entropy",
                    "steps": 1,
                    "batch_size": 1,
                }
            ]
        }
    )
    built = build_cnn(spec["layers"], (1, 8, 8), draw_seed=0, out_features=10)
    assert [(n, p.shape) for n, p in built.named_parameters()] == [(n, p.shape) for n, p in model.named_parameters()]
    assert [type(m) for m in built] == [type(m) for m in model]
    x = torch.randn(3, 1, 8, 8)
    built.load_state_dict(model.state_dict())
    assert torch.equal(built(x), model(x))


@pytest.mark.parametrize(
    "layer, words",
    [
        (nn.Conv2d(1, 4, 3, dilation=2), "dilation"),
        (nn.Conv2d(1, 4, 3, groups=1, bias=False), "bias"),
        (nn.Conv2d(1, 4, 3, padding="same"), "padding"),
        (nn.Conv2d(1, 4, (3, 2)), "square kernel_size"),
        (nn.BatchNorm2d(1), "layer 0 is BatchNorm2d"),
        (nn.MaxPool2d(2, ceil_mode=True), "ceil_mode"),
    ],
)
def test_describe_cnn_refuses_what_the_server_cannot_build(layer, words):
    with pytest.raises(ValueError, match=words):
        describe_model(nn.Sequential(layer, nn.Flatten(), nn.LazyLinear(3)))


def test_tune_uploads_images_and_submits_a_cnn_job():
    seen: dict = {}
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(size=(20, 1, 8, 8)), dtype=torch.float32)
    y = torch.arange(20) % 10
    client = mock_client(seen)
    settings = client.tune(
        small_cnn(), (x, y), (x[:5], y[:5]), loss="cross_entropy", steps=5, batch_size=4, progress=False
    )
    assert (settings.lr, settings.momentum) == (0.1, 0.5)
    job = JobCreate.model_validate(seen["job"])
    assert job.tasks[0].model.kind == "cnn" and len(job.tasks[0].model.layers) == 10
    assert job.meta.search == "stencil" and job.meta.iterations == 40  # the server's defaults
    client.tune(
        small_cnn(),
        (x, y),
        (x[:5], y[:5]),
        loss="cross_entropy",
        steps=5,
        batch_size=4,
        progress=False,
        search="line",
        iterations=3,
    )
    job = JobCreate.model_validate(seen["job"])
    assert (job.meta.search, job.meta.iterations) == ("line", 3)
    assert b'"shape":[20,1,8,8]' in seen["uploads"][0]
    with pytest.raises(ValueError, match=r"images \(N, 1, H, W\)"):
        client.tune(
            small_cnn(),
            (x.view(20, 64), y),
            (x[:5], y[:5]),
            loss="cross_entropy",
            steps=5,
            batch_size=4,
            progress=False,
        )
    with pytest.raises(ValueError, match="targets need 3"):
        client.tune(
            small_cnn(), (x, y % 3), (x[:5], y[:5] % 3), loss="cross_entropy", steps=5, batch_size=4, progress=False
        )
