"""The generic path: any nn.Module (a CNN, an MLP, later an exported program), trained functionally.

An MLP task goes through the hand-written batched unroll in functional.py. Every other model goes
through this module: the model is built deterministically from (task.seed, draw) by the task's
``make_model``, its parameters become a dict of tensors, and training runs out of place. Runs
(every candidate setting of every draw of every task in a group) are stacked along a leading
dimension and trained together (module_unroll.py): tasks whose models are the same chain of known
functions (cnn, exported, an MLP) on data of the same shapes share one group and one unroll
(batched.py runs it without vmap); any other model is a group of its own task, batched by
``torch.func.vmap`` of ``torch.func.grad_and_value`` over ``functional_call``. The SGD update is
the one of ``torch.optim.SGD``:

    buf = g (first step), then buf = momentum * buf + g;  p = p - lr * buf

(no dampening, no Nesterov, no weight decay), so reverse-mode autograd through the whole unroll
(the training gradients are themselves differentiable: second order) gives the exact gradient of the
validation loss with respect to lr and momentum. Mini-batches come from tasks.batch_indices (epoch
reshuffles, last partial batch dropped), so a run reproduces ``train_sgd_module`` (plain
torch.optim.SGD on the same model and batches).

``ModuleObjective`` has the public methods and return conventions of functional.Objective, so the
meta-loop can use either; ``make_objective`` picks one through the kinds' protocol (kinds.TaskKind,
where ModuleTask and its helpers live; they stay importable from here). Module buffers (if any) are
passed to functional_call unchanged: models whose forward updates buffers in place (BatchNorm in
training mode) are refused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .functional import METHODS, Objective, ObjectiveBase, ScreenCap, _as_values, screen_chunk
from .kinds import (
    ModuleTask,
    TaskKind,
    as_module_task,
    cost_terms,
    kind_of,
    layer_groups,
    module_costs,
    param_layout,
    seeded_builder,
    train_sgd_module,
    train_sgd_module_groups,
    validate_module_task,
)
from .losses import mean_floor
from .module_unroll import _Group, make_groups, unroll
from .tasks import Task

# Kept importable from here (callers and tests import the module path's names from this module).
__all__ = [
    "METHODS",
    "ModuleObjective",
    "ModuleTask",
    "TaskKind",
    "as_module_task",
    "cost_terms",
    "layer_groups",
    "make_objective",
    "module_costs",
    "param_layout",
    "seeded_builder",
    "train_sgd_module",
    "train_sgd_module_groups",
    "unrolled_val_loss_module",
    "validate_module_task",
]


# --------------------------------------------------------------------------- the objective


class ModuleObjective(ObjectiveBase):
    """functional.Objective for ModuleTasks (plain MLP Tasks are accepted too, as as_module_task).

    Mean validation loss over (task, draw) sources as a function of the hyperparameters, with the
    same methods and return conventions as functional.Objective: constants (lr, momentum) or
    (slots, segments) tables, where slots is 1 or one per parametrized layer (layer_groups: every
    task must then have the same number) and segments split the steps into equal blocks.
    """

    def __init__(
        self,
        tasks: Sequence[Task | TaskKind],
        draws: Sequence[int],
        max_runs: int = 128,
        screen_cap: ScreenCap | None = None,
    ):
        if not tasks or not draws:
            raise ValueError("An objective needs at least one task and one draw.")
        self.tasks = [kind_of(t).as_module_task() for t in tasks]
        self.groups = make_groups(self.tasks, draws)
        self.n_sources = sum(g.n_sources for g in self.groups)
        self.max_runs = max_runs
        self.chunks = [screen_chunk(max_runs, g.n_sources, g.task, screen_cap) for g in self.groups]
        self.zero_loss_floor = mean_floor(self.tasks)  # a meta-loss below it is no better (losses.py)

    def layer_groups(self) -> list[list[str]]:
        """Parameter names per slot (of the first task; every task's must have as many slots)."""
        return [list(s) for s in self.groups[0].slots]

    def losses_values(self, lr: Tensor, momentum: Tensor) -> list[float]:
        """Forward only: mean loss of each candidate given as (K, slots, segments) value tables."""
        lr, momentum = _as_values(lr), _as_values(momentum)
        count = lr.shape[0]
        totals = [0.0] * count
        with torch.no_grad():
            for g, chunk in zip(self.groups, self.chunks, strict=True):
                dt, dev = g.task.x_train.dtype, g.task.x_train.device
                for start in range(0, count, chunk):
                    lr_c = lr[start : start + chunk].to(dtype=dt, device=dev)
                    mom_c = momentum[start : start + chunk].to(dtype=dt, device=dev)
                    val, bad = unroll(g, lr_c, mom_c)
                    val = torch.where(bad, torch.full_like(val, math.inf), val)
                    for i, v in enumerate(val.sum(dim=1).double().cpu().tolist()):
                        totals[start + i] += v
        return [v / self.n_sources if math.isfinite(v) else math.inf for v in totals]

    def _value_and_grad(
        self, a: Tensor, z: Tensor, momentum_bounds, method: str, truncation
    ) -> tuple[float, Tensor, Tensor]:
        """value_and_grad_values (a, z: float64, detached; the method checked; forward mode by
        torch.func.jvp). A run whose training diverged makes the loss math.inf (and the gradient
        nan)."""
        lo, hi = momentum_bounds
        total = 0.0
        ga = torch.zeros_like(a)
        gz = torch.zeros_like(z)
        bad = False

        if method == "forward":
            for g in self.groups:
                s, da, dz, div = _forward_group(g, a, z, momentum_bounds)
                bad = bad or div
                total += s / self.n_sources
                ga += da / self.n_sources
                gz += dz / self.n_sources
        else:
            for g in self.groups:
                dt, dev = g.task.x_train.dtype, g.task.x_train.device
                grad_from = 0 if method == "reverse" else max(0, g.task.steps - int(truncation))
                av = a.clone().requires_grad_(True)
                zv = z.clone().requires_grad_(True)
                with torch.enable_grad():
                    lr = torch.exp(av).to(dtype=dt, device=dev).unsqueeze(0)
                    mom = (lo + (hi - lo) * torch.sigmoid(zv)).to(dtype=dt, device=dev).unsqueeze(0)
                    val, div = unroll(g, lr, mom, grad_from=grad_from)
                    s = val.sum() / self.n_sources
                    da, dz = torch.autograd.grad(s, (av, zv), allow_unused=True)
                bad = bad or bool(div.any())
                total += float(s.detach())
                ga += da.cpu() if da is not None else 0.0
                gz += dz.cpu() if dz is not None else 0.0
        if bad or not math.isfinite(total):
            return math.inf, torch.full_like(a, math.nan), torch.full_like(z, math.nan)
        return total, ga, gz


def _forward_group(group: _Group, a: Tensor, z: Tensor, momentum_bounds) -> tuple[float, Tensor, Tensor, bool]:
    """Forward-mode hypergradient of the group's summed validation losses: one jvp per
    hyperparameter (vmapped over the unit tangents), so no graph is kept across steps.
    Returns (sum of losses, d/da, d/dz, diverged)."""
    from torch.func import jvp, vmap

    lo, hi = momentum_bounds
    dt, dev = group.task.x_train.dtype, group.task.x_train.device
    a, z = a.to(dev), z.to(dev)
    n = a.numel()

    def f(av: Tensor, zv: Tensor):
        lr = torch.exp(av).to(dt).unsqueeze(0)
        mom = (lo + (hi - lo) * torch.sigmoid(zv)).to(dt).unsqueeze(0)
        val, div = unroll(group, lr, mom, use_program=False)  # jvp does not go through autograd.grad
        return val.sum().double(), div.any()

    eye = torch.eye(2 * n, dtype=torch.float64, device=dev)
    ta, tz = eye[:, :n].reshape(2 * n, *a.shape), eye[:, n:].reshape(2 * n, *z.shape)
    with torch.no_grad():
        value, tangents, div = vmap(lambda u, w: jvp(f, (a, z), (u, w), has_aux=True))(ta, tz)
    total = float(value[0])
    grads = tangents.cpu()
    bad = bool(div.any()) or not math.isfinite(total)
    return total, grads[:n].reshape(a.shape), grads[n:].reshape(z.shape), bad


def unrolled_val_loss_module(task: ModuleTask, lr, momentum, draw: int = 0, create_graph: bool = True) -> Tensor:
    """Validation loss after functional SGD training of task.model(draw); equals
    train_sgd_module(task, lr, momentum, draw). lr and momentum: numbers or 0-d tensors (then, with
    create_graph, the result is differentiable w.r.t. them), or (slots, segments) tables."""
    group = make_groups([task], [int(draw)])[0]
    dt, dev = task.x_train.dtype, task.x_train.device

    def run_tensor(v) -> Tensor:
        if isinstance(v, Tensor):
            return v.to(dtype=dt, device=dev).unsqueeze(0) if v.dim() == 2 else v.to(dtype=dt, device=dev).reshape(1)
        return torch.tensor([float(v)], dtype=dt, device=dev)

    with torch.set_grad_enabled(create_graph):
        val, bad = unroll(group, run_tensor(lr), run_tensor(momentum))
    if bool(bad.any()):
        return torch.full((), math.inf, dtype=dt, device=dev)
    return val.reshape(())


def make_objective(
    tasks: Sequence[Task | TaskKind], draws: Sequence[int], config: Any = None
) -> Objective | ModuleObjective:
    """functional.Objective (the fast batched path) when every task has an MLP view
    (TaskKind.as_mlp_task), else ModuleObjective on every task's module view. The one-line
    dispatch for meta.evaluate's evaluators. With a config whose job_memory_mb is set, screens are
    sub-batched to fit it (plan.screen_cap)."""
    cap = None
    if config is not None and getattr(config, "job_memory_mb", None) is not None:
        from .plan import screen_cap

        cap = screen_cap(tasks, config)
    mlps = [kind_of(t).as_mlp_task() for t in tasks]
    if all(m is not None for m in mlps):
        return Objective([m for m in mlps if m is not None], draws, screen_cap=cap)
    return ModuleObjective(tasks, draws, screen_cap=cap)
