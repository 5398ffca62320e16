"""The data of a task: inline arrays, a builtin dataset, or references to uploaded datasets.

Each check returns errors in FastAPI's shape (common._err); the dataset check also returns what
the data resolves to (common.TaskIO) for the model and memory checks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from service.schemas import BUILTIN_DATASETS, BuiltinData, DatasetData, DatasetPublic, DatasetRef, InlineData, TaskSpec
from service.validation.common import TaskIO, _a, _err, _is_2d, _is_images, _names, _shape_text, builtin_split_sizes


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


def _check_images(loc: list[Any], name: str, x: list) -> tuple[tuple[int, int, int] | None, list[dict]]:
    """(C, H, W) of inline images (N, C, H, W), or an error naming the first example that differs."""
    first = x[0]
    shape = (len(first), len(first[0]) if first else 0, len(first[0][0]) if first and first[0] else 0)
    if min(shape) == 0:
        return None, [
            _err(
                [*loc, name, 0],
                f"{name}[0] has shape {list(shape)}; images need at least one channel, row and column",
                "empty_row",
            )
        ]
    c, h, w = shape
    for i, img in enumerate(x):
        bad = len(img) != c or any(len(ch) != h or any(len(row) != w for row in ch) for ch in img)
        if bad:
            return None, [
                _err(
                    [*loc, name, i],
                    f"{name} is ragged: image {i} is not {c}x{h}x{w} (channels x height x width) like image 0",
                    "ragged_rows",
                )
            ]
    return shape, []


def _describe_targets(w: int | None) -> str:
    return "one target per row" if w is None else f"rows of {w} targets"


# --------------------------------------------------------------------------- inline


def _inline_x(loc: list[Any], task: TaskSpec, data: InlineData, images: bool) -> list[dict]:
    """x_train and x_val: rows (or images) of one shape, the same in both."""
    errors: list[dict] = []
    widths: dict[str, Any] = {}
    for name in ("x_train", "x_val"):
        x = getattr(data, name)
        if images and not _is_images(x):
            errors.append(
                _err(
                    [*loc, name],
                    f"{_a(task, True)} needs images (N, C, H, W): {name} must be a list of "
                    "images, each a list of channels of rows of numbers",
                    "x_not_images",
                )
            )
            widths[name] = None
        elif not images and _is_images(x):
            errors.append(
                _err(
                    [*loc, name],
                    f"{_a(task, False)} needs rows of features (N, F), but {name} holds "
                    "images (N, C, H, W); use model kind cnn, or flatten each image into a row",
                    "x_not_2d",
                )
            )
            widths[name] = None
        else:
            widths[name], errs = (_check_images if images else _check_matrix)(loc, name, x)
            errors += errs
    if widths["x_train"] and widths["x_val"] and widths["x_train"] != widths["x_val"]:
        if images:
            msg = (
                f"x_val images are {_shape_text(widths['x_val'])} but x_train images are "
                f"{_shape_text(widths['x_train'])}; train and validation images must have the same shape"
            )
        else:
            msg = (
                f"x_val rows have {widths['x_val']} features but x_train rows have "
                f"{widths['x_train']}; train and validation data must have the same width"
            )
        errors.append(_err([*loc, "x_val"], msg, "width_mismatch"))
    return errors


def _inline_lengths(loc: list[Any], data: InlineData) -> list[dict]:
    errors: list[dict] = []
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
    return errors


def _inline_labels(loc: list[Any], data: InlineData) -> list[dict]:
    """cross_entropy: a flat list of integer labels 0..C-1 in each split."""
    errors: list[dict] = []
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
        bad = next((i for i, v in enumerate(y) if not float(v).is_integer() or v < 0), None)
        if bad is not None:
            errors.append(
                _err(
                    [*loc, name, bad],
                    f"{name}[{bad}] is {y[bad]:g}: cross_entropy labels must be integers "
                    "0..C-1 (C = number of classes)",
                    "invalid_label",
                )
            )
    return errors


def _inline_targets(loc: list[Any], data: InlineData) -> list[dict]:
    """mse: one target per row, or rows of targets of one width in train and val."""
    errors: list[dict] = []
    shapes: dict[str, int | None] = {}
    bad = False
    for name in ("y_train", "y_val"):
        y = getattr(data, name)
        if not _is_2d(y):
            shapes[name] = None
            continue
        w, errs = _check_matrix(loc, name, y)
        errors += errs
        shapes[name] = w
        bad = bad or bool(errs)
    a, b = shapes["y_train"], shapes["y_val"]
    if not bad and a != b:
        errors.append(
            _err(
                [*loc, "y_val"],
                f"y_val has {_describe_targets(b)} but y_train has {_describe_targets(a)}; "
                "mse targets must have the same width in train and validation data",
                "width_mismatch",
            )
        )
    return errors


def _check_inline(loc: list[Any], task: TaskSpec, data: InlineData, images: bool) -> list[dict]:
    errors = _inline_x(loc, task, data, images) + _inline_lengths(loc, data)
    errors += _inline_labels(loc, data) if task.loss == "cross_entropy" else _inline_targets(loc, data)
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


# --------------------------------------------------------------------------- builtin


def _check_builtin(loc: list[Any], task: TaskSpec, data: BuiltinData, images: bool) -> list[dict]:
    errors: list[dict] = []
    facts = BUILTIN_DATASETS[data.name]
    if images:
        errors.append(
            _err(
                [*loc[:-1], "model"],
                f"builtin dataset {data.name!r} is a table of features (N, "
                f"{facts['features']}) and {_a(task, True)} needs images (N, C, H, W): upload the images as a 4-D "
                "tensor (source dataset) or send them inline, or use model kind mlp",
                "x_not_images",
            )
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


# --------------------------------------------------------------------------- uploaded datasets


@dataclass
class _Side:
    """What a dataset reference resolves to: rows, feature width, target width and labels."""

    n: int
    features: Any  # int (mlp), or (C, H, W) for a cnn
    y_width: int | None  # None: one target per row
    y_max: float | None


@dataclass
class _Ref:
    """One reference being resolved: where it is in the body and what it names."""

    loc: list[Any]
    task: TaskSpec
    ref: DatasetRef
    ds: DatasetPublic
    images: bool

    @property
    def tabular(self) -> bool:
        return self.ds.format in ("csv", "parquet")

    @property
    def kind(self) -> str:
        return "column" if self.tabular else "tensor"

    @property
    def label(self) -> str:
        return f"dataset {self.ds.id} ({self.ds.filename})"

    @property
    def items(self) -> dict:
        return {item.name: item for item in (self.ds.columns if self.tabular else self.ds.tensors)}

    def missing(self, field_loc: list[Any], name: str) -> dict:
        kind = self.kind
        return _err(
            field_loc,
            f"{self.label} has no {kind} {name!r}; its {kind}s are {_names(list(self.items))}",
            f"unknown_{kind}",
        )


def _resolve_columns(r: _Ref) -> tuple[int | None, Any, list[dict]]:
    """x of a csv or parquet file: column names, read as (rows, len(x))."""
    if r.images:
        return (
            None,
            None,
            [
                _err(
                    [*r.loc, "x"],
                    f"{r.label} is a {r.ds.format} file of columns (a table); {_a(r.task, True)} needs "
                    "images: upload a 4-D tensor (N, C, H, W) in a .safetensors or .npz file",
                    "x_not_images",
                )
            ],
        )
    errors: list[dict] = []
    names = [r.ref.x] if isinstance(r.ref.x, str) else list(r.ref.x)
    for j, name in enumerate(names):
        field_loc = [*r.loc, "x"] if isinstance(r.ref.x, str) else [*r.loc, "x", j]
        if name not in r.items:
            errors.append(r.missing(field_loc, name))
        elif names.index(name) != j:
            errors.append(_err(field_loc, f"x names column {name!r} twice", "duplicate_column"))
    return r.ds.rows or 0, len(names), errors


def _resolve_tensor(r: _Ref) -> tuple[int | None, Any, list[dict]]:
    """x of a safetensors or npz file: one tensor, 2-D rows (mlp) or 4-D images (cnn)."""
    x_loc = [*r.loc, "x"]
    if not isinstance(r.ref.x, str):
        return (
            None,
            None,
            [
                _err(
                    x_loc,
                    f"{r.label} is a {r.ds.format} file of tensors: x must be the name of one "
                    "2-D tensor (rows, features), not a list (lists name columns of csv or parquet files)",
                    "x_not_a_tensor_name",
                )
            ],
        )
    if r.ref.x not in r.items:
        return None, None, [r.missing(x_loc, r.ref.x)]
    shape = r.items[r.ref.x].shape
    name = f"tensor {r.ref.x!r} of {r.label}"
    if r.images and len(shape) != 4:
        return (
            None,
            None,
            [
                _err(
                    x_loc,
                    f"{name} has shape {shape}; x must be 4-D (rows, channels, height, width) for {_a(r.task, True)}",
                    "x_not_images",
                )
            ],
        )
    if r.images:
        if min(shape[1:]) == 0:
            return None, None, [_err(x_loc, f"{name} has empty images (shape {shape})", "empty_row")]
        return shape[0], tuple(shape[1:]), []
    if len(shape) != 2:
        hint = " (it holds images: use model kind cnn)" if len(shape) == 4 else ""
        return (
            None,
            None,
            [
                _err(
                    x_loc,
                    f"{name} has shape {shape}; x must be 2-D (rows, features) for {_a(r.task, False)}" + hint,
                    "x_not_2d",
                )
            ],
        )
    if shape[1] == 0:
        return None, None, [_err(x_loc, f"{name} has no features (shape {shape})", "empty_row")]
    return shape[0], shape[1], []


def _resolve_y(r: _Ref, n: int | None) -> tuple[int | None, float | None, list[dict]]:
    """y: (rows,) labels or targets, or (rows, targets) for mse; labels 0..C-1 for cross_entropy."""
    y = r.items.get(r.ref.y)
    y_loc = [*r.loc, "y"]
    if y is None:
        return None, None, [r.missing(y_loc, r.ref.y)]
    shape, kind, label = y.shape, r.kind, r.label
    if r.task.loss == "cross_entropy" and len(shape) != 1:
        return (
            None,
            None,
            [
                _err(
                    y_loc,
                    f"cross_entropy needs one integer class label per row, but {kind} "
                    f"{r.ref.y!r} of {label} has shape {shape}; name a 1-D tensor of labels 0..C-1 "
                    "(or use loss mse)",
                    "labels_not_1d",
                )
            ],
        )
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] == 0):
        return (
            None,
            None,
            [
                _err(
                    y_loc,
                    f"{kind} {r.ref.y!r} of {label} has shape {shape}; y must be (rows,) or (rows, targets)",
                    "y_bad_shape",
                )
            ],
        )
    errors: list[dict] = []
    if n is not None and shape[0] != n:
        errors.append(
            _err(
                y_loc,
                f"y ({kind} {r.ref.y!r}) has {shape[0]} rows but x has {n}; each "
                "row of features needs exactly one target",
                "length_mismatch",
            )
        )
    if r.task.loss == "cross_entropy" and y.min is not None and (not y.integer or y.min < 0):
        errors.append(
            _err(
                y_loc,
                f"cross_entropy labels must be integers 0..C-1, but {kind} "
                f"{r.ref.y!r} of {label} holds values from {y.min:g} to {y.max:g}"
                + ("" if y.integer else " that are not all whole numbers"),
                "invalid_label",
            )
        )
    return (shape[1] if len(shape) == 2 else None), y.max, errors


def _resolve(
    loc: list[Any], task: TaskSpec, ref: DatasetRef, datasets: Mapping[str, DatasetPublic], images: bool
) -> tuple[_Side | None, list[dict]]:
    """Check one ``{"dataset", "x", "y"}`` reference against the dataset's stored metadata."""
    ds = datasets.get(ref.dataset)
    if ds is None:
        return None, [
            _err(
                [*loc, "dataset"],
                f"dataset {ref.dataset} not found; upload it with POST /v1/datasets and use the id it returns",
                "dataset_not_found",
            )
        ]
    r = _Ref(loc, task, ref, ds, images)
    n, features, errors = _resolve_columns(r) if r.tabular else _resolve_tensor(r)
    y_width, y_max, errs = _resolve_y(r, n)
    errors += errs
    if n == 0 and not errors:
        errors.append(_err([*loc, "x"], f"x of {r.label} has no rows", "empty"))
    if errors or n is None or features is None:
        return None, errors
    return _Side(n=n, features=features, y_width=y_width, y_max=y_max), []


