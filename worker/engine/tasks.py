"""Tasks, models and batch orders: everything random derives from (task.seed, draw)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gradtune.spec.vocab import ACTIVATIONS, LOSSES

from .errors import EngineError

_ACT_MODULES = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}


@dataclass
class Task:
    """One training problem. Tensors are already on the target device and dtype.

    cross_entropy: y_* are int64 labels (N,) in 0..out_features-1.
    mse: y_* are float (N, out_features).
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    hidden: tuple[int, ...]
    activation: str
    loss: str
    out_features: int
    steps: int
    batch_size: int
    seed: int


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts, stable across processes and Python versions."""
    text = ":".join(repr(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def validate_task(task: Task) -> None:
    """Raise EngineError with a plain sentence when a task cannot be trained."""
    if task.activation not in ACTIVATIONS:
        raise EngineError(f"Task {task.name!r}: activation must be one of {', '.join(ACTIVATIONS)}.")
    if task.loss not in LOSSES:
        raise EngineError(f"Task {task.name!r}: loss must be one of {', '.join(LOSSES)}.")
    if task.x_train.dim() != 2 or task.x_val.dim() != 2:
        raise EngineError(f"Task {task.name!r}: features must be a 2-D table (rows, features).")
    if task.x_train.shape[1] != task.x_val.shape[1]:
        raise EngineError(f"Task {task.name!r}: training and validation features differ in width.")
    if not task.x_train.is_floating_point():
        raise EngineError(f"Task {task.name!r}: features must be floating point.")
    check_rows(task)
    if task.out_features < 1 or any(h < 1 for h in task.hidden):
        raise EngineError(f"Task {task.name!r}: layer widths must be positive.")
    check_targets(task, task.out_features)


def check_batch_size(task) -> None:
    n, b = task.x_train.shape[0], task.batch_size
    if not 1 <= b <= n:
        raise EngineError(
            f"Task {task.name!r}: the batch size ({b}) must be between 1 and the number of training rows ({n})."
        )


def check_rows(task) -> None:
    """Row counts, steps and batch size of a Task or a modules.ModuleTask (validate_task and
    modules.validate_module_task)."""
    n = task.x_train.shape[0]
    if task.y_train.shape[0] != n or task.y_val.shape[0] != task.x_val.shape[0]:
        raise EngineError(f"Task {task.name!r}: features and targets have different numbers of rows.")
    if task.x_val.shape[0] < 1:
        raise EngineError(f"Task {task.name!r}: the validation set is empty.")
    if task.steps < 1:
        raise EngineError(f"Task {task.name!r}: the number of training steps must be at least 1.")
    check_batch_size(task)


def check_targets(task, width: int, note: str = "") -> None:
    """Targets of a Task or a modules.ModuleTask against the output width: int64 labels in
    0..width-1 (cross_entropy) or (rows, width) floats (mse); `note` ends the labels' range error."""
    if task.loss == "cross_entropy":
        for y in (task.y_train, task.y_val):
            if y.dtype != torch.int64 or y.dim() != 1:
                raise EngineError(f"Task {task.name!r}: class labels must be a 1-D int64 tensor.")
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= width):
                raise EngineError(f"Task {task.name!r}: class labels must lie between 0 and {width - 1}{note}.")
    else:
        for y in (task.y_train, task.y_val):
            if not y.is_floating_point() or y.dim() != 2 or y.shape[1] != width:
                raise EngineError(
                    f"Task {task.name!r}: regression targets must be a float tensor of shape (rows, {width})."
                )


def build_model(task: Task, draw: int = 0) -> nn.Sequential:
    """Linear, act, ..., Linear with PyTorch's default init, deterministic from (task.seed, draw).

    The global RNG is left untouched. The weights are drawn in float32 on the CPU (so float32 and
    float64 runs start from the same point up to rounding) and moved to the task's device/dtype.
    """
    sizes = [task.x_train.shape[1], *task.hidden, task.out_features]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed("init", task.seed, draw))
        layers: list[nn.Module] = []
        for i in range(len(sizes) - 1):
            if i > 0:
                layers.append(_ACT_MODULES[task.activation]())
            layers.append(nn.Linear(sizes[i], sizes[i + 1], dtype=torch.float32, device="cpu"))
        model = nn.Sequential(*layers)
    return model.to(device=task.x_train.device, dtype=task.x_train.dtype)


def batch_indices(task: Task, draw: int = 0) -> Tensor:
    """(steps, batch_size) int64 row indices: reshuffled every epoch, last partial batch dropped."""
    check_batch_size(task)
    n, b = task.x_train.shape[0], task.batch_size
    per_epoch = n // b
    gen = torch.Generator(device="cpu")
    gen.manual_seed(derive_seed("batches", task.seed, draw))
    chunks: list[Tensor] = []
    have = 0
    while have < task.steps:
        perm = torch.randperm(n, generator=gen)
        chunks.append(perm[: per_epoch * b].view(per_epoch, b))
        have += per_epoch
    return torch.cat(chunks)[: task.steps].to(task.x_train.device)
