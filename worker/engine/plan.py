"""The engine's plan: its tasks and MetaConfig as the inputs of the spec's cost model
(gradtune.spec.costs), the one the API admits jobs with.

``estimate(tasks, config)`` is what meta.choose_method decides by: the memory of one
hypergradient by method (the keys estimate_costs has always returned) and, with it, the job's
peak and FLOPs as the engine batches it. An MLP ``Task`` is sized by gradtune.spec.shapes; any
other module (cnn, exported program) by one forward pass of one example through the model of
draw 0, counting every torch function's output (the activations) and the multiply-adds of its
linear and conv2d calls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from gradtune.spec.costs import (
    CostEstimate,
    MetaCost,
    TaskCost,
    hypergradient_bytes,
    path_of,
    screen_candidates,
    unroll_budget,
)
from gradtune.spec.costs import (
    estimate as spec_estimate,
)
from gradtune.spec.shapes import mlp_shapes

from .functional import group_signature
from .kinds import kind_of
from .module_unroll import group_key
from .reference import EVAL_DRAWS

_MB = 1024.0 * 1024.0


class _Counter(TorchFunctionMode):
    """Counts, over one forward pass, the elements every torch function outputs and the
    multiply-adds of linear and conv2d calls."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs = 0
        self.macs = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if isinstance(out, Tensor) and getattr(func, "__name__", "") != "__get__":
            self.outputs += out.numel()
            name = getattr(func, "__name__", "")
            if name in ("linear", "conv2d"):
                weight = args[1] if len(args) > 1 else kwargs["weight"]
                per_output = weight[0].numel() if name == "conv2d" else weight.shape[-1]
                self.macs += out.numel() * int(per_output)
        return out


def module_terms(task: Any) -> dict:
    """Parameters (trainable), activations per example (the input and every function's output),
    multiply-adds per example, outputs and per-layer slots of a modules.ModuleTask's model."""
    model = task.model(0)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    x = task.x_val[:1]
    counter = _Counter()
    with torch.no_grad(), counter:
        out = model(x)
    return {
        "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "activations": int(x.numel()) + counter.outputs,
        "macs": counter.macs,
        "out_features": int(out.shape[-1]),
        "slots": len({n.rpartition(".")[0] for n in names}) or 1,
    }


def task_cost(task: Any) -> tuple[TaskCost, int]:
    """The spec's TaskCost of an engine task, and its per-layer slots."""
    common = dict(
        batch_size=int(task.batch_size),
        steps=int(task.steps),
        n_train=int(task.x_train.shape[0]),
        n_val=int(task.x_val.shape[0]),
        in_elements=int(task.x_train[0].numel()),
        element_size=int(task.x_train.element_size()),
    )
    mlp = kind_of(task).as_mlp_task()  # the TaskKind protocol: an MLP view, or None
    if mlp is not None:
        task = mlp
        shapes = mlp_shapes(task.x_train.shape[1], task.hidden, task.out_features, task.activation)
        cost = TaskCost(
            params=shapes.params,
            activations=shapes.activations,
            macs=shapes.macs,
            out_features=int(task.out_features),
            kind="mlp",
            group=group_signature(task),
            **common,
        )
        return cost, len(task.hidden) + 1
    terms = module_terms(task)
    cost = TaskCost(
        params=terms["params"],
        activations=terms["activations"],
        macs=terms["macs"],
        out_features=terms["out_features"],
        kind="module",
        group=group_key(kind_of(task).as_module_task()),  # module_unroll batches equal keys together
        **common,
    )
    return cost, terms["slots"]


def meta_cost(config: Any, slots: int = 1) -> MetaCost:
    """A MetaConfig (or any object with its attribute names; missing ones take its defaults) as
    the spec's MetaCost."""
    base = MetaCost()

    def get(name: str, default: Any) -> Any:
        return getattr(config, name, default)

    population = 0
    if get("population", True):
        momenta = len(get("population_momenta", (0.0, 0.5, 0.9, 0.99)))
        population = (1 + momenta) * (2 * int(get("population_lr_span", 4)) + 1)
    per_layer = bool(get("per_layer", False))
    return MetaCost(
        iterations=int(get("iterations", base.iterations)),
        method=str(get("method", base.method)),
        search=str(get("search", base.search)),
        draws=len(get("draws", (0, 1))),
        eval_draws=len(EVAL_DRAWS),
        truncation=int(get("truncation", base.truncation)),
        population=population,
        stencil=9 if get("stencil_diagonals", True) else 5,
        line_steps=len(get("line_steps", (0.5, 1.0, 2.0, 4.0))),
        slots=slots if per_layer else 1,
        segments=int(get("schedule_segments", 1)),
        rich_random_directions=int(get("rich_random_directions", base.rich_random_directions)),
        constant_fraction=float(get("constant_fraction", base.constant_fraction)),
        memory_budget_bytes=float(get("memory_budget_mb", 1024.0)) * _MB,
        job_memory_bytes=None if get("job_memory_mb", None) is None else float(get("job_memory_mb", 0.0)) * _MB,
    )


def spec_inputs(tasks: Sequence[Any], config: Any) -> tuple[list[TaskCost], MetaCost]:
    """The spec's inputs for the engine's tasks (MLP Tasks and ModuleTasks) and config."""
    pairs = [task_cost(t) for t in tasks]
    return [c for c, _ in pairs], meta_cost(config, max(s for _, s in pairs))


def screen_cap(tasks: Sequence[Any], config: Any) -> Callable[[Any, int], int | None]:
    """The objectives' screen_cap: (a group's first task, its sources) -> the most candidates one
    screen unroll may batch within config.job_memory_mb beside the job's data, by the spec's model
    (costs.screen_candidates, which costs.estimate counts the screens' peak with)."""
    costs_in, meta = spec_inputs(tasks, config)
    budget = unroll_budget(costs_in, meta)
    path = path_of(costs_in)

    def cap(task: Any, sources: int) -> int | None:
        return screen_candidates(task_cost(task)[0], path, sources, budget)

    return cap


def job_estimate(tasks: Sequence[Any], config: Any) -> CostEstimate:
    """The spec's estimate of the whole job (peak bytes, FLOPs, per part)."""
    costs, meta = spec_inputs(tasks, config)
    return spec_estimate(costs, meta)


def estimate(tasks: Sequence[Any], config: Any) -> dict:
    """Memory (MB) of one hypergradient by method for the job's shapes, steps and hyperparameters
    (the keys meta.estimate_costs returns: hyperparameters, steps, reverse_mb, forward_mb,
    truncated_mb), from the spec's model; and the whole job: method (what auto resolves to under
    config.memory_budget_mb), peak_mb, data_mb, flops, parts ({name: MB of its largest unroll})."""
    costs, meta = spec_inputs(tasks, config)
    job = spec_estimate(costs, meta)
    out: dict[str, Any] = {"hyperparameters": meta.hyperparameters, "steps": max(c.steps for c in costs)}
    for method in ("reverse", "forward", "truncated"):
        out[f"{method}_mb"] = hypergradient_bytes(costs, meta, method) / _MB
    out.update(
        method=job.method,
        peak_mb=job.peak_bytes / _MB,
        data_mb=job.data_bytes / _MB,
        flops=job.flops,
        parts={p.name: p.bytes / _MB for p in job.parts},
    )
    return out
