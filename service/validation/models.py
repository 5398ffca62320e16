"""The model of a task: a cnn's layers (shapes through gradtune.spec.shapes) and an uploaded
exported program (its example shape and outputs against the data)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gradtune.spec.shapes import ModelShapes, SpecError, cnn_shapes, prod
from service.schemas import ExportedModelRef, ModelPublic, TaskSpec
from service.validation.common import TaskIO, _err, cnn_of, exported_of


def cnn_layer_shapes(
    loc: list[Any], layers: list[Any], in_shape: tuple[int, int, int], d_out: int
) -> tuple[list[tuple[int, ...]], list[dict]]:
    """Output shape of each cnn layer (per example), or errors naming the layer (``loc`` is the
    model's): gradtune.spec.shapes.cnn_shapes, the arithmetic worker/engine/cnn.py builds with."""
    try:
        return cnn_model_shapes(layers, in_shape, d_out).shapes, []
    except SpecError as e:
        return [], [_spec_error(loc, e)]


def cnn_model_shapes(layers: list[Any], in_shape: tuple[int, ...], d_out: int) -> ModelShapes:
    """The cnn's shapes, parameters and activations (SpecError: see cnn_layer_shapes)."""
    return cnn_shapes(layers, in_shape, d_out)


def _spec_error(loc: list[Any], e: SpecError) -> dict[str, Any]:
    where = [*loc] if e.index is None else [*loc, "layers", e.index]
    return _err(where if e.field is None else [*where, e.field], e.message, e.type)


def cnn_shapes_or_errors(i: int, task: TaskSpec, io: TaskIO) -> tuple[ModelShapes | None, list[dict]]:
    """A cnn task's shapes through its layers, or the errors naming the layer."""
    try:
        return cnn_model_shapes(cnn_of(task).layers, tuple(io.features), io.d_out), []
    except SpecError as e:
        return None, [_spec_error(["tasks", i, "model"], e)]


def _exported_model(
    i: int, task: TaskSpec, models: Mapping[str, ModelPublic]
) -> tuple[ModelPublic | None, list[dict[str, Any]]]:
    """The uploaded model a ``kind: exported`` task names, or errors: it does not exist, it takes
    examples that are neither rows nor images, or ``init: default`` cannot re-draw its weights."""
    ref = exported_of(task)
    loc: list[Any] = ["tasks", i, "model"]
    program = models.get(ref.model)
    if program is None:
        return None, [
            _err(
                [*loc, "model"],
                f"model {ref.model} not found; upload a .pt2 archive with POST /v1/models and use the id it returns",
                "model_not_found",
            )
        ]
    errors = []
    if len(program.input_shape) not in (1, 3):
        errors.append(
            _err(
                [*loc, "model"],
                f"model {ref.model} ({program.filename}) takes examples of shape "
                f"{program.input_shape}; gradtune feeds rows of features (N, F) or images "
                "(N, C, H, W)",
                "model_input_rank",
            )
        )
    if ref.init == "default" and not program.default_init:
        errors.append(
            _err(
                [*loc, "init"],
                f"model {ref.model} ({program.filename}) has parameters outside "
                "linear and conv2d layers (or shares one between layers), which have no PyTorch "
                "default initialization to re-draw; use init 'uploaded' to start from the "
                "uploaded weights",
                "init_unavailable",
            )
        )
    return (None, errors) if errors else (program, [])


def _x_loc(i: int, task: TaskSpec, from_dataset: bool) -> list[Any]:
    if from_dataset:
        return ["tasks", i, "data", "train", "x"]
    if task.data.source == "builtin":
        return ["tasks", i, "data", "name"]
    return ["tasks", i, "data", "x_train"]


def check_exported_io(i: int, task: TaskSpec, io: TaskIO, program: ModelPublic, from_dataset: bool) -> list[dict]:
    """The data's example shape and targets against the program."""
    features, d_out = io.features, io.d_out
    shape = list(features) if isinstance(features, tuple) else [int(features)]
    label = f"model {program.id} ({program.filename})"
    if shape != list(program.input_shape):
        return [
            _err(
                _x_loc(i, task, from_dataset),
                f"the examples have shape {shape} but {label} was exported "
                f"for examples of shape {list(program.input_shape)}",
                "shape_mismatch",
            )
        ]
    width = program.output_width
    if task.loss == "cross_entropy" and d_out > width:
        return [
            _err(
                ["tasks", i, "model", "model"],
                f"the labels go up to {d_out - 1} ({d_out} classes) but "
                f"{label} has {width} outputs; cross_entropy needs one output per class",
                "model_outputs",
            )
        ]
    if task.loss == "mse" and d_out != width:
        return [
            _err(
                ["tasks", i, "model", "model"],
                f"the mse targets have width {d_out} but {label} has {width} outputs; they must be equal",
                "model_outputs",
            )
        ]
    return []


def exported_terms(program: ModelPublic) -> tuple[int, int, int]:
    """(parameters, activations per example, multiply-adds per example) of an exported program:
    its input and every node's output; linear and conv2d nodes' products from their weights."""
    shapes = {p.name: p.shape for p in program.parameters}
    acts = prod(program.input_shape)
    macs = 0
    for node in program.nodes:
        out = prod(node.output_shape) if node.output_shape else 0
        acts += out
        weights = [shapes[n] for n in node.parameters if n in shapes and len(shapes[n]) >= 2]
        if weights and node.op in ("linear", "conv2d"):
            w = weights[0]
            macs += out * prod(w[1:])  # per output element: in (linear) or in_channels * k * k (conv2d)
    return program.parameter_count, acts, macs


def exported_slots(program: ModelPublic) -> int:
    """Per-layer slots of a program: the modules its parameters belong to."""
    return len({p.name.rpartition(".")[0] for p in program.parameters}) or 1


def is_exported(task: TaskSpec) -> bool:
    return isinstance(task.model, ExportedModelRef)
