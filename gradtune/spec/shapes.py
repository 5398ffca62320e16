"""Model shapes: what every layer of an ``mlp`` or a ``cnn`` outputs per example, and what it costs.

Written once for the API (service/validation checks a job body with it) and the engine
(worker/engine/cnn.py builds the ``nn.Sequential`` from it); standard library only. A model is the
``nn.Sequential`` the engine builds, one entry per layer:

* ``mlp``: ``Linear, act, Linear, act, ..., Linear`` for widths ``[in, *hidden, out]``;
* ``cnn``: the job's layers in order (conv2d, relu/tanh, maxpool/avgpool, flatten, linear), where
  a conv2d or pool outputs ``(size + 2 * padding - kernel) // stride + 1`` per side (pools: no
  padding, stride = kernel unless given) and the last linear layer may leave ``out_features`` out
  (it is then the number of classes or the target width).

For each layer: its output shape per example, its parameters (weights and biases) and its
multiply-adds per example (linear: ``in * out``; conv2d: ``out elements * in_channels * k * k``).
``activations`` is the input's elements plus every layer's output elements: what one example
leaves behind in one forward pass (gradtune.spec.costs scales it by the batch).

A stack that cannot work raises :class:`SpecError` (a ValueError) naming the layer, with the
layer's index, the field at fault and a type the API reports as a 422.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gradtune.spec.vocab import ACTIVATIONS, CNN_LAYER_TYPES


class SpecError(ValueError):
    """A model the spec cannot size. ``index``: the layer at fault (None: the model as a whole);
    ``field``: its field at fault ("type", "kernel_size", "out_features"...); ``type``: the kind of
    problem, as the API reports it ("cnn_structure", "cnn_shape", "cnn_outputs", "missing")."""

    def __init__(
        self, message: str, index: int | None = None, field: str | None = None, type: str = "cnn_structure"
    ) -> None:
        super().__init__(message)
        self.message = message
        self.index = index
        self.field = field
        self.type = type


@dataclass(frozen=True)
class LayerShape:
    """One layer: its kind, its output shape per example, parameters and multiply-adds per example."""

    kind: str
    shape: tuple[int, ...]
    params: int = 0
    macs: int = 0

    @property
    def size(self) -> int:
        return prod(self.shape)


@dataclass(frozen=True)
class ModelShapes:
    """A model's input shape and its layers, in order."""

    in_shape: tuple[int, ...]
    layers: tuple[LayerShape, ...]

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """The output shape of every layer, per example."""
        return [layer.shape for layer in self.layers]

    @property
    def in_size(self) -> int:
        return prod(self.in_shape)

    @property
    def out_features(self) -> int:
        return self.layers[-1].size

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def activations(self) -> int:
        """Elements one example leaves in a forward pass: its input and every layer's output."""
        return self.in_size + sum(layer.size for layer in self.layers)

    @property
    def macs(self) -> int:
        """Multiply-adds of one example's forward pass (linear and conv2d layers)."""
        return sum(layer.macs for layer in self.layers)


def prod(values: Sequence[int]) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def _text(shape: Sequence[int]) -> str:
    return "x".join(str(int(v)) for v in shape)


# --------------------------------------------------------------------------- mlp


def mlp_shapes(in_features: int, hidden: Sequence[int], out_features: int, activation: str = "tanh") -> ModelShapes:
    """Linear, act, ..., Linear for widths [in_features, *hidden, out_features]."""
    if activation not in ACTIVATIONS:
        raise SpecError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}", None, "activation")
    widths = [int(in_features), *(int(h) for h in hidden), int(out_features)]
    for i, w in enumerate(widths):
        if w < 1:
            raise SpecError(
                f"layer widths must be positive, got {widths}", None if i == 0 else i - 1, "hidden", "mlp_shape"
            )
    layers: list[LayerShape] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:], strict=False)):
        if i > 0:
            layers.append(LayerShape(activation, (a,)))
        layers.append(LayerShape("linear", (b,), params=(a + 1) * b, macs=a * b))
    return ModelShapes((widths[0],), tuple(layers))


# --------------------------------------------------------------------------- cnn


def _get(layer: Any, key: str, default: Any = None) -> Any:
    """A layer field from a mapping (the job body's dicts) or an object (the API's pydantic layers)."""
    value = layer.get(key, default) if isinstance(layer, Mapping) else getattr(layer, key, default)
    return default if value is None else value


