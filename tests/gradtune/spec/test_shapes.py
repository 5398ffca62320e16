"""gradtune.spec.shapes against torch: the nn.Sequential is built here, in the test, from the layers'
own definitions (nn.Linear, nn.Conv2d, ...), and its output shapes, parameters, activations and
multiply-adds are read off a real forward pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradtune.spec.shapes import SpecError, cnn_shapes, mlp_shapes

ACTS = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}


def torch_mlp(widths, activation):
    layers = []
    for i, (a, b) in enumerate(zip(widths, widths[1:], strict=False)):
        if i:
            layers.append(ACTS[activation]())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


def torch_cnn(layers, in_shape, out):
    """The stack built with torch's own modules, input widths found by running it."""
    mods = []
    x = torch.zeros(1, *in_shape)
    for layer in layers:
        kind = layer["type"]
        if kind == "conv2d":
            m = nn.Conv2d(
                x.shape[1],
                layer["out_channels"],
                layer["kernel_size"],
                stride=layer.get("stride", 1),
                padding=layer.get("padding", 0),
            )
        elif kind in ("maxpool", "avgpool"):
            cls = nn.MaxPool2d if kind == "maxpool" else nn.AvgPool2d
            m = cls(layer["kernel_size"], stride=layer.get("stride") or layer["kernel_size"])
        elif kind == "flatten":
            m = nn.Flatten()
        elif kind == "linear":
            m = nn.Linear(x.shape[1], layer.get("out_features") or out)
        else:
            m = {"relu": nn.ReLU, "tanh": nn.Tanh}[kind]()
        mods.append(m)
        x = m(x)
    return nn.Sequential(*mods)


def measured(model, in_shape):
    """Per-layer output shapes, parameters, activations (input + every output) and multiply-adds
    of one example, from a forward pass with hooks."""
    shapes, macs = [], []

    def hook(m, inputs, out):
        shapes.append(tuple(out.shape[1:]))
        if isinstance(m, nn.Linear):
            macs.append(m.in_features * m.out_features)
        elif isinstance(m, nn.Conv2d):
            macs.append(out[0].numel() * m.weight[0].numel())
        else:
            macs.append(0)

    handles = [m.register_forward_hook(hook) for m in model]
    model(torch.zeros(1, *in_shape))
    for h in handles:
        h.remove()
    acts = torch.zeros(in_shape).numel() + sum(torch.zeros(s).numel() for s in shapes)
    return shapes, sum(p.numel() for p in model.parameters()), acts, sum(macs)


@pytest.mark.parametrize(
    "widths, activation",
    [
        ([64, 32, 10], "tanh"),
        ([3, 1], "relu"),
        ([13, 100, 50, 7, 3], "gelu"),
        ([4, 4096, 2], "sigmoid"),
    ],
)
def test_mlp_shapes_match_torch(widths, activation):
    spec = mlp_shapes(widths[0], widths[1:-1], widths[-1], activation)
    shapes, params, acts, macs = measured(torch_mlp(widths, activation), (widths[0],))
    assert spec.shapes == shapes
    assert spec.params == params
    assert spec.activations == acts == widths[0] + 2 * sum(widths[1:-1]) + widths[-1]
    assert spec.macs == macs
    assert spec.out_features == widths[-1] and spec.in_size == widths[0]
    assert [layer.kind for layer in spec.layers][1::2] == [activation] * (len(widths) - 2)


CNNS = [
    (
        (1, 4, 4),
        [
            {"type": "conv2d", "out_channels": 4, "kernel_size": 3, "padding": 1},
            {"type": "relu"},
            {"type": "maxpool", "kernel_size": 2},
            {"type": "flatten"},
            {"type": "linear"},
        ],
    ),
    (
        (3, 17, 13),
        [
            {"type": "conv2d", "out_channels": 8, "kernel_size": 5, "stride": 2, "padding": 2},
            {"type": "tanh"},
            {"type": "avgpool", "kernel_size": 3, "stride": 1},
            {"type": "conv2d", "out_channels": 6, "kernel_size": 2, "stride": 3},
            {"type": "relu"},
            {"type": "flatten"},
            {"type": "linear", "out_features": 11},
            {"type": "relu"},
            {"type": "linear", "out_features": 5},
        ],
    ),
    ((2, 6, 6), [{"type": "maxpool", "kernel_size": 3}, {"type": "flatten"}, {"type": "linear"}]),
]


