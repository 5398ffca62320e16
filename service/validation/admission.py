"""Memory admission by the spec's cost model (gradtune.spec.costs), the one the engine plans with.

Two checks:

* per task (``unroll_too_large`` at ``tasks[i].steps``): differentiating through the task's own
  training unroll (its draws batched, validation aside) by the job's method must fit
  ``max_unroll_bytes``; under auto the smaller of reverse and forward must (the engine falls back
  to truncated only when neither fits the whole job).
* the whole job (``job_too_large`` at ``tasks``): the peak of the job as the engine batches it
  (every task, draw and screened candidate in one unroll, the data, the hypergradient by the method
  auto resolves to) must fit ``max_job_memory_bytes``; the message names the part that sets the
  peak and what would fit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from gradtune.spec.costs import (
    DRAWS,
    METHODS,
    START_CANDIDATES,
    CostEstimate,
    MetaCost,
    Part,
    TaskCost,
    estimate,
    unroll_bytes,
)
from gradtune.spec.hyper import constant_fraction
from gradtune.spec.shapes import ModelShapes, mlp_shapes, prod
from service.schemas import JobCreate, ModelPublic, TaskSpec
from service.settings import Settings
from service.validation.common import FLOAT_BYTES, TaskIO, _err, _gib, _shape_text, mlp_of, task_io
from service.validation.models import exported_terms


def meta_cost(job: JobCreate, settings: Settings, slots: int = 1) -> MetaCost:
    """The job's meta-settings as the cost model takes them (worker/runner.meta_config's MetaConfig)."""
    h = job.hyperparameters
    return MetaCost(
        iterations=job.meta.iterations,
        method=job.meta.method,
        search=job.meta.search,
        truncation=job.meta.truncation,
        population=START_CANDIDATES[job.meta.search],
        slots=slots if h.per_layer else 1,
        segments=h.schedule_segments,
        constant_fraction=constant_fraction(job.meta.search, job.meta.iterations),
        memory_budget_bytes=settings.max_unroll_bytes,
        job_memory_bytes=settings.max_job_memory_bytes,
    )


# --------------------------------------------------------------------------- a task's terms


def _cost(task: TaskSpec, io: TaskIO, terms: tuple[int, int, int], kind: str, group: Any = None) -> TaskCost:
    params, acts, macs = terms
    in_elements = prod(io.features) if isinstance(io.features, tuple) else int(io.features)
    return TaskCost(
        params=params,
        activations=acts,
        macs=macs,
        batch_size=task.batch_size,
        steps=task.steps,
        n_train=io.n_train or 0,
        n_val=io.n_val or 0,
        in_elements=in_elements,
        out_features=io.d_out,
        element_size=FLOAT_BYTES,
        kind=kind,
        group=group,
    )


def _terms(shapes: ModelShapes) -> tuple[int, int, int]:
    return shapes.params, shapes.activations, shapes.macs


def mlp_cost(task: TaskSpec, io: TaskIO) -> TaskCost:
    m = mlp_of(task)
    shapes = mlp_shapes(io.features, m.hidden, io.d_out, m.activation)
    # the engine batches mlps of equal shapes, loss, steps and batch size together
    group = (io.features, tuple(m.hidden), m.activation, task.loss, io.d_out, task.steps, task.batch_size)
    return _cost(task, io, _terms(shapes), "mlp", group)


def _module_group(task: TaskSpec, io: TaskIO, model: str) -> tuple:
    """The engine batches cnn and exported tasks of one model, example shape, loss, steps and batch
    size in one unroll (worker/engine/module_unroll.py group_key); equal keys here, so the job's
    memory is admitted for that unroll (a model the engine cannot batch is over-counted, never under)."""
    return (model, str(io.features), task.loss, io.d_out, task.steps, task.batch_size)


def cnn_cost(task: TaskSpec, io: TaskIO, shapes: ModelShapes) -> TaskCost:
    model = "cnn:" + task.model.model_dump_json()
    return _cost(task, io, _terms(shapes), "module", _module_group(task, io, model))


def exported_cost(task: TaskSpec, io: TaskIO, program: ModelPublic) -> TaskCost:
    return _cost(task, io, exported_terms(program), "module", _module_group(task, io, "exported:" + program.sha256))


# --------------------------------------------------------------------------- per task


def unroll_need(cost: TaskCost, method: str, truncation: int = 20, hyperparameters: int = 2) -> int:
    """Bytes of one hypergradient through the task's own training unroll (its draws batched, the
    validation pass aside) by ``method``; auto: the smaller of reverse and forward."""
    alone = replace(cost, n_val=0)
    path = "mlp" if cost.kind == "mlp" else "module"

    def need(m: str) -> int:
        return unroll_bytes(alone, m, path, DRAWS, 1, hyperparameters, truncation)

    if method == "auto":
        return min(need("reverse"), need("forward"))
    return need(method)


def estimate_unroll_bytes(task: TaskSpec, io: tuple | None = None, method: str = "reverse") -> int:
    """unroll_need of an mlp task from its body (``io``: (input width, output width) of a dataset
    task, from its datasets' metadata)."""
    return unroll_need(mlp_cost(task, task_io(task, io)), method)


def cnn_unroll_bytes(
    steps: int,
    batch_size: int,
    in_shape: tuple[int, int, int],
    layers: list[Any],
    shapes: list[tuple[int, ...]],
    method: str = "reverse",
) -> int:
    """unroll_need of a cnn (``shapes``: cnn_layer_shapes' output shapes of ``layers``)."""
    from service.validation.models import cnn_model_shapes

    model = cnn_model_shapes(layers, in_shape, prod(shapes[-1]))
    cost = TaskCost(
        params=model.params,
        activations=model.activations,
        macs=model.macs,
        batch_size=batch_size,
        steps=steps,
        n_train=0,
        n_val=0,
        in_elements=model.in_size,
        out_features=model.out_features,
        element_size=FLOAT_BYTES,
        kind="module",
    )
    return unroll_need(cost, method)


def _what(task: TaskSpec, io: TaskIO, program: ModelPublic | None) -> str:
    if program is not None:
        return f"model {program.id} ({program.filename}) ({program.parameter_count} parameters)"
    if task.model.kind == "cnn":
        return f"this cnn on {_shape_text(tuple(io.features))} images"
    return f"hidden={mlp_of(task).hidden}"


def check_unroll(
    i: int,
    task: TaskSpec,
    io: TaskIO,
    cost: TaskCost,
    program: ModelPublic | None,
    job: JobCreate,
    limit: int,
    hyperparameters: int = 2,
) -> list[dict[str, Any]]:
    """``unroll_too_large`` when the task's own hypergradient does not fit ``limit``."""
    meta = job.meta
    need = unroll_need(cost, meta.method, meta.truncation, hyperparameters)
    if need <= limit:
        return []
    how = f" (method {meta.method})" if task.model.kind == "mlp" else ""
    return [
        _err(
            ["tasks", i, "steps"],
            f"steps={task.steps} with batch_size={task.batch_size} and "
            f"{_what(task, io, program)} needs about {_gib(need)} to differentiate through{how}, above "
            f"the limit of {_gib(limit)}; lower steps or batch_size (or the model size)",
            "unroll_too_large",
        )
    ]


# --------------------------------------------------------------------------- the whole job


def check_job_memory(
    job: JobCreate, settings: Settings, costs: Sequence[TaskCost], slots: int = 1
) -> list[dict[str, Any]]:
    """``job_too_large`` when the job's peak, as the engine batches it (screens sub-batched to fit the
    budget, one candidate over a group's sources at least), is above max_job_memory_bytes;
    ``job_too_expensive`` when its total FLOPs are above max_job_flops. Both when both."""
    meta = meta_cost(job, settings, slots)
    limit = settings.max_job_memory_bytes
    est = estimate(costs, meta)
    errors = []
    if est.peak_bytes > limit:
        errors.append(_err(["tasks"], job_memory_message(costs, meta, est, limit), "job_too_large"))
    if est.flops > settings.max_job_flops:
        errors.append(_err(["tasks"], job_flops_message(costs, meta, est, settings.max_job_flops), "job_too_expensive"))
    return errors


def _peak_text(est: CostEstimate) -> str:
    part = est.peak_part
    if est.build_bytes > part.bytes:
        return f"building every (task, draw)'s batch order holds {_gib(est.build_bytes)}"
    return describe_part(part)


_PART_NAMES = {
    "start": "the start screens",
    "refine": "each refine iteration screens",
    "rich_refine": "each per-layer or schedule iteration screens",
    "hypergradient": "one hypergradient",
    "rich_hypergradient": "one per-layer or schedule hypergradient",
}


def describe_part(part: Part) -> str:
    """The part of a job that sets its peak, in a sentence."""
    if part.mode == "screen":
        sources = part.runs // max(1, part.candidates)
        return (
            f"{_PART_NAMES.get(part.name, part.name)} {part.candidates} candidate settings x {sources} "
            f"(task, draw) runs, batched in one unroll ({_gib(part.bytes)})"
        )
    if part.mode in METHODS:
        return (
            f"{_PART_NAMES.get(part.name, part.name)} ({part.mode}) differentiates through {part.runs} "
            f"(task, draw) runs batched in one unroll ({_gib(part.bytes)})"
        )
    return f"the final evaluation trains one run at a time ({_gib(part.bytes)})"


def _largest(lo: int, hi: int, ok: Callable[[int], bool]) -> int | None:
    """The largest v in [lo, hi] with ok(v) (ok decreasing), or None."""
    if hi < lo or not ok(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


def _task_offers(costs: Sequence[TaskCost], fits: Callable[[Sequence[TaskCost]], bool]) -> list[str]:
    """A smaller batch, fewer steps, fewer tasks: the largest value of each that ``fits``."""
    out = []
    top = max(c.batch_size for c in costs)
    b = _largest(1, top - 1, lambda v: fits([replace(c, batch_size=min(c.batch_size, v)) for c in costs]))
    if b is not None:
        out.append(f"batch_size <= {b}")
    top = max(c.steps for c in costs)
    s = _largest(1, top - 1, lambda v: fits([replace(c, steps=min(c.steps, v)) for c in costs]))
    if s is not None:
        out.append(f"steps <= {s}")
    k = _largest(1, len(costs) - 1, lambda v: fits(costs[:v]))
    if k is not None:
        out.append(f"at most {k} task" + ("s" if k > 1 else ""))
    return out


def what_would_fit(costs: Sequence[TaskCost], meta: MetaCost, limit: int, est: CostEstimate) -> list[str]:
    """Changes of one kind that bring the job's peak under ``limit``: a smaller batch, fewer steps,
    fewer tasks, and ``method: forward`` when the job's method (``est``, its estimate) is another and
    forward fits."""
    out = _task_offers(costs, lambda tasks: estimate(tasks, meta).peak_bytes <= limit)
    if est.method != "forward" and estimate(costs, replace(meta, method="forward")).peak_bytes <= limit:
        out.append("method: forward")
    return out


def what_would_be_cheap_enough(costs: Sequence[TaskCost], meta: MetaCost, limit: float) -> list[str]:
    """Changes of one kind that bring the job's FLOPs under ``limit``: a smaller batch, fewer steps,
    fewer tasks, fewer iterations."""
    out = _task_offers(costs, lambda tasks: estimate(tasks, meta).flops <= limit)
    n = _largest(1, meta.iterations - 1, lambda v: estimate(costs, replace(meta, iterations=v)).flops <= limit)
    if n is not None:
        out.append(f"iterations <= {n}")
    return out


def _flops_text(flops: float) -> str:
    return f"{flops:.3g} FLOPs"


def job_flops_message(costs: Sequence[TaskCost], meta: MetaCost, est: CostEstimate, limit: float) -> str:
    fixes = what_would_be_cheap_enough(costs, meta, limit)
    fit = (" It would fit with " + ", or ".join(fixes) + ".") if fixes else " Use a smaller model."
    top = max(est.parts, key=lambda p: p.flops)
    return (
        f"this job needs about {_flops_text(est.flops)} of compute, above the limit of {_flops_text(limit)} "
        f"(GRADTUNE_MAX_JOB_FLOPS); most of it in {_FLOPS_NAMES.get(top.name, top.name)} "
        f"({_flops_text(top.flops)}).{fit}"
    )


_FLOPS_NAMES = {
    "start": "the start's screens",
    "refine": "the refine iterations' screens",
    "rich_refine": "the per-layer or schedule iterations' screens",
    "hypergradient": "the hypergradients",
    "rich_hypergradient": "the per-layer or schedule hypergradients",
    "evaluation": "the final evaluation",
}


def job_memory_message(costs: Sequence[TaskCost], meta: MetaCost, est: CostEstimate, limit: int) -> str:
    fixes = what_would_fit(costs, meta, limit, est)
    fit = (" It would fit with " + ", or ".join(fixes) + ".") if fixes else " Use a smaller model."
    return (
        f"this job needs about {_gib(est.peak_bytes)} of memory at its peak, above the limit of {_gib(limit)}: "
        f"{_peak_text(est)}, on top of {_gib(est.data_bytes)} of data (the tasks' rows, every "
        f"(task, draw)'s initial weights and the rows of every batch).{fit}"
    )