def _window(i: int, kind: str, layer: Any, shape: tuple[int, ...]) -> LayerShape:
    """A conv2d or pool layer on (C, H, W) images."""
    if len(shape) != 3:
        raise SpecError(
            f"layer {i} ({kind}) comes after flatten; conv2d and pool layers need images and must come before flatten",
            i,
            "type",
        )
    k = int(_get(layer, "kernel_size"))
    if kind == "conv2d":
        s, p, c = int(_get(layer, "stride", 1)), int(_get(layer, "padding", 0)), int(_get(layer, "out_channels"))
    else:
        s, p, c = int(_get(layer, "stride", k)), 0, shape[0]
    h, w = (shape[1] + 2 * p - k) // s + 1, (shape[2] + 2 * p - k) // s + 1
    if h < 1 or w < 1:
        raise SpecError(
            f"layer {i} ({kind}) gets {shape[1]}x{shape[2]} images and a kernel of {k} (padding {p}) "
            "does not fit: its output would be empty; use a smaller kernel, more padding, or fewer "
            "layers before it",
            i,
            "kernel_size",
            "cnn_shape",
        )
    if kind != "conv2d":
        return LayerShape(kind, (c, h, w))
    fan_in = shape[0] * k * k
    return LayerShape(kind, (c, h, w), params=c * (fan_in + 1), macs=c * h * w * fan_in)


def _linear(i: int, layer: Any, shape: tuple[int, ...], last: bool, out_features: int | None) -> LayerShape:
    if len(shape) != 1:
        raise SpecError(
            f"layer {i} (linear) gets {_text(shape)} images: put a flatten layer before the first linear layer",
            i,
            "type",
        )
    o = _get(layer, "out_features")
    if last:
        if o is None:
            o = out_features
        elif out_features is not None and int(o) != int(out_features):
            raise SpecError(
                f"the last linear layer has {o} outputs but the targets need {out_features}; leave "
                f"out_features out to use {out_features}",
                i,
                "out_features",
                "cnn_outputs",
            )
    if o is None:
        raise SpecError(
            f"layer {i} (linear) needs out_features (only the last linear layer may leave it out)",
            i,
            "out_features",
            "missing",
        )
    o = int(o)
    return LayerShape("linear", (o,), params=(shape[0] + 1) * o, macs=shape[0] * o)


def _cnn_layer(i: int, layer: Any, shape: tuple[int, ...], last: bool, out_features: int | None) -> LayerShape:
    kind = _get(layer, "type")
    if kind not in CNN_LAYER_TYPES:
        raise SpecError(
            f"layer {i}: unknown type {kind!r}; a cnn layer is one of {', '.join(CNN_LAYER_TYPES)}", i, "type"
        )
    if kind in ("conv2d", "maxpool", "avgpool"):
        return _window(i, kind, layer, shape)
    if kind == "flatten":
        if len(shape) != 3:
            raise SpecError(f"layer {i} is a second flatten", i, "type")
        return LayerShape(kind, (prod(shape),))
    if kind == "linear":
        return _linear(i, layer, shape, last, out_features)
    return LayerShape(kind, shape)  # relu, tanh


def cnn_shapes(layers: Sequence[Any], in_shape: Sequence[int], out_features: int | None = None) -> ModelShapes:
    """The stack on (C, H, W) images. ``layers``: mappings (the job body's dicts) or objects with the
    same attributes. ``out_features``: the outputs the targets need (the last linear layer's
    out_features when it leaves it out; it must equal it when it gives it). SpecError names the
    first layer that cannot work."""
    shape: tuple[int, ...] = tuple(int(s) for s in in_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise SpecError(f"a cnn takes images (channels, height, width); got examples of shape {list(shape)}")
    if not layers:
        raise SpecError("a cnn needs at least one layer", None, "layers")
    last = len(layers) - 1
    if _get(layers[last], "type") != "linear":
        raise SpecError(
            f"the last layer is {_get(layers[last], 'type')}; a cnn must end with a linear layer (its "
            "outputs are the class scores or the regression targets)",
            last,
            "type",
        )
    out: list[LayerShape] = []
    here: tuple[int, ...] = shape
    for i, layer in enumerate(layers):
        item = _cnn_layer(i, layer, here, i == last, out_features)
        out.append(item)
        here = item.shape
    return ModelShapes(shape, tuple(out))
