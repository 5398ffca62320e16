"""check_job: every check of a job body that pydantic's field-by-field validation cannot make.

Limits (tasks, iterations, steps), each task's data (service.validation.data) and model
(service.validation.models), the memory of each task's unroll and of the whole job
(service.validation.admission, by gradtune.spec.costs), and the hyperparameters.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gradtune.spec.costs import TaskCost
from gradtune.spec.shapes import SpecError
from service.schemas import DatasetData, DatasetPublic, InlineData, JobCreate, ModelPublic, TaskSpec
from service.settings import Settings
from service.validation.admission import check_job_memory, check_unroll, cnn_cost, exported_cost, mlp_cost
from service.validation.common import TaskIO, _err, _is_cnn, cnn_of, mlp_of, task_io
from service.validation.data import _check_builtin, _check_dataset, _check_inline
from service.validation.models import (
    _exported_model,
    check_exported_io,
    cnn_shapes_or_errors,
    exported_slots,
    is_exported,
)


def check_job(
    job: JobCreate,
    settings: Settings,
    datasets: Mapping[str, DatasetPublic] | None = None,
    models: Mapping[str, ModelPublic] | None = None,
) -> list[dict[str, Any]]:
    """Errors in ``job`` beyond its schema; empty when the job can be queued.

    ``datasets`` maps dataset id to the stored description of each uploaded dataset the job
    names (``JobCreate.dataset_ids()``), ``models`` likewise for uploaded models
    (``JobCreate.model_ids()``); an id missing from them is reported as not found. The job's memory
    as a whole is checked once every task passes.
    """
    datasets = datasets or {}
    models = models or {}
    errors = _check_limits(job, settings)
    costs: list[TaskCost | None] = []
    slots: list[int | None] = []
    for i, task in enumerate(job.tasks):
        task_errors, cost, program = _check_task(i, task, job, settings, datasets, models)
        errors += task_errors
        costs.append(cost)
        slots.append(exported_slots(program) if program is not None else _layer_count(task))
    errors += _check_hyperparameters(job)
    errors += _check_rich_settings(job)
    sized = [c for c in costs if c is not None]
    if not errors and len(sized) == len(costs):
        errors += check_job_memory(job, settings, sized, max((s for s in slots if s), default=1))
    return errors


def _check_limits(job: JobCreate, settings: Settings) -> list[dict[str, Any]]:
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
    asked = job.meta.max_seconds
    if asked is not None and asked > settings.max_job_seconds:
        errors.append(
            _err(
                ["meta", "max_seconds"],
                f"max_seconds {asked:g} is above the limit of {settings.max_job_seconds:g} seconds",
                "limit_exceeded",
            )
        )
    return errors


def _check_data(
    i: int, task: TaskSpec, datasets: Mapping[str, DatasetPublic], images: bool
) -> tuple[list[dict], TaskIO | None]:
    loc: list[Any] = ["tasks", i, "data"]
    if isinstance(task.data, InlineData):
        errors = _check_inline(loc, task, task.data, images)
    elif isinstance(task.data, DatasetData):
        return _check_dataset(loc, task, task.data, datasets, images)
    else:
        errors = _check_builtin(loc, task, task.data, images)
    return errors, (None if errors else task_io(task))


def _task_cost(i: int, task: TaskSpec, io: TaskIO, program: ModelPublic | None) -> tuple[list[dict], TaskCost | None]:
    """The model against the data, and the task's terms for the cost model."""
    if program is not None:
        errors = check_exported_io(i, task, io, program, isinstance(task.data, DatasetData))
        return errors, (None if errors else exported_cost(task, io, program))
    if _is_cnn(task):
        shapes, errors = cnn_shapes_or_errors(i, task, io)
        return errors, (None if shapes is None else cnn_cost(task, io, shapes))
    try:
        return [], mlp_cost(task, io)
    except SpecError as e:  # a width the data gives as 0 (an empty row is reported already)
        return [_err(["tasks", i, "model"], e.message, e.type)], None


