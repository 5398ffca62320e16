"""Checks on a job body that pydantic's field-by-field validation cannot make.

``check_job`` returns a list of errors in the shape of FastAPI's validation errors,
``{"loc": ["body", "tasks", 0, "data", "x_val"], "msg": "...", "type": "..."}``, so that the
API answers them exactly like schema errors (422 with the field path and a sentence).
Only the first offending row of an array is reported: bodies can hold megabytes of numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from service.schemas import (
    BUILTIN_DATASETS,
    BuiltinData,
    CNNModel,
    DatasetData,
    DatasetPublic,
    DatasetRef,
    ExportedModelRef,
    InlineData,
    JobCreate,
    MetaOptions,
    ModelPublic,
    TaskSpec,
)
from service.settings import Settings

FLOAT_BYTES = 4  # the engine unrolls in float32
GIB = 1024**3


def _err(loc: list[Any], msg: str, type_: str) -> dict[str, Any]:
    return {"loc": ["body", *loc], "msg": msg, "type": type_}


def builtin_split_sizes(data: BuiltinData) -> tuple[int, int]:
    """(train rows, validation rows) of a builtin dataset split by ``val_fraction``."""
    n = BUILTIN_DATASETS[data.name]["n"]
    n_val = max(1, round(n * data.val_fraction))
    return n - n_val, n_val


def _is_2d(y: list) -> bool:
    return bool(y) and isinstance(y[0], list)


def _class_count(task: TaskSpec) -> int | None:
    """C for cross_entropy: classes of a builtin, else max label + 1 (None if labels are bad)."""
    data = task.data
    if isinstance(data, BuiltinData):
        return BUILTIN_DATASETS[data.name]["classes"]
    labels = []
    for y in (data.y_train, data.y_val):
        if _is_2d(y):
            return None
        labels.extend(y)
    if not labels or any(v < 0 or not float(v).is_integer() for v in labels):
        return None
    return int(max(labels)) + 1


def _a(task: TaskSpec, images: bool) -> str:
    """The task's model in a sentence: "a cnn", "an mlp" or "this exported model"."""
    if isinstance(task.model, ExportedModelRef):
        return "this exported model"
    return "a cnn" if images else "an mlp"


def _is_cnn(task: TaskSpec) -> bool:
    return isinstance(task.model, CNNModel)


def _inline_out_width(task: TaskSpec) -> int:
    """Output width of an inline or builtin task: classes for cross_entropy, else target width."""
    data = task.data
    if task.loss == "cross_entropy":
        return _class_count(task) or 1
    if isinstance(data, InlineData) and _is_2d(data.y_train):
        return len(data.y_train[0])
    return 1  # one regression target, or class labels read as one float column


def layer_widths(task: TaskSpec, io: tuple[int, int] | None = None) -> list[int]:
    """[input width, *hidden, output width] of the task's MLP, as far as the body tells.

    ``io`` gives (input width, output width) where the body alone cannot: a ``source: dataset``
    task's widths come from the datasets' stored metadata (see ``check_job``).
    """
    data = task.data
    if io is not None:
        return [io[0], *task.model.hidden, io[1]]
    if isinstance(data, DatasetData):
        raise ValueError("the widths of a dataset task come from its datasets' metadata: pass io")
    if isinstance(data, BuiltinData):
        facts = BUILTIN_DATASETS[data.name]
        d_in = facts["features"]
    else:
        d_in = len(data.x_train[0]) if data.x_train else 0
    return [d_in, *task.model.hidden, _inline_out_width(task)]


def estimate_unroll_bytes(task: TaskSpec, io: tuple[int, int] | None = None) -> int:
    """Rough memory, in bytes, that reverse-mode differentiation through one task's unroll holds.

    Differentiating the validation loss after ``steps`` SGD steps with respect to the
    hyperparameters keeps every step's intermediate values alive until the backward pass.
    Per step, in float32 (4 bytes):

    * ``3 * P``: the step's new parameters, new momentum buffer and the (differentiable)
      gradient, where ``P = sum((w_i + 1) * w_{i+1})`` counts weights and biases of the MLP
      with layer widths ``w = [d_in, *hidden, d_out]``;
    * ``2 * A``: the activations of one batch saved for the backward pass, and as much again
      for the gradient's own graph (second-order terms), where
      ``A = batch_size * (d_in + 2 * sum(hidden) + d_out)`` (input, pre- and post-activation of
      each hidden layer, output).

    Total: ``4 * (steps * (3P + 2A) + 2P)`` (plus the starting parameters and buffer). It
    ignores allocator overhead and the data set itself, and errs on the small side for
    small models where per-tensor overheads dominate; it is a guard against requests that
    cannot fit, not a prediction.
    """
    widths = layer_widths(task, io)
    params = sum((a + 1) * b for a, b in zip(widths, widths[1:]))
    acts = task.batch_size * (widths[0] + 2 * sum(task.model.hidden) + widths[-1])
    return FLOAT_BYTES * (task.steps * (3 * params + 2 * acts) + 2 * params)


