"""What every check of a job body shares: the error shape, dataset facts, the task's widths."""

from __future__ import annotations

from typing import Any, NamedTuple

from service.schemas import (
    BUILTIN_DATASETS,
    BuiltinData,
    CNNModel,
    DatasetData,
    ExportedModelRef,
    InlineData,
    MLPModel,
    TaskSpec,
)

FLOAT_BYTES = 4  # the engine unrolls in float32
GIB = 1024**3


class TaskIO(NamedTuple):
    """What a task's data resolves to: the example's features (a width, or (C, H, W) images), the
    output width, and the rows the engine trains and validates on. A tuple, so ``(features,
    d_out)`` pairs are accepted where an io is taken."""

    features: Any
    d_out: int
    n_train: int | None = None
    n_val: int | None = None


def _err(loc: list[Any], msg: str, type_: str) -> dict[str, Any]:
    return {"loc": ["body", *loc], "msg": msg, "type": type_}


def _gib(n: float) -> str:
    return f"{n / GIB:.3g} GiB"


def builtin_split_sizes(data: BuiltinData) -> tuple[int, int]:
    """(train rows, validation rows) of a builtin dataset split by ``val_fraction``."""
    n = BUILTIN_DATASETS[data.name]["n"]
    n_val = max(1, round(n * data.val_fraction))
    return n - n_val, n_val


def _is_2d(y: list) -> bool:
    return bool(y) and isinstance(y[0], list)


def _is_images(x: list) -> bool:
    return bool(x) and isinstance(x[0], list) and bool(x[0]) and isinstance(x[0][0], list)


def _shape_text(shape: Any) -> str:
    return "x".join(str(v) for v in shape) if isinstance(shape, tuple) else f"{shape} features"


def _names(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(repr(n) for n in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _class_count(task: TaskSpec) -> int | None:
    """C for cross_entropy: classes of a builtin, else max label + 1 (None if labels are bad)."""
    data = task.data
    if isinstance(data, BuiltinData):
        return BUILTIN_DATASETS[data.name]["classes"]
    if not isinstance(data, InlineData):
        return None
    labels: list[float] = []
    for y in (data.y_train, data.y_val):
        if _is_2d(y):
            return None
        labels.extend(y)  # type: ignore[arg-type]  # a flat list: not _is_2d
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


def mlp_of(task: TaskSpec) -> MLPModel:
    """The task's model, known to be an mlp."""
    if not isinstance(task.model, MLPModel):
        raise TypeError(f"task {task.name!r} is not an mlp")
    return task.model


def cnn_of(task: TaskSpec) -> CNNModel:
    """The task's model, known to be a cnn."""
    if not isinstance(task.model, CNNModel):
        raise TypeError(f"task {task.name!r} is not a cnn")
    return task.model


def exported_of(task: TaskSpec) -> ExportedModelRef:
    """The task's model, known to be an exported program."""
    if not isinstance(task.model, ExportedModelRef):
        raise TypeError(f"task {task.name!r} is not an exported model")
    return task.model


def _inline_out_width(task: TaskSpec) -> int:
    """Output width of an inline or builtin task: classes for cross_entropy, else target width."""
    data = task.data
    if task.loss == "cross_entropy":
        return _class_count(task) or 1
    if isinstance(data, InlineData) and _is_2d(data.y_train):
        return len(data.y_train[0])  # type: ignore[arg-type]  # rows of targets: _is_2d
    return 1  # one regression target, or class labels read as one float column


def task_io(task: TaskSpec, io: tuple | None = None) -> TaskIO:
    """The task's TaskIO: ``io`` (a dataset task's, from its datasets' metadata) completed, or read
    off an inline or builtin task's body."""
    data = task.data
    if io is not None:
        return TaskIO(*io)
    if isinstance(data, DatasetData):
        raise ValueError("the widths of a dataset task come from its datasets' metadata: pass io")
    if isinstance(data, BuiltinData):
        n_train, n_val = builtin_split_sizes(data)
        return TaskIO(BUILTIN_DATASETS[data.name]["features"], _inline_out_width(task), n_train, n_val)
    x0: Any = data.x_train[0] if data.x_train else []
    features = (len(x0), len(x0[0]), len(x0[0][0])) if _is_images(data.x_train) else len(x0)
    return TaskIO(features, _inline_out_width(task), len(data.x_train), len(data.x_val))


def layer_widths(task: TaskSpec, io: tuple | None = None) -> list[int]:
    """[input width, *hidden, output width] of the task's MLP, as far as the body tells.

    ``io`` gives (input width, output width) where the body alone cannot: a ``source: dataset``
    task's widths come from the datasets' stored metadata (see ``check_job``).
    """
    t = task_io(task, io)
    return [t.features, *mlp_of(task).hidden, t.d_out]