def _check_task(
    i: int,
    task: TaskSpec,
    job: JobCreate,
    settings: Settings,
    datasets: Mapping[str, DatasetPublic],
    models: Mapping[str, ModelPublic],
) -> tuple[list[dict], TaskCost | None, ModelPublic | None]:
    """One task's errors, its cost terms when it has none, and its exported program if any."""
    errors: list[dict[str, Any]] = []
    if task.steps > settings.max_steps:
        errors.append(
            _err(
                ["tasks", i, "steps"],
                f"steps {task.steps} is above the limit of {settings.max_steps}",
                "limit_exceeded",
            )
        )
    program: ModelPublic | None = None
    if is_exported(task):
        program, model_errors = _exported_model(i, task, models)
        if program is None:
            return errors + model_errors, None, None
        images = len(program.input_shape) == 3
    else:
        images = _is_cnn(task)
    data_errors, io = _check_data(i, task, datasets, images)
    if data_errors or io is None:
        return errors + data_errors, None, program
    model_errors, cost = _task_cost(i, task, io, program)
    if model_errors or cost is None:
        return errors + model_errors, None, program
    h = job.hyperparameters
    slots = (exported_slots(program) if program is not None else _layer_count(task)) if h.per_layer else 1
    hyper = 2 * (slots or 1) * h.schedule_segments if (h.per_layer or h.schedule_segments > 1) else 2
    errors += check_unroll(i, task, io, cost, program, job, settings.max_unroll_bytes, hyper)
    return errors, cost, program


def _check_hyperparameters(job: JobCreate) -> list[dict[str, Any]]:
    h = job.hyperparameters
    return _check_bounds("lr", h.lr, h.lr_bounds, lambda lo, hi: _lr_bounds_error(lo, hi)) + _check_bounds(
        "momentum", h.momentum, h.momentum_bounds, lambda lo, hi: _momentum_bounds_error(lo, hi)
    )


def _lr_bounds_error(lo: float, hi: float) -> str | None:
    if lo <= 0:
        return f"lr_bounds must be positive, got lower bound {lo:g}"
    if lo >= hi:
        return f"lr_bounds must be [low, high] with low < high, got [{lo:g}, {hi:g}]"
    return None


def _momentum_bounds_error(lo: float, hi: float) -> str | None:
    if not (0.0 <= lo < 1.0 and 0.0 <= hi < 1.0):
        return f"momentum_bounds must lie within [0, 1), got [{lo:g}, {hi:g}]"
    if lo >= hi:
        return f"momentum_bounds must be [low, high] with low < high, got [{lo:g}, {hi:g}]"
    return None


def _check_bounds(name: str, value: float, bounds: tuple[float, float], problem) -> list[dict[str, Any]]:
    """``name``_bounds must be sensible (``problem`` says how not), then ``value`` inside them."""
    lo, hi = bounds
    msg = problem(lo, hi)
    if msg is not None:
        return [_err(["hyperparameters", f"{name}_bounds"], msg, "bounds")]
    if not (lo <= value <= hi):
        return [
            _err(
                ["hyperparameters", name],
                f"{name} {value:g} is outside {name}_bounds [{lo:g}, {hi:g}]",
                "out_of_bounds",
            )
        ]
    return []


def _layer_count(task: TaskSpec) -> int | None:
    """Layers with parameters (one per-layer group each); None when only the worker can tell."""
    if _is_cnn(task):
        return sum(1 for layer in cnn_of(task).layers if layer.type in ("conv2d", "linear"))
    if is_exported(task):
        return None
    return len(mlp_of(task).hidden) + 1


def _check_rich_settings(job: JobCreate) -> list[dict[str, Any]]:
    """per_layer needs the same layers in every task; a schedule needs the same steps in every task."""
    h = job.hyperparameters
    errors: list[dict[str, Any]] = []
    if h.per_layer:
        counts = {i: _layer_count(t) for i, t in enumerate(job.tasks)}
        known = {c for c in counts.values() if c is not None}
        if len(known) > 1:
            detail = ", ".join(f"tasks[{i}]: {c}" for i, c in counts.items() if c is not None)
            errors.append(
                _err(
                    ["hyperparameters", "per_layer"],
                    "per_layer learns one lr and momentum per layer, "
                    f"so every task needs the same number of layers with parameters ({detail})",
                    "per_layer_mismatch",
                )
            )
    if h.schedule_segments > 1:
        steps = sorted({t.steps for t in job.tasks})
        if len(steps) > 1:
            errors.append(
                _err(
                    ["hyperparameters", "schedule_segments"],
                    "a learned schedule splits the step budget "
                    f"into equal blocks, so every task needs the same steps (got {steps})",
                    "schedule_steps_mismatch",
                )
            )
        elif h.schedule_segments > steps[0]:
            errors.append(
                _err(
                    ["hyperparameters", "schedule_segments"],
                    f"schedule_segments {h.schedule_segments} is more than the {steps[0]} steps to share them over",
                    "schedule_too_fine",
                )
            )
    return errors