# Hyperparameters a forward-mode tangent is carried for, at most (per-layer x segments x 2); the
# estimate below takes a generous constant rather than the job's exact count.
_FORWARD_TANGENTS = 8


def method_bytes(reverse_bytes: int, steps: int, meta: MetaOptions) -> int:
    """The memory ``meta.method`` needs, from reverse mode's estimate through all ``steps``.

    reverse holds every step; truncated holds the last ``truncation`` steps; forward holds one step
    and a tangent per hyperparameter, whatever the steps; auto takes reverse when it fits and
    forward otherwise, so it needs the smaller of the two. Rough, like the estimates it scales.
    """
    per_step = reverse_bytes / max(1, steps)
    if meta.method == "reverse":
        return reverse_bytes
    if meta.method == "truncated":
        return int(per_step * min(steps, meta.truncation))
    forward = int(per_step * (1 + _FORWARD_TANGENTS))
    return forward if meta.method == "forward" else min(reverse_bytes, forward)


def cnn_layer_shapes(
    loc: list[Any], layers: list[Any], in_shape: tuple[int, int, int], d_out: int
) -> tuple[list[tuple[int, ...]], list[dict]]:
    """Output shape of each cnn layer (per example), or errors naming the layer (``loc`` is the
    model's). The same arithmetic as worker/engine/cnn.py: out = (size + 2 padding - kernel) //
    stride + 1; pools have no padding and stride kernel_size unless given."""
    errors: list[dict] = []
    shapes: list[tuple[int, ...]] = []
    shape: tuple[int, ...] = tuple(in_shape)
    last = len(layers) - 1
    if layers[last].type != "linear":
        return [], [_err([*loc, "layers", last, "type"], f"the last layer is {layers[last].type}; a cnn must end "
                         "with a linear layer (its outputs are the class scores or the regression targets)",
                         "cnn_structure")]
    for j, layer in enumerate(layers):
        here = [*loc, "layers", j]
        kind = layer.type
        if kind in ("conv2d", "maxpool", "avgpool"):
            if len(shape) != 3:
                errors.append(_err([*here, "type"], f"layer {j} ({kind}) comes after flatten; conv2d and pool "
                                   "layers need images and must come before flatten", "cnn_structure"))
                break
            k = layer.kernel_size
            if kind == "conv2d":
                s, p, c = layer.stride, layer.padding, layer.out_channels
            else:
                s, p, c = layer.stride or k, 0, shape[0]
            h, w = (shape[1] + 2 * p - k) // s + 1, (shape[2] + 2 * p - k) // s + 1
            if h < 1 or w < 1:
                errors.append(_err([*here, "kernel_size"], f"layer {j} ({kind}) gets {shape[1]}x{shape[2]} images "
                                   f"and a kernel of {k} (padding {p}) does not fit: its output would be empty; "
                                   "use a smaller kernel, more padding, or fewer layers before it", "cnn_shape"))
                break
            shape = (c, h, w)
        elif kind == "flatten":
            if len(shape) != 3:
                errors.append(_err([*here, "type"], f"layer {j} is a second flatten", "cnn_structure"))
                break
            shape = (shape[0] * shape[1] * shape[2],)
        elif kind == "linear":
            if len(shape) != 1:
                errors.append(_err([*here, "type"], f"layer {j} (linear) gets {_shape_text(shape)} images: put a "
                                   "flatten layer before the first linear layer", "cnn_structure"))
                break
            o = layer.out_features
            if j == last:
                if o is not None and o != d_out:
                    errors.append(_err([*here, "out_features"], f"the last linear layer has {o} outputs but the "
                                       f"targets need {d_out}; leave out_features out to use {d_out}",
                                       "cnn_outputs"))
                    break
                o = d_out
            elif o is None:
                errors.append(_err([*here, "out_features"], f"layer {j} (linear) needs out_features (only the "
                                   "last linear layer may leave it out)", "missing"))
                break
            shape = (o,)
        shapes.append(shape)
    return shapes, errors