@pytest.mark.parametrize("in_shape, layers", CNNS)
def test_cnn_shapes_match_torch(in_shape, layers):
    spec = cnn_shapes(layers, in_shape, 5)
    shapes, params, acts, macs = measured(torch_cnn(layers, in_shape, 5), in_shape)
    assert spec.shapes == shapes
    assert spec.params == params
    assert spec.activations == acts
    assert spec.macs == macs
    assert spec.out_features == 5


def test_cnn_layers_may_be_objects():
    class Layer:
        def __init__(self, **kw):
            self.type, self.out_channels, self.kernel_size, self.stride, self.padding, self.out_features = (
                kw.get("type"),
                kw.get("out_channels"),
                kw.get("kernel_size"),
                kw.get("stride"),
                kw.get("padding"),
                kw.get("out_features"),
            )

    in_shape, layers = CNNS[1]
    assert cnn_shapes([Layer(**d) for d in layers], in_shape, 5).shapes == cnn_shapes(layers, in_shape, 5).shapes


@pytest.mark.parametrize(
    "layers, index, field, type_, words",
    [
        (
            [{"type": "conv2d", "out_channels": 2, "kernel_size": 5}, {"type": "flatten"}, {"type": "linear"}],
            0,
            "kernel_size",
            "cnn_shape",
            ["layer 0 (conv2d)", "4x4 images", "kernel of 5"],
        ),
        (
            [{"type": "flatten"}, {"type": "maxpool", "kernel_size": 2}, {"type": "linear"}],
            1,
            "type",
            "cnn_structure",
            ["layer 1 (maxpool) comes after flatten"],
        ),
        ([{"type": "linear", "out_features": 3}], 0, "type", "cnn_structure", ["flatten layer before"]),
        (
            [{"type": "flatten"}, {"type": "flatten"}, {"type": "linear"}],
            1,
            "type",
            "cnn_structure",
            ["second flatten"],
        ),
        (
            [{"type": "flatten"}, {"type": "linear", "out_features": 4}],
            1,
            "out_features",
            "cnn_outputs",
            ["4 outputs but the targets need 3"],
        ),
        (
            [{"type": "flatten"}, {"type": "linear"}, {"type": "linear"}],
            1,
            "out_features",
            "missing",
            ["needs out_features"],
        ),
        ([{"type": "flatten"}, {"type": "relu"}], 1, "type", "cnn_structure", ["must end with a linear layer"]),
        ([{"type": "dropout"}, {"type": "flatten"}, {"type": "linear"}], 0, "type", "cnn_structure", ["unknown type"]),
    ],
)
def test_impossible_stacks_name_the_layer(layers, index, field, type_, words):
    with pytest.raises(SpecError) as err:
        cnn_shapes(layers, (1, 4, 4), 3)
    e = err.value
    assert isinstance(e, ValueError)
    assert (e.index, e.field, e.type) == (index, field, type_)
    for w in words:
        assert w in str(e)


def test_torch_agrees_the_kernel_does_not_fit():
    """The first case above: torch refuses to run it too."""
    model = nn.Sequential(nn.Conv2d(1, 2, 5))
    with pytest.raises(RuntimeError):
        model(torch.zeros(1, 1, 4, 4))


@pytest.mark.parametrize("in_shape", [(4, 4), (0, 4, 4), (1, 2, 3, 4)])
def test_cnn_needs_images(in_shape):
    with pytest.raises(SpecError, match="images"):
        cnn_shapes([{"type": "flatten"}, {"type": "linear"}], in_shape, 3)


def test_mlp_refuses_bad_widths_and_activations():
    with pytest.raises(SpecError, match="positive"):
        mlp_shapes(4, [0], 3)
    with pytest.raises(SpecError, match="activation"):
        mlp_shapes(4, [2], 3, "softplus")
