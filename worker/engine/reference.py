"""The reference: plain torch.optim.SGD on the task's model. Everything else is checked against it.

``evaluate`` and ``evaluate_groups`` train every kind of task (kinds.TaskKind: MLP Tasks,
ModuleTasks, mixed freely) by its own reference run; the training loop itself (fit) and the MLP
runs live in training.py, and the optimizer built from learned settings in gradtune.torch_utils.
All of them stay importable from here. Tasks whose module views module_unroll batches together
(mlp, cnn and exported models of one shape) are trained together, by one torch.optim.SGD over
their stacked parameters (batched_reference.py: the same update on every run); any other model by
its own reference run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .batched_reference import Schedule, fit_group
from .kinds import TaskKind, kind_of
from .module_unroll import make_groups
from .tasks import Task
from .training import (
    apply_schedule,
    fit,
    loss_of,
    make_optimizer,
    segment_at,
    task_loss,
    train_sgd,
    train_sgd_groups,
)

__all__ = [
    "EVAL_DRAWS",
    "apply_schedule",
    "evaluate",
    "evaluate_groups",
    "evaluate_learned",
    "fit",
    "loss_of",
    "make_optimizer",
    "segment_at",
    "task_loss",
    "train_sgd",
    "train_sgd_groups",
]

# Draws used to evaluate settings. The meta-objective trains on MetaConfig.draws, which must be
# disjoint from these, so an evaluation never sees the initialisations and batch orders tuned on.
EVAL_DRAWS: tuple[int, ...] = (1001, 1002, 1003)


def _mean_over_draws(
    what: str,
    tasks: Sequence[Task | TaskKind],
    draws: Sequence[int],
    run: Callable[[TaskKind, int], float],
    optimizer_for: Callable[[nn.Module], torch.optim.Optimizer],
    schedule: Schedule | None = None,
) -> dict:
    """Mean of run(kind_of(task), draw) over draws, per task and over tasks; the sources of a
    batched group (module_unroll.make_groups of the tasks' module views) by
    batched_reference.fit_group with ``optimizer_for`` (and ``schedule``) instead."""
    draws = list(draws)
    if not tasks or not draws:
        raise ValueError(f"{what} needs at least one task and one draw.")
    kinds = [kind_of(t) for t in tasks]
    modules = [k.as_module_task() for k in kinds]  # every kind has a module view (an MLP: build_model's)
    done: dict[int, list[float]] = {}
    for group in make_groups(modules, draws):
        if group.program is not None:
            losses = fit_group(group, optimizer_for, schedule)
            for i, t in enumerate(group.tasks):
                done[id(t)] = losses[i * len(draws) : (i + 1) * len(draws)]
    rows: list[dict] = []
    for task, kind, module in zip(tasks, kinds, modules, strict=True):
        losses = done[id(module)] if id(module) in done else [run(kind, d) for d in draws]
        rows.append({"name": task.name, "val_loss": sum(losses) / len(losses)})
    return {"tasks": rows, "mean_val_loss": sum(r["val_loss"] for r in rows) / len(rows)}


def evaluate(tasks: Sequence[Task | TaskKind], lr: float, momentum: float, draws: Sequence[int]) -> dict:
    """Mean validation loss of plain torch.optim.SGD(lr, momentum) over draws, per task and over
    tasks: each task's TaskKind.train_sgd (train_sgd for an MLP Task, train_sgd_module for a
    ModuleTask)."""

    def optimizer_for(model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)

    return _mean_over_draws("evaluate", tasks, draws, lambda kind, d: kind.train_sgd(lr, momentum, d), optimizer_for)


def evaluate_groups(
    tasks: Sequence[Task | TaskKind], param_groups: Sequence[dict], boundaries: Sequence[int], draws: Sequence[int]
) -> dict:
    """evaluate() for per-layer / scheduled settings (best_settings' "param_groups", "boundaries"),
    by each task's TaskKind.train_sgd_groups."""
    return _mean_over_draws(
        "evaluate_groups",
        tasks,
        draws,
        lambda kind, d: kind.train_sgd_groups(param_groups, boundaries, d),
        lambda model: make_optimizer(model, param_groups, boundaries),
        (param_groups, boundaries),
    )


def evaluate_learned(tasks: Sequence[Task | TaskKind], settings: dict, draws: Sequence[int]) -> dict:
    """evaluate_groups for settings with "param_groups" (and "boundaries"), as best_settings gives
    richer values, else evaluate for their "lr" and "momentum"."""
    if "param_groups" in settings:
        return evaluate_groups(tasks, settings["param_groups"], settings["boundaries"], draws)
    return evaluate(tasks, settings["lr"], settings["momentum"], draws)
