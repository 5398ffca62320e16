"""Kinds of task behind one protocol: what the meta-loop and the reference ask of every task.

``TaskKind`` is the protocol. Two kinds implement it:

* ``ModuleTask``: any nn.Module (a CNN from cnn.py, an exported program from exported.py, or any
  model built by ``make_model``), trained functionally by modules.ModuleObjective;
* the plain MLP ``tasks.Task`` (a dataclass of data and widths), through ``MLPKind``, whose
  batched hand-written unroll is functional.Objective.

``kind_of(task)`` is the one place a task becomes a TaskKind; everything else (param_layout,
cost_terms, modules.make_objective, reference.evaluate) calls the protocol's methods and never
asks which kind it holds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch
from torch import Tensor, nn

from .errors import EngineError
from .tasks import LOSSES, Task, build_model, check_rows, check_targets, derive_seed
from .training import fit, make_optimizer, train_sgd, train_sgd_groups


class TaskKind(Protocol):
    """What every kind of task provides (besides its data: name, x_train, y_train, x_val, y_val,
    loss, steps, batch_size, seed, which fit and tasks.batch_indices read)."""

    @property
    def name(self) -> str: ...

    def layout(self) -> list[list[str]]:
        """The per-layer slots: trainable parameter names grouped by layer, named_parameters() order."""
        ...

    def cost_terms(self) -> tuple[int, int]:
        """(trainable parameters, activations per example), for memory estimates."""
        ...

    def as_mlp_task(self) -> Task | None:
        """The task as functional.Objective's batched MLP unroll takes it, or None if it cannot."""
        ...

    def as_module_task(self) -> ModuleTask:
        """The task as modules.ModuleObjective takes it (every kind can be trained that way)."""
        ...

    def train_sgd(self, lr: float, momentum: float, draw: int = 0) -> float:
        """Validation loss after plain torch.optim.SGD(lr, momentum) training of draw's model."""
        ...

    def train_sgd_groups(self, param_groups: Sequence[dict], boundaries: Sequence[int], draw: int = 0) -> float:
        """train_sgd with learned per-layer / scheduled settings (make_optimizer + apply_schedule)."""
        ...


@dataclass
class ModuleTask:
    """One training problem for an arbitrary nn.Module. Tensors are on the target device and dtype.

    x_*: (N, ...) float features (images (N, C, H, W) for a CNN). cross_entropy: y_* int64 labels
    (N,) in 0..C-1 (C: the model's output width); mse: y_* float (N, D) with D the output width.
    make_model(draw) returns a fresh model, deterministic in (seed, draw) (see seeded_builder);
    the engine moves it to x_train's device and dtype. A TaskKind.
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    loss: str
    steps: int
    batch_size: int
    seed: int
    make_model: Callable[[int], nn.Module]

    def model(self, draw: int = 0) -> nn.Module:
        """The model of `draw`, on the task's device and dtype (the global RNG is left untouched)."""
        with torch.random.fork_rng(devices=[]):
            model = self.make_model(int(draw))
        if not isinstance(model, nn.Module):
            raise EngineError(f"Task {self.name!r}: make_model must return an nn.Module.")
        return model.to(device=self.x_train.device, dtype=self.x_train.dtype)

    # ------------------------------------------------------------------ TaskKind

    def layout(self) -> list[list[str]]:
        return layer_groups(self.model(0))

    def cost_terms(self) -> tuple[int, int]:
        """module_costs: the input plus every leaf module's output per example."""
        c = module_costs(self)
        return c["params"], c["activations_per_example"]

    def as_mlp_task(self) -> Task | None:
        return None

    def as_module_task(self) -> ModuleTask:
        return self

    def train_sgd(self, lr: float, momentum: float, draw: int = 0) -> float:
        return train_sgd_module(self, lr, momentum, draw)

    def train_sgd_groups(self, param_groups: Sequence[dict], boundaries: Sequence[int], draw: int = 0) -> float:
        return train_sgd_module_groups(self, param_groups, boundaries, draw)


@dataclass(frozen=True, eq=False)
class MLPKind:
    """The TaskKind of a plain MLP tasks.Task (build_model's Linear, act, ..., Linear)."""

    task: Task

    @property
    def name(self) -> str:
        return self.task.name

    def layout(self) -> list[list[str]]:
        """[["0.weight", "0.bias"], ["2.weight", "2.bias"], ...]: build_model's Linear layers."""
        return [[f"{2 * i}.weight", f"{2 * i}.bias"] for i in range(len(self.task.hidden) + 1)]

    def cost_terms(self) -> tuple[int, int]:
        """Exactly meta.estimate_costs' terms: sizes[0] + 2 * sum(sizes[1:]) activations per example."""
        t = self.task
        sizes = [t.x_train.shape[1], *t.hidden, t.out_features]
        n_params = sum(sizes[i] * sizes[i + 1] + sizes[i + 1] for i in range(len(sizes) - 1))
        return n_params, sizes[0] + 2 * sum(sizes[1:])

    def as_mlp_task(self) -> Task | None:
        return self.task

    def as_module_task(self) -> ModuleTask:
        return as_module_task(self.task)

    def train_sgd(self, lr: float, momentum: float, draw: int = 0) -> float:
        return train_sgd(self.task, lr, momentum, draw)

    def train_sgd_groups(self, param_groups: Sequence[dict], boundaries: Sequence[int], draw: int = 0) -> float:
        return train_sgd_groups(self.task, param_groups, boundaries, draw)


