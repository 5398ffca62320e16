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


def task_loss(task: Task, output: Tensor, target: Tensor) -> Tensor:
    if task.loss == "cross_entropy":
        return F.cross_entropy(output, target)
    return F.mse_loss(output, target)


def train_sgd(task: Task, lr: float, momentum: float, draw: int = 0) -> float:
    """Train with torch.optim.SGD(lr, momentum) for task.steps steps; return the validation loss.

    Returns math.inf if training diverges (the training loss or the final validation loss is not
    finite); never raises for that.
    """
    validate_task(task)
    model = build_model(task, draw)
    idx = batch_indices(task, draw)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    with torch.enable_grad():
        for t in range(task.steps):
            rows = idx[t]
            loss = task_loss(task, model(task.x_train[rows]), task.y_train[rows])
            if not torch.isfinite(loss):
                return math.inf
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        val = float(task_loss(task, model(task.x_val), task.y_val))
    return val if math.isfinite(val) else math.inf


def evaluate(tasks: Sequence[Task], lr: float, momentum: float, draws: Sequence[int]) -> dict:
    """Mean validation loss of train_sgd over draws, per task and over tasks."""
    draws = list(draws)
    if not tasks or not draws:
        raise ValueError("evaluate needs at least one task and one draw.")
    rows = []
    for task in tasks:
        losses = [train_sgd(task, lr, momentum, d) for d in draws]
        rows.append({"name": task.name, "val_loss": sum(losses) / len(losses)})
    return {"tasks": rows, "mean_val_loss": sum(r["val_loss"] for r in rows) / len(rows)}


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
    """train_sgd with learned per-layer / scheduled settings: the documented recipe, verbatim.

        opt = make_optimizer(model, param_groups, boundaries)
        for step in range(steps):
            apply_schedule(opt, param_groups, boundaries, step)
            ... loss.backward(); opt.step()
    """
    validate_task(task)
    model = build_model(task, draw)
    idx = batch_indices(task, draw)
    opt = make_optimizer(model, param_groups, boundaries)
    with torch.enable_grad():
        for t in range(task.steps):
            apply_schedule(opt, param_groups, boundaries, t)
            rows = idx[t]
            loss = task_loss(task, model(task.x_train[rows]), task.y_train[rows])
            if not torch.isfinite(loss):
                return math.inf
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        val = float(task_loss(task, model(task.x_val), task.y_val))
    return val if math.isfinite(val) else math.inf


def evaluate_groups(tasks: Sequence[Task], param_groups: Sequence[dict], boundaries: Sequence[int], draws: Sequence[int]) -> dict:
    """evaluate() for per-layer / scheduled settings (best_settings' "param_groups", "boundaries")."""
    draws = list(draws)
    if not tasks or not draws:
        raise ValueError("evaluate_groups needs at least one task and one draw.")
    rows = []
    for task in tasks:
        losses = [train_sgd_groups(task, param_groups, boundaries, d) for d in draws]
        rows.append({"name": task.name, "val_loss": sum(losses) / len(losses)})
    return {"tasks": rows, "mean_val_loss": sum(r["val_loss"] for r in rows) / len(rows)}
