"""The reference: plain torch.optim.SGD on an nn.Sequential. Everything else is checked against it."""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .tasks import Task, batch_indices, build_model, validate_task

# Draws used to evaluate settings. The meta-objective trains on MetaConfig.draws, which must be
# disjoint from these, so an evaluation never sees the initialisations and batch orders tuned on.
EVAL_DRAWS: tuple[int, ...] = (1001, 1002, 1003)


def loss_of(kind: str, output: Tensor, target: Tensor) -> Tensor:
    """The loss named `kind` (tasks.LOSSES): cross_entropy or mse."""
    if kind == "cross_entropy":
        return F.cross_entropy(output, target)
    return F.mse_loss(output, target)


def task_loss(task: Task, output: Tensor, target: Tensor) -> Tensor:
    return loss_of(task.loss, output, target)


def fit(task, model: torch.nn.Module, optimizer: torch.optim.Optimizer, draw: int = 0, schedule=None) -> float:
    """Train `model` with `optimizer` for task.steps steps on batch_indices(task, draw); return the
    validation loss. With schedule = (param_groups, boundaries), apply_schedule runs before every
    step. `task`: an MLP Task or a modules.ModuleTask (validated by the caller).

    Returns math.inf if training diverges (the training loss or the final validation loss is not
    finite); never raises for that.
    """
    idx = batch_indices(task, draw)
    with torch.enable_grad():
        for t in range(task.steps):
            if schedule is not None:
                apply_schedule(optimizer, *schedule, t)
            rows = idx[t]
            loss = task_loss(task, model(task.x_train[rows]), task.y_train[rows])
            if not torch.isfinite(loss):
                return math.inf
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        val = float(task_loss(task, model(task.x_val), task.y_val))
    return val if math.isfinite(val) else math.inf


def train_sgd(task: Task, lr: float, momentum: float, draw: int = 0) -> float:
    """Train with torch.optim.SGD(lr, momentum) for task.steps steps; return the validation loss
    (math.inf if training diverged, see fit)."""
    validate_task(task)
    model = build_model(task, draw)
    return fit(task, model, torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum), draw)


def _trainers(task) -> tuple:
    """(train with constants, train with param groups) for the task's kind: an MLP Task or a
    modules.ModuleTask (imported here: modules imports this file)."""
    from .modules import ModuleTask, train_sgd_module, train_sgd_module_groups

    if isinstance(task, ModuleTask):
        return train_sgd_module, train_sgd_module_groups
    return train_sgd, train_sgd_groups


def _mean_over_draws(what: str, tasks: Sequence, draws: Sequence[int], run) -> dict:
    """Mean of run(task, draw) over draws, per task and over tasks."""
    draws = list(draws)
    if not tasks or not draws:
        raise ValueError(f"{what} needs at least one task and one draw.")
    rows = []
    for task in tasks:
        losses = [run(task, d) for d in draws]
        rows.append({"name": task.name, "val_loss": sum(losses) / len(losses)})
    return {"tasks": rows, "mean_val_loss": sum(r["val_loss"] for r in rows) / len(rows)}


def evaluate(tasks: Sequence, lr: float, momentum: float, draws: Sequence[int]) -> dict:
    """Mean validation loss of plain torch.optim.SGD(lr, momentum) over draws, per task and over
    tasks: train_sgd for an MLP Task, modules.train_sgd_module for a ModuleTask (mixed freely)."""
    return _mean_over_draws("evaluate", tasks, draws, lambda task, d: _trainers(task)[0](task, lr, momentum, d))


# --------------------------------------------------------------------------- per-layer / scheduled settings


def segment_at(boundaries: Sequence[int], step: int) -> int:
    """Index of the schedule segment that contains `step` (0-based): the last boundary <= step."""
    return max(0, bisect.bisect_right(list(boundaries), int(step)) - 1)


def make_optimizer(model: torch.nn.Module, param_groups: Sequence[dict], boundaries: Sequence[int]):
    """torch.optim.SGD with one param group per entry of the learned `param_groups`, in that order.

    Each entry is {"params": [names as model.named_parameters() gives them], "lr": [one per
    segment], "momentum": [one per segment]}; the values of the first segment are set.
    """
    named = dict(model.named_parameters())
    groups = []
    for spec in param_groups:
        missing = [n for n in spec["params"] if n not in named]
        if missing:
            raise ValueError(f"The model has no parameters named {', '.join(missing)}.")
        groups.append({"params": [named[n] for n in spec["params"]], "lr": spec["lr"][0], "momentum": spec["momentum"][0]})
    opt = torch.optim.SGD(groups, lr=float(param_groups[0]["lr"][0]))
    apply_schedule(opt, param_groups, boundaries, 0)
    return opt


def apply_schedule(optimizer: torch.optim.Optimizer, param_groups: Sequence[dict], boundaries: Sequence[int], step: int) -> None:
    """Set every optimizer param group's lr and momentum to the learned values for `step`.

    optimizer.param_groups[i] must hold the parameters listed in param_groups[i] (make_optimizer
    builds it so). Call it before optimizer.step() at every step (cheap), or at least at every
    boundary. torch.optim.SGD keeps its momentum buffers across the switches, exactly as the engine
    trained: buf = momentum * buf + grad; p = p - lr * buf, with the values of the current segment.
    """
    seg = segment_at(boundaries, step)
    for group, spec in zip(optimizer.param_groups, param_groups):
        group["lr"] = float(spec["lr"][seg])
        group["momentum"] = float(spec["momentum"][seg])


def train_sgd_groups(task: Task, param_groups: Sequence[dict], boundaries: Sequence[int], draw: int = 0) -> float:
    """train_sgd with learned per-layer / scheduled settings, by the documented recipe (fit):

        opt = make_optimizer(model, param_groups, boundaries)
        for step in range(steps):
            apply_schedule(opt, param_groups, boundaries, step)
            ... loss.backward(); opt.step()
    """
    validate_task(task)
    model = build_model(task, draw)
    return fit(task, model, make_optimizer(model, param_groups, boundaries), draw, (param_groups, boundaries))


def evaluate_groups(
    tasks: Sequence, param_groups: Sequence[dict], boundaries: Sequence[int], draws: Sequence[int]
) -> dict:
    """evaluate() for per-layer / scheduled settings (best_settings' "param_groups", "boundaries"),
    MLP Tasks and ModuleTasks alike."""
    return _mean_over_draws(
        "evaluate_groups", tasks, draws, lambda task, d: _trainers(task)[1](task, param_groups, boundaries, d)
    )
