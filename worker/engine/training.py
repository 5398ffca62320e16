"""Plain torch.optim.SGD training of one model: the loss, the loop, and the MLP reference runs.

The bottom of the engine's training code: every kind of task (kinds.py) trains its reference runs
with ``fit``, and the unrolls (functional.py, modules.py) use the same ``loss_of``. Learned
per-layer / scheduled settings are applied with gradtune.torch_utils (make_optimizer,
apply_schedule), the very functions the client gives users, so a user's optimizer follows the
recipe the engine checks against.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from gradtune.torch_utils import apply_schedule, make_optimizer, segment_at

from .losses import val_loss
from .tasks import Task, batch_indices, build_model, validate_task

__all__ = [
    "apply_schedule",
    "fit",
    "loss_of",
    "make_optimizer",
    "segment_at",
    "task_loss",
    "train_sgd",
    "train_sgd_groups",
]


def loss_of(kind: str, output: Tensor, target: Tensor) -> Tensor:
    """The loss named `kind` (tasks.LOSSES): cross_entropy or mse."""
    if kind == "cross_entropy":
        return F.cross_entropy(output, target)
    return F.mse_loss(output, target)


def task_loss(task, output: Tensor, target: Tensor) -> Tensor:
    """The task's loss (task.loss) of `output` against `target`."""
    return loss_of(task.loss, output, target)


def fit(
    task,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    draw: int = 0,
    schedule: tuple[Sequence[dict], Sequence[int]] | None = None,
) -> float:
    """Train `model` with `optimizer` for task.steps steps on batch_indices(task, draw); return the
    validation loss (losses.val_loss: cross-entropy in float64, so not rounded to 0). With
    schedule = (param_groups, boundaries), apply_schedule runs before every step. `task`: any kind
    of task (kinds.TaskKind's data: x_*, y_*, loss, steps, batch_size, seed), validated by the
    caller.

    Returns math.inf if training diverges (the training loss or the final validation loss is not
    finite); never raises for that.
    """
    idx = batch_indices(task, draw)
    with torch.enable_grad():
        for t in range(task.steps):
            if schedule is not None:
                apply_schedule(optimizer, schedule[0], schedule[1], t)
            rows = idx[t]
            loss = task_loss(task, model(task.x_train[rows]), task.y_train[rows])
            if not torch.isfinite(loss):
                return math.inf
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        val = float(val_loss(task.loss, model(task.x_val), task.y_val))
    return val if math.isfinite(val) else math.inf


def train_sgd(task: Task, lr: float, momentum: float, draw: int = 0) -> float:
    """Train with torch.optim.SGD(lr, momentum) for task.steps steps; return the validation loss
    (math.inf if training diverged, see fit)."""
    validate_task(task)
    model = build_model(task, draw)
    return fit(task, model, torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum), draw)


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