def cnn_unroll_bytes(steps: int, batch_size: int, in_shape: tuple[int, int, int], layers: list[Any],
                     shapes: list[tuple[int, ...]]) -> int:
    """estimate_unroll_bytes for a cnn: the same formula, ``4 * (steps * (3P + 2A) + 2P)``, with P
    the weights and biases of the conv2d (``out * (in * k * k + 1)``) and linear layers, and
    ``A = batch_size * (input size + 2 * sum of every layer's output size)``."""
    params = 0
    before: tuple[int, ...] = tuple(in_shape)
    outputs = 0
    for layer, shape in zip(layers, shapes):
        if layer.type == "conv2d":
            params += shape[0] * (before[0] * layer.kernel_size**2 + 1)
        elif layer.type == "linear":
            params += (before[0] + 1) * shape[0]
        size = 1
        for v in shape:
            size *= v
        outputs += size
        before = shape
    size_in = in_shape[0] * in_shape[1] * in_shape[2]
    acts = batch_size * (size_in + 2 * outputs)
    return FLOAT_BYTES * (steps * (3 * params + 2 * acts) + 2 * params)


def _check_matrix(loc: list[Any], name: str, rows: list[list[float]]) -> tuple[int | None, list[dict]]:
    """Width of a feature matrix, or an error naming the first ragged row."""
    width = len(rows[0])
    if width == 0:
        return None, [_err([*loc, name, 0], f"{name} rows must have at least one feature", "empty_row")]
    for i, row in enumerate(rows):
        if len(row) != width:
            return None, [
                _err(
                    [*loc, name, i],
                    f"{name} is ragged: row {i} has {len(row)} values but row 0 has {width}",
                    "ragged_rows",
                )
            ]
    return width, []


def _is_images(x: list) -> bool:
    return bool(x) and isinstance(x[0], list) and bool(x[0]) and isinstance(x[0][0], list)


def _check_images(loc: list[Any], name: str, x: list) -> tuple[tuple[int, int, int] | None, list[dict]]:
    """(C, H, W) of inline images (N, C, H, W), or an error naming the first example that differs."""
    first = x[0]
    shape = (len(first), len(first[0]) if first else 0, len(first[0][0]) if first and first[0] else 0)
    if min(shape) == 0:
        return None, [_err([*loc, name, 0], f"{name}[0] has shape {list(shape)}; images need at least one "
                           "channel, row and column", "empty_row")]
    c, h, w = shape
    for i, img in enumerate(x):
        bad = len(img) != c or any(len(ch) != h or any(len(row) != w for row in ch) for ch in img)
        if bad:
            return None, [
                _err([*loc, name, i], f"{name} is ragged: image {i} is not {c}x{h}x{w} (channels x height "
                     "x width) like image 0", "ragged_rows")
            ]
    return shape, []


def _shape_text(shape: Any) -> str:
    return "x".join(str(v) for v in shape) if isinstance(shape, tuple) else f"{shape} features"