def _compare_sides(loc: list[Any], task: TaskSpec, train: _Side, val: _Side, images: bool) -> list[dict]:
    """A separate validation reference against the training one: same example shape, same targets."""
    errors: list[dict] = []
    if val.features != train.features:
        if images:
            msg = (
                f"validation images are {_shape_text(val.features)} but training images are "
                f"{_shape_text(train.features)}; train and validation images must have the same shape"
            )
        else:
            msg = (
                f"validation rows have {val.features} features but training rows have "
                f"{train.features}; train and validation data must have the same width"
            )
        errors.append(_err([*loc, "val", "x"], msg, "width_mismatch"))
    if task.loss == "mse" and val.y_width != train.y_width:
        errors.append(
            _err(
                [*loc, "val", "y"],
                f"validation y has {_describe_targets(val.y_width)} but training y has "
                f"{_describe_targets(train.y_width)}; mse targets must have the same width",
                "width_mismatch",
            )
        )
    return errors


def _check_dataset(
    loc: list[Any], task: TaskSpec, data: DatasetData, datasets: Mapping[str, DatasetPublic], images: bool
) -> tuple[list[dict], TaskIO | None]:
    """Errors of a ``source: dataset`` task, and what its data resolves to when none (the input is
    an image shape (C, H, W) for a cnn)."""
    train, errors = _resolve([*loc, "train"], task, data.train, datasets, images)
    val: _Side | None = None
    if data.val is not None:
        val, errs = _resolve([*loc, "val"], task, data.val, datasets, images)
        errors += errs
    if errors or train is None:
        return errors, None
    if val is None:
        n_val = max(1, round(train.n * (data.val_fraction or 0.2)))  # the schema sets 0.2 when val is None
        n_train = train.n - n_val
        if n_train < 1:
            return [
                _err(
                    [*loc, "val_fraction"],
                    f"val_fraction {data.val_fraction:g} of {train.n} rows leaves no rows for training",
                    "split_too_small",
                )
            ], None
        val = train
    else:
        n_train, n_val = train.n, val.n
        errors += _compare_sides(loc, task, train, val, images)
    if not errors and task.batch_size > n_train:
        errors.append(
            _err(
                [*loc[:-1], "batch_size"],
                f"batch_size {task.batch_size} is larger than the training "
                f"set ({n_train} rows); the last partial batch is dropped, so no step could run",
                "batch_too_large",
            )
        )
    if errors:
        return errors, None
    if task.loss == "cross_entropy":
        top = max(v for v in (train.y_max, val.y_max) if v is not None)
        d_out = int(top) + 1
    else:
        d_out = train.y_width or 1
    return [], TaskIO(train.features, d_out, n_train, n_val)