def kind_of(task: Task | TaskKind) -> TaskKind:
    """The TaskKind of any task. tasks.Task is a plain dataclass of the MLP's data and widths, so it
    is wrapped in MLPKind; every other kind (ModuleTask) implements the protocol itself."""
    return MLPKind(task) if isinstance(task, Task) else task


def param_layout(task: Task | TaskKind) -> list[list[str]]:
    """The per-layer slots of any task: parameter names grouped by layer, named_parameters() order
    (for an MLP Task: [["0.weight", "0.bias"], ["2.weight", "2.bias"], ...])."""
    return kind_of(task).layout()


def cost_terms(task: Task | TaskKind) -> tuple[int, int]:
    """(trainable parameters, activations per example) of any task, for memory estimates. For an
    MLP Task exactly meta.estimate_costs' terms (sizes[0] + 2 * sum(sizes[1:]) per example); for a
    ModuleTask module_costs (the input plus every leaf module's output)."""
    return kind_of(task).cost_terms()


# --------------------------------------------------------------------------- building and checking ModuleTasks


def seeded_builder(build: Callable[[], nn.Module], seed: int) -> Callable[[int], nn.Module]:
    """make_model for ModuleTask: `build()` under torch.manual_seed(derive_seed("init", seed, draw)),
    the same seed rule as tasks.build_model, so an MLP built this way starts from build_model's
    weights. `build` should create its layers in float32 on the CPU (PyTorch's default)."""

    def make(draw: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed("init", seed, draw))
            return build()

    return make


def as_module_task(task: Task) -> ModuleTask:
    """The MLP task as a ModuleTask with the same weights (build_model) and batches."""
    return ModuleTask(
        name=task.name,
        x_train=task.x_train,
        y_train=task.y_train,
        x_val=task.x_val,
        y_val=task.y_val,
        loss=task.loss,
        steps=task.steps,
        batch_size=task.batch_size,
        seed=task.seed,
        make_model=partial(build_model, task),  # make_model(draw) = build_model(task, draw)
    )


_STATEFUL = (nn.modules.batchnorm._BatchNorm,)


def validate_module_task(task: ModuleTask, model: nn.Module | None = None) -> nn.Module:
    """Raise EngineError with a plain sentence when the task cannot be trained; returns the model
    of draw 0 (built if not given), after checking its output against the targets."""
    name = task.name
    if task.loss not in LOSSES:
        raise EngineError(f"Task {name!r}: loss must be one of {', '.join(LOSSES)}.")
    if task.x_train.dim() < 2 or task.x_val.dim() != task.x_train.dim():
        raise EngineError(f"Task {name!r}: features must be (rows, ...) with the same rank in train and validation.")
    if task.x_train.shape[1:] != task.x_val.shape[1:]:
        raise EngineError(f"Task {name!r}: training and validation examples have different shapes.")
    if not task.x_train.is_floating_point():
        raise EngineError(f"Task {name!r}: features must be floating point.")
    check_rows(task)
    model = model if model is not None else task.model(0)
    if not any(True for _ in model.parameters()):
        raise EngineError(f"Task {name!r}: the model has no parameters to train.")
    for m in model.modules():
        if isinstance(m, _STATEFUL):
            raise EngineError(
                f"Task {name!r}: the model has a {type(m).__name__} layer, whose forward updates "
                "running statistics in place; it cannot be trained functionally."
            )
    with torch.no_grad():
        out = model(task.x_val[:1])
    if out.dim() != 2 or out.shape[0] != 1:
        raise EngineError(f"Task {name!r}: the model must output (rows, outputs); it gave {list(out.shape)}.")
    width = out.shape[1]
    check_targets(task, width, f" (the model has {width} outputs)")
    return model


def layer_groups(model: nn.Module) -> list[list[str]]:
    """Trainable parameter names grouped by the module that owns them, in named_parameters() order:
    [["0.weight", "0.bias"], ["4.weight", "4.bias"], ...]. The per-layer slots of the engine."""
    groups: dict[str, list[str]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(name.rpartition(".")[0], []).append(name)
    return list(groups.values())


def module_costs(task: ModuleTask) -> dict:
    """Sizes for memory estimates: trainable parameter count and activations per example (sum of
    every leaf module's output size, measured with a forward hook on one validation example)."""
    model = task.model(0)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    sizes: list[int] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: sizes.append(out.numel() if isinstance(out, Tensor) else 0))
        for m in model.modules()
        if not list(m.children())
    ]
    try:
        with torch.no_grad():
            model(task.x_val[:1])
    finally:
        for h in hooks:
            h.remove()
    per_example = int(task.x_val[:1].numel()) + sum(sizes)
    return {"params": int(n_params), "activations_per_example": per_example}


# --------------------------------------------------------------------------- the reference


def train_sgd_module(task: ModuleTask, lr: float, momentum: float, draw: int = 0) -> float:
    """Train task.model(draw) with plain torch.optim.SGD(lr, momentum) for task.steps steps on
    tasks.batch_indices(task, draw); return the validation loss (math.inf if training diverged)."""
    model = validate_module_task(task, task.model(draw))
    return fit(task, model, torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum), draw)


def train_sgd_module_groups(
    task: ModuleTask, param_groups: Sequence[dict], boundaries: Sequence[int], draw: int = 0
) -> float:
    """train_sgd_module with learned per-layer / scheduled settings, by the documented recipe
    (make_optimizer + apply_schedule before every step, gradtune.torch_utils)."""
    model = validate_module_task(task, task.model(draw))
    return fit(task, model, make_optimizer(model, param_groups, boundaries), draw, (param_groups, boundaries))