def _check_inline(loc: list[Any], task: TaskSpec, data: InlineData, images: bool) -> list[dict]:
    errors: list[dict] = []
    widths: dict[str, Any] = {}
    for name in ("x_train", "x_val"):
        x = getattr(data, name)
        if images and not _is_images(x):
            errors.append(_err([*loc, name], f"{_a(task, True)} needs images (N, C, H, W): {name} must be a list of "
                               "images, each a list of channels of rows of numbers", "x_not_images"))
            widths[name] = None
        elif not images and _is_images(x):
            errors.append(_err([*loc, name], f"{_a(task, False)} needs rows of features (N, F), but {name} holds images "
                               "(N, C, H, W); use model kind cnn, or flatten each image into a row",
                               "x_not_2d"))
            widths[name] = None
        elif images:
            widths[name], errs = _check_images(loc, name, x)
            errors += errs
        else:
            widths[name], errs = _check_matrix(loc, name, x)
            errors += errs
    if widths["x_train"] and widths["x_val"] and widths["x_train"] != widths["x_val"]:
        if images:
            msg = (f"x_val images are {_shape_text(widths['x_val'])} but x_train images are "
                   f"{_shape_text(widths['x_train'])}; train and validation images must have the same shape")
        else:
            msg = (f"x_val rows have {widths['x_val']} features but x_train rows have "
                   f"{widths['x_train']}; train and validation data must have the same width")
        errors.append(_err([*loc, "x_val"], msg, "width_mismatch"))
    for split in ("train", "val"):
        x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
        if len(x) != len(y):
            errors.append(
                _err(
                    [*loc, f"y_{split}"],
                    f"y_{split} has {len(y)} rows but x_{split} has {len(x)}; "
                    "each row of features needs exactly one target",
                    "length_mismatch",
                )
            )
    if task.loss == "cross_entropy":
        for name in ("y_train", "y_val"):
            y = getattr(data, name)
            if _is_2d(y):
                errors.append(
                    _err(
                        [*loc, name],
                        f"cross_entropy needs one integer class label per row, but {name} has "
                        "rows of targets; send a flat list of labels 0..C-1 (or use loss mse)",
                        "labels_not_1d",
                    )
                )
                continue
            for i, v in enumerate(y):
                if not float(v).is_integer() or v < 0:
                    errors.append(
                        _err(
                            [*loc, name, i],
                            f"{name}[{i}] is {v:g}: cross_entropy labels must be integers "
                            "0..C-1 (C = number of classes)",
                            "invalid_label",
                        )
                    )
                    break
    else:  # mse: one target per row, or rows of targets of one width in train and val
        shapes = {}
        for name in ("y_train", "y_val"):
            y = getattr(data, name)
            if not _is_2d(y):
                shapes[name] = None
                continue
            w, errs = _check_matrix(loc, name, y)
            errors += errs
            shapes[name] = w if not errs else "bad"
        a, b = shapes["y_train"], shapes["y_val"]
        if "bad" not in (a, b) and a != b:
            def describe(w):
                return "one target per row" if w is None else f"rows of {w} targets"

            errors.append(
                _err(
                    [*loc, "y_val"],
                    f"y_val has {describe(b)} but y_train has {describe(a)}; "
                    "mse targets must have the same width in train and validation data",
                    "width_mismatch",
                )
            )
    if not errors and task.batch_size > len(data.x_train):
        errors.append(
            _err(
                [*loc[:-1], "batch_size"],
                f"batch_size {task.batch_size} is larger than the training set "
                f"({len(data.x_train)} rows); the last partial batch is dropped, so no step could run",
                "batch_too_large",
            )
        )
    return errors


def _check_builtin(loc: list[Any], task: TaskSpec, data: BuiltinData, images: bool) -> list[dict]:
    errors: list[dict] = []
    facts = BUILTIN_DATASETS[data.name]
    if images:
        errors.append(
            _err([*loc[:-1], "model"], f"builtin dataset {data.name!r} is a table of features (N, "
                 f"{facts['features']}) and {_a(task, True)} needs images (N, C, H, W): upload the images as a 4-D "
                 "tensor (source dataset) or send them inline, or use model kind mlp", "x_not_images")
        )
    if task.loss == "cross_entropy" and facts["task"] != "classification":
        errors.append(
            _err(
                [*loc[:-1], "loss"],
                f"builtin dataset {data.name!r} is a regression dataset with real-valued "
                "targets; cross_entropy needs class labels, use loss mse",
                "loss_mismatch",
            )
        )
    n_train, n_val = builtin_split_sizes(data)
    if task.batch_size > n_train:
        errors.append(
            _err(
                [*loc[:-1], "batch_size"],
                f"batch_size {task.batch_size} is larger than the training set of "
                f"{data.name!r} ({n_train} of {facts['n']} rows at val_fraction "
                f"{data.val_fraction:g}); the last partial batch is dropped, so no step could run",
                "batch_too_large",
            )
        )
    return errors


@dataclass
class _Side:
    """What a dataset reference resolves to: rows, feature width, target width and labels."""

    n: int
    features: Any  # int (mlp), or (C, H, W) for a cnn
    y_width: int | None  # None: one target per row
    y_max: float | None


