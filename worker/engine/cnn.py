"""The ``cnn`` model kind: a declarative stack of layers -> nn.Sequential, in that order.

Layers (dicts, as in the job body): ``{"type": "conv2d", "out_channels", "kernel_size", "stride"
(1), "padding" (0)}``, ``{"type": "relu" | "tanh"}``, ``{"type": "maxpool" | "avgpool",
"kernel_size", "stride" (= kernel_size)}``, ``{"type": "flatten"}``, ``{"type": "linear",
"out_features"}``. Each layer is one entry of the Sequential, so parameter names are
"<index>.weight" / "<index>.bias" exactly as nn.Sequential's named_parameters() gives them. The
last layer must be linear; its out_features may be omitted (None): it is then ``out_features``
(the number of classes, or the target width). Input: images (N, C, H, W).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gradtune.spec.shapes import SpecError
from gradtune.spec.shapes import cnn_shapes as spec_cnn_shapes
from gradtune.spec.vocab import CNN_LAYER_TYPES

from .errors import EngineError
from .modules import ModuleTask
from .tasks import derive_seed

LAYER_TYPES = CNN_LAYER_TYPES  # the old name, kept importable


def _get(layer: Any, key: str, default: Any = None) -> Any:
    if isinstance(layer, Mapping):
        return layer.get(key, default)
    value = getattr(layer, key, default)
    return default if value is None and default is not None else value


def cnn_shapes(
    spec_layers: Sequence[Any], in_shape: Sequence[int], out_features: int | None = None
) -> list[tuple[int, ...]]:
    """Output shape (per example) of every layer (gradtune.spec.shapes.cnn_shapes, the arithmetic the
    API checks a job with); EngineError naming the layer when impossible."""
    try:
        return spec_cnn_shapes(spec_layers, in_shape, out_features).shapes
    except SpecError as e:
        raise EngineError(e.message) from e


def build_cnn(
    spec_layers: Sequence[Any], in_shape: Sequence[int], draw_seed: int | None, out_features: int | None = None
) -> nn.Sequential:
    """nn.Sequential of the stack, PyTorch's default initialization drawn in float32 on the CPU
    under torch.manual_seed(draw_seed) (the global RNG is left untouched; None: the current RNG)."""
    shapes = cnn_shapes(spec_layers, in_shape, out_features)
    ins = [tuple(int(s) for s in in_shape), *shapes[:-1]]

    def make() -> nn.Sequential:
        mods: list[nn.Module] = []
        for layer, before, after in zip(spec_layers, ins, shapes, strict=True):
            kind = _get(layer, "type")
            if kind == "conv2d":
                mods.append(
                    nn.Conv2d(
                        before[0],
                        after[0],
                        int(_get(layer, "kernel_size")),
                        stride=int(_get(layer, "stride", 1)),
                        padding=int(_get(layer, "padding", 0)),
                    )
                )
            elif kind == "relu":
                mods.append(nn.ReLU())
            elif kind == "tanh":
                mods.append(nn.Tanh())
            elif kind in ("maxpool", "avgpool"):
                k = int(_get(layer, "kernel_size"))
                s = int(_get(layer, "stride", None) or k)
                mods.append(nn.MaxPool2d(k, stride=s) if kind == "maxpool" else nn.AvgPool2d(k, stride=s))
            elif kind == "flatten":
                mods.append(nn.Flatten())
            else:
                mods.append(nn.Linear(before[0], after[0]))
        return nn.Sequential(*mods)

    if draw_seed is None:
        return make()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(draw_seed))
        return make()


def cnn_task(
    name: str,
    x_train: Tensor,
    y_train: Tensor,
    x_val: Tensor,
    y_val: Tensor,
    layers: Sequence[Any],
    loss: str,
    out_features: int,
    steps: int,
    batch_size: int,
    seed: int,
) -> ModuleTask:
    """A ModuleTask whose model of draw d is build_cnn(layers, x's (C, H, W), derive_seed("init",
    seed, d), out_features): the same seed rule as tasks.build_model."""
    if x_train.dim() != 4:
        raise EngineError(f"Task {name!r}: a cnn needs images (rows, channels, height, width).")
    in_shape = tuple(x_train.shape[1:])
    layers = [dict(layer) if isinstance(layer, Mapping) else layer for layer in layers]
    cnn_shapes(layers, in_shape, out_features)  # fail early, with the layer's index

    def make(draw: int) -> nn.Module:
        return build_cnn(layers, in_shape, derive_seed("init", seed, draw), out_features)

    return ModuleTask(
        name=name,
        x_train=x_train,
        y_train=y_train,
        x_val=x_val,
        y_val=y_val,
        loss=loss,
        steps=steps,
        batch_size=batch_size,
        seed=seed,
        make_model=make,
    )
