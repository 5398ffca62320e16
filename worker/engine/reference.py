"""The reference: plain torch.optim.SGD on an nn.Sequential. Everything else is checked against it."""

from __future__ import annotations

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