def _names(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(repr(n) for n in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _resolve(
    loc: list[Any], task: TaskSpec, ref: DatasetRef, datasets: Mapping[str, DatasetPublic], images: bool
) -> tuple[_Side | None, list[dict]]:
    """Check one ``{"dataset", "x", "y"}`` reference against the dataset's stored metadata."""
    ds = datasets.get(ref.dataset)
    if ds is None:
        return None, [
            _err([*loc, "dataset"], f"dataset {ref.dataset} not found; upload it with POST /v1/datasets "
                 "and use the id it returns", "dataset_not_found")
        ]
    tabular = ds.format in ("csv", "parquet")
    kind = "column" if tabular else "tensor"
    items = {item.name: item for item in (ds.columns if tabular else ds.tensors)}
    label = f"dataset {ds.id} ({ds.filename})"

    def missing(field_loc: list[Any], name: str) -> dict:
        return _err(
            field_loc,
            f"{label} has no {kind} {name!r}; its {kind}s are {_names(list(items))}",
            f"unknown_{kind}",
        )

    errors: list[dict] = []
    n: int | None = None
    features: Any = None
    if tabular and images:
        errors.append(
            _err([*loc, "x"], f"{label} is a {ds.format} file of columns (a table); {_a(task, True)} needs images: "
                 "upload a 4-D tensor (N, C, H, W) in a .safetensors or .npz file", "x_not_images")
        )
    elif tabular:
        names = [ref.x] if isinstance(ref.x, str) else list(ref.x)
        for j, name in enumerate(names):
            field_loc = [*loc, "x"] if isinstance(ref.x, str) else [*loc, "x", j]
            if name not in items:
                errors.append(missing(field_loc, name))
            elif names.index(name) != j:
                errors.append(_err(field_loc, f"x names column {name!r} twice", "duplicate_column"))
        n, features = ds.rows or 0, len(names)
    elif not isinstance(ref.x, str):
        errors.append(
            _err([*loc, "x"], f"{label} is a {ds.format} file of tensors: x must be the name of one "
                 "2-D tensor (rows, features), not a list (lists name columns of csv or parquet files)",
                 "x_not_a_tensor_name")
        )
    elif ref.x not in items:
        errors.append(missing([*loc, "x"], ref.x))
    elif images:
        shape = items[ref.x].shape
        if len(shape) != 4:
            errors.append(
                _err([*loc, "x"], f"tensor {ref.x!r} of {label} has shape {shape}; x must be 4-D "
                     f"(rows, channels, height, width) for {_a(task, True)}", "x_not_images")
            )
        elif min(shape[1:]) == 0:
            errors.append(_err([*loc, "x"], f"tensor {ref.x!r} of {label} has empty images (shape {shape})", "empty_row"))
        else:
            n, features = shape[0], tuple(shape[1:])
    else:
        shape = items[ref.x].shape
        if len(shape) != 2:
            errors.append(
                _err([*loc, "x"], f"tensor {ref.x!r} of {label} has shape {shape}; x must be 2-D "
                     f"(rows, features) for {_a(task, False)}" + (" (it holds images: use model kind cnn)" if len(shape) == 4 else ""),
                     "x_not_2d")
            )
        elif shape[1] == 0:
            errors.append(_err([*loc, "x"], f"tensor {ref.x!r} of {label} has no features (shape {shape})", "empty_row"))
        else:
            n, features = shape[0], shape[1]

    y_width: int | None = None
    y_max: float | None = None
    y = items.get(ref.y)
    if y is None:
        errors.append(missing([*loc, "y"], ref.y))
    else:
        shape = y.shape
        if task.loss == "cross_entropy" and len(shape) != 1:
            errors.append(
                _err([*loc, "y"], f"cross_entropy needs one integer class label per row, but {kind} "
                     f"{ref.y!r} of {label} has shape {shape}; name a 1-D tensor of labels 0..C-1 "
                     "(or use loss mse)", "labels_not_1d")
            )
        elif len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] == 0):
            errors.append(
                _err([*loc, "y"], f"{kind} {ref.y!r} of {label} has shape {shape}; y must be (rows,) "
                     "or (rows, targets)", "y_bad_shape")
            )
        else:
            y_width = shape[1] if len(shape) == 2 else None
            if n is not None and shape[0] != n:
                errors.append(
                    _err([*loc, "y"], f"y ({kind} {ref.y!r}) has {shape[0]} rows but x has {n}; each "
                         "row of features needs exactly one target", "length_mismatch")
                )
            if task.loss == "cross_entropy" and y.min is not None:
                if not y.integer or y.min < 0:
                    errors.append(
                        _err([*loc, "y"], f"cross_entropy labels must be integers 0..C-1, but {kind} "
                             f"{ref.y!r} of {label} holds values from {y.min:g} to {y.max:g}"
                             + ("" if y.integer else " that are not all whole numbers"),
                             "invalid_label")
                    )
            y_max = y.max
    if n == 0 and not errors:
        errors.append(_err([*loc, "x"], f"x of {label} has no rows", "empty"))
    if errors or n is None or features is None:
        return None, errors
    return _Side(n=n, features=features, y_width=y_width, y_max=y_max), []


def _check_dataset(
    loc: list[Any], task: TaskSpec, data: DatasetData, datasets: Mapping[str, DatasetPublic], images: bool
) -> tuple[list[dict], tuple[Any, int] | None]:
    """Errors of a ``source: dataset`` task, and its (input width, output width) when none (the
    input is an image shape (C, H, W) for a cnn)."""
    train, errors = _resolve([*loc, "train"], task, data.train, datasets, images)
    val: _Side | None = None
    if data.val is not None:
        val, errs = _resolve([*loc, "val"], task, data.val, datasets, images)
        errors += errs
    if errors or train is None:
        return errors, None
    if val is None:
        n_val = max(1, round(train.n * data.val_fraction))
        n_train = train.n - n_val
        if n_train < 1:
            return [
                _err([*loc, "val_fraction"], f"val_fraction {data.val_fraction:g} of {train.n} rows "
                     "leaves no rows for training", "split_too_small")
            ], None
        val = train
    else:
        n_train = train.n
        if val.features != train.features:
            if images:
                msg = (f"validation images are {_shape_text(val.features)} but training images are "
                       f"{_shape_text(train.features)}; train and validation images must have the same shape")
            else:
                msg = (f"validation rows have {val.features} features but training rows have "
                       f"{train.features}; train and validation data must have the same width")
            errors.append(_err([*loc, "val", "x"], msg, "width_mismatch"))
        if task.loss == "mse" and val.y_width != train.y_width:
            def describe(w):
                return "one target per row" if w is None else f"rows of {w} targets"

            errors.append(
                _err([*loc, "val", "y"], f"validation y has {describe(val.y_width)} but training y has "
                     f"{describe(train.y_width)}; mse targets must have the same width", "width_mismatch")
            )
    if not errors and task.batch_size > n_train:
        errors.append(
            _err([*loc[:-1], "batch_size"], f"batch_size {task.batch_size} is larger than the training "
                 f"set ({n_train} rows); the last partial batch is dropped, so no step could run",
                 "batch_too_large")
        )
    if errors:
        return errors, None
    if task.loss == "cross_entropy":
        top = max(v for v in (train.y_max, val.y_max) if v is not None)
        d_out = int(top) + 1
    else:
        d_out = train.y_width or 1
    return [], (train.features, d_out)


def _gib(n: float) -> str:
    return f"{n / GIB:.3g} GiB"


def check_job(
    job: JobCreate,
    settings: Settings,
    datasets: Mapping[str, DatasetPublic] | None = None,
    models: Mapping[str, ModelPublic] | None = None,
) -> list[dict[str, Any]]:
    """Errors in ``job`` beyond its schema; empty when the job can be queued.

    ``datasets`` maps dataset id to the stored description of each uploaded dataset the job
    names (``JobCreate.dataset_ids()``), ``models`` likewise for uploaded models
    (``JobCreate.model_ids()``); an id missing from them is reported as not found.
    """
    datasets = datasets or {}
    models = models or {}
    errors: list[dict[str, Any]] = []
    if len(job.tasks) > settings.max_tasks:
        errors.append(
            _err(
                ["tasks"],
                f"a job may have at most {settings.max_tasks} tasks, this one has {len(job.tasks)}",
                "too_many_tasks",
            )
        )
    if job.meta.iterations > settings.max_iterations:
        errors.append(
            _err(
                ["meta", "iterations"],
                f"iterations {job.meta.iterations} is above the limit of {settings.max_iterations}",
                "limit_exceeded",
            )
        )
    for i, task in enumerate(job.tasks):
        loc: list[Any] = ["tasks", i, "data"]
        if task.steps > settings.max_steps:
            errors.append(
                _err(
                    ["tasks", i, "steps"],
                    f"steps {task.steps} is above the limit of {settings.max_steps}",
                    "limit_exceeded",
                )
            )
        io = None
        program: ModelPublic | None = None
        if isinstance(task.model, ExportedModelRef):
            program, model_errors = _exported_model(i, task, models)
            if model_errors:
                errors += model_errors
                continue
            images = len(program.input_shape) == 3
        else:
            images = _is_cnn(task)
        if isinstance(task.data, InlineData):
            task_errors = _check_inline(loc, task, task.data, images)
        elif isinstance(task.data, DatasetData):
            task_errors, io = _check_dataset(loc, task, task.data, datasets, images)
        else:
            task_errors = _check_builtin(loc, task, task.data, images)
        errors += task_errors
        if not task_errors and program is not None:
            errors += _check_exported_task(i, task, io, program, settings.max_unroll_bytes, job.meta)
        elif not task_errors and _is_cnn(task):
            errors += _check_cnn_task(i, task, io, settings.max_unroll_bytes, job.meta)
        elif not task_errors:
            need = method_bytes(estimate_unroll_bytes(task, io), task.steps, job.meta)
            if need > settings.max_unroll_bytes:
                errors.append(
                    _err(
                        ["tasks", i, "steps"],
                        f"steps={task.steps} with batch_size={task.batch_size} and hidden="
                        f"{task.model.hidden} needs about {_gib(need)} to differentiate through "
                        f"(method {job.meta.method}), above the limit of {_gib(settings.max_unroll_bytes)}; "
                        "lower steps or batch_size (or the model size)",
                        "unroll_too_large",
                    )
                )
    errors += _check_hyperparameters(job)
    errors += _check_rich_settings(job)
    return errors


def _exported_model(
    i: int, task: TaskSpec, models: Mapping[str, ModelPublic]
) -> tuple[ModelPublic | None, list[dict[str, Any]]]:
    """The uploaded model a ``kind: exported`` task names, or errors: it does not exist, it takes
    examples that are neither rows nor images, or ``init: default`` cannot re-draw its weights."""
    ref = task.model
    loc: list[Any] = ["tasks", i, "model"]
    program = models.get(ref.model)
    if program is None:
        return None, [_err([*loc, "model"], f"model {ref.model} not found; upload a .pt2 archive with "
                           "POST /v1/models and use the id it returns", "model_not_found")]
    errors = []
    if len(program.input_shape) not in (1, 3):
        errors.append(_err([*loc, "model"], f"model {ref.model} ({program.filename}) takes examples of shape "
                           f"{program.input_shape}; gradtune feeds rows of features (N, F) or images "
                           "(N, C, H, W)", "model_input_rank"))
    if ref.init == "default" and not program.default_init:
        errors.append(_err([*loc, "init"], f"model {ref.model} ({program.filename}) has parameters outside "
                           "linear and conv2d layers (or shares one between layers), which have no PyTorch "
                           "default initialization to re-draw; use init 'uploaded' to start from the "
                           "uploaded weights", "init_unavailable"))
    return (None, errors) if errors else (program, [])


def _check_exported_task(
    i: int, task: TaskSpec, io: tuple[Any, int] | None, program: ModelPublic, limit: int, meta: MetaOptions
) -> list[dict[str, Any]]:
    """The data's example shape and targets against the program, then the memory estimate
    (``cnn_unroll_bytes``' formula with the program's parameters and node outputs)."""
    data = task.data
    if io is not None:
        features, d_out = io
        x_loc = ["tasks", i, "data", "train", "x"]
    elif isinstance(data, BuiltinData):
        features, d_out = BUILTIN_DATASETS[data.name]["features"], _inline_out_width(task)
        x_loc = ["tasks", i, "data", "name"]
    else:
        x0 = data.x_train[0]
        features = (len(x0), len(x0[0]), len(x0[0][0])) if _is_images(data.x_train) else len(x0)
        d_out = _inline_out_width(task)
        x_loc = ["tasks", i, "data", "x_train"]
    shape = list(features) if isinstance(features, tuple) else [int(features)]
    label = f"model {program.id} ({program.filename})"
    if shape != list(program.input_shape):
        return [_err(x_loc, f"the examples have shape {shape} but {label} was exported for examples of shape "
                     f"{list(program.input_shape)}", "shape_mismatch")]
    width = program.output_width
    if task.loss == "cross_entropy" and d_out > width:
        return [_err(["tasks", i, "model", "model"], f"the labels go up to {d_out - 1} ({d_out} classes) but "
                     f"{label} has {width} outputs; cross_entropy needs one output per class", "model_outputs")]
    if task.loss == "mse" and d_out != width:
        return [_err(["tasks", i, "model", "model"], f"the mse targets have width {d_out} but {label} has "
                     f"{width} outputs; they must be equal", "model_outputs")]
    params = program.parameter_count
    size_in = 1
    for v in program.input_shape:
        size_in *= v
    outputs = sum(_prod(n.output_shape) for n in program.nodes if n.output_shape)
    acts = task.batch_size * (size_in + 2 * outputs)
    need = method_bytes(FLOAT_BYTES * (task.steps * (3 * params + 2 * acts) + 2 * params), task.steps, meta)
    if need > limit:
        return [
            _err(["tasks", i, "steps"], f"steps={task.steps} with batch_size={task.batch_size} and {label} "
                 f"({params} parameters) needs about {_gib(need)} to differentiate through, above the limit of "
                 f"{_gib(limit)}; lower steps or batch_size (or the model size)", "unroll_too_large")
        ]
    return []


def _prod(values: list[int]) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def _check_cnn_task(
    i: int, task: TaskSpec, io: tuple[Any, int] | None, limit: int, meta: MetaOptions
) -> list[dict[str, Any]]:
    """Shapes through the cnn's layers, then the memory estimate (the data is already checked)."""
    if io is None:  # inline: the first training image's shape
        x0 = task.data.x_train[0]
        in_shape = (len(x0), len(x0[0]), len(x0[0][0]))
        d_out = _inline_out_width(task)
    else:
        in_shape, d_out = io
    layers = task.model.layers
    shapes, errors = cnn_layer_shapes(["tasks", i, "model"], layers, in_shape, d_out)
    if errors:
        return errors
    need = method_bytes(cnn_unroll_bytes(task.steps, task.batch_size, in_shape, layers, shapes), task.steps, meta)
    if need > limit:
        return [
            _err(
                ["tasks", i, "steps"],
                f"steps={task.steps} with batch_size={task.batch_size} and this cnn on "
                f"{_shape_text(tuple(in_shape))} images needs about {_gib(need)} to differentiate through, "
                f"above the limit of {_gib(limit)}; lower steps or batch_size (or the model size)",
                "unroll_too_large",
            )
        ]
    return []


def _check_hyperparameters(job: JobCreate) -> list[dict[str, Any]]:
    h = job.hyperparameters
    errors: list[dict[str, Any]] = []
    lr_lo, lr_hi = h.lr_bounds
    lr_ok = True
    if lr_lo <= 0:
        lr_ok = False
        errors.append(
            _err(["hyperparameters", "lr_bounds"], f"lr_bounds must be positive, got lower bound {lr_lo:g}", "bounds")
        )
    elif lr_lo >= lr_hi:
        lr_ok = False
        errors.append(
            _err(
                ["hyperparameters", "lr_bounds"],
                f"lr_bounds must be [low, high] with low < high, got [{lr_lo:g}, {lr_hi:g}]",
                "bounds",
            )
        )
    if lr_ok and not (lr_lo <= h.lr <= lr_hi):
        errors.append(
            _err(
                ["hyperparameters", "lr"],
                f"lr {h.lr:g} is outside lr_bounds [{lr_lo:g}, {lr_hi:g}]",
                "out_of_bounds",
            )
        )
    m_lo, m_hi = h.momentum_bounds
    m_ok = True
    if not (0.0 <= m_lo < 1.0 and 0.0 <= m_hi < 1.0):
        m_ok = False
        errors.append(
            _err(
                ["hyperparameters", "momentum_bounds"],
                f"momentum_bounds must lie within [0, 1), got [{m_lo:g}, {m_hi:g}]",
                "bounds",
            )
        )
    elif m_lo >= m_hi:
        m_ok = False
        errors.append(
            _err(
                ["hyperparameters", "momentum_bounds"],
                f"momentum_bounds must be [low, high] with low < high, got [{m_lo:g}, {m_hi:g}]",
                "bounds",
            )
        )
    if m_ok and not (m_lo <= h.momentum <= m_hi):
        errors.append(
            _err(
                ["hyperparameters", "momentum"],
                f"momentum {h.momentum:g} is outside momentum_bounds [{m_lo:g}, {m_hi:g}]",
                "out_of_bounds",
            )
        )
    return errors



def _layer_count(task: TaskSpec) -> int | None:
    """Layers with parameters (one per-layer group each); None when only the worker can tell."""
    if _is_cnn(task):
        return sum(1 for layer in task.model.layers if layer.type in ("conv2d", "linear"))
    if isinstance(task.model, ExportedModelRef):
        return None
    return len(task.model.hidden) + 1


def _check_rich_settings(job: JobCreate) -> list[dict[str, Any]]:
    """per_layer needs the same layers in every task; a schedule needs the same steps in every task."""
    h = job.hyperparameters
    errors: list[dict[str, Any]] = []
    if h.per_layer:
        counts = {i: _layer_count(t) for i, t in enumerate(job.tasks)}
        known = {c for c in counts.values() if c is not None}
        if len(known) > 1:
            detail = ", ".join(f"tasks[{i}]: {c}" for i, c in counts.items() if c is not None)
            errors.append(_err(["hyperparameters", "per_layer"], "per_layer learns one lr and momentum per layer, "
                               f"so every task needs the same number of layers with parameters ({detail})",
                               "per_layer_mismatch"))
    if h.schedule_segments > 1:
        steps = sorted({t.steps for t in job.tasks})
        if len(steps) > 1:
            errors.append(_err(["hyperparameters", "schedule_segments"], "a learned schedule splits the step budget "
                               f"into equal blocks, so every task needs the same steps (got {steps})",
                               "schedule_steps_mismatch"))
        elif h.schedule_segments > steps[0]:
            errors.append(_err(["hyperparameters", "schedule_segments"], f"schedule_segments {h.schedule_segments} "
                               f"is more than the {steps[0]} steps to share them over", "schedule_too_fine"))
    return errors
