"""The generic path: any nn.Module (a CNN, an MLP, later an exported program), trained functionally.

An MLP task goes through the hand-written batched unroll in functional.py. Every other model goes
through this module: the model is built deterministically from (task.seed, draw) by the task's
``make_model``, its parameters become a dict of tensors, and training runs out of place with
``torch.func.functional_call``. Runs that share a task (every draw and every candidate setting) are
stacked along a leading dimension and trained together with ``torch.func.vmap`` of
``torch.func.grad_and_value``; the SGD update is the one of ``torch.optim.SGD``:

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
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .functional import METHODS, Objective, ObjectiveBase, ScreenCap, screen_chunk
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
from .losses import mean_floor, val_loss
from .tasks import Task, batch_indices
from .training import loss_of

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


# --------------------------------------------------------------------------- the unroll


def _segment_of_steps(steps: int, segments: int) -> list[int]:
    """Segment of each step: block j covers floor(j*steps/S) .. floor((j+1)*steps/S) - 1
    (functional.segment_boundaries)."""
    if not 1 <= segments <= steps:
        raise ValueError("The number of schedule segments must be between 1 and the number of steps.")
    bounds = [(j * steps) // segments for j in range(segments)] + [steps]
    out: list[int] = []
    for j in range(segments):
        out.extend([j] * (bounds[j + 1] - bounds[j]))
    return out


@dataclass
class _Group:
    """The sources (draws) of one task, prepared for batched unrolls."""

    task: ModuleTask
    draws: list[int]
    skeleton: nn.Module  # the architecture; its own parameter values are never used
    names: list[str]  # trainable parameters, named_parameters() order
    slots: list[list[str]]  # layer_groups
    buffers: dict[str, Tensor]
    frozen: dict[str, Tensor]  # parameters with requires_grad=False: held constant
    init: dict[str, Tensor]  # (S, *shape)
    idx: Tensor  # (S, steps, B) row indices

    @property
    def n_sources(self) -> int:
        return len(self.draws)


def _make_group(task: ModuleTask, draws: list[int]) -> _Group:
    models = [task.model(d) for d in draws]
    skeleton = validate_module_task(task, models[0])
    names = [n for n, p in skeleton.named_parameters() if p.requires_grad]
    frozen = {n: p.detach() for n, p in skeleton.named_parameters() if not p.requires_grad}
    init = {}
    for n in names:
        init[n] = torch.stack([dict(m.named_parameters())[n].detach() for m in models])
    return _Group(
        task=task,
        draws=list(draws),
        skeleton=skeleton,
        names=names,
        slots=layer_groups(skeleton),
        buffers={n: b.detach() for n, b in skeleton.named_buffers()},
        frozen=frozen,
        init=init,
        idx=torch.stack([batch_indices(task, d) for d in draws]),
    )


def _loss_fn(group: _Group, validation: bool = False):
    """The training loss of one run's parameters on (x, y); with validation, the validation loss
    (cross-entropy in float64, losses.val_loss)."""
    skel, loss_kind = group.skeleton, group.task.loss
    consts = {**group.buffers, **group.frozen}

    def loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = torch.func.functional_call(skel, {**params, **consts}, (x,))
        if loss_kind == "mse":  # = F.mse_loss; written out because its forward-mode rule under
            return (out - y).square().mean()  # vmap warns about resizing an output
        return val_loss(loss_kind, out, y) if validation else loss_of(loss_kind, out, y)

    return loss


def _as_values(x: Tensor) -> Tensor:
    """(K,) or (K, slots, segments) hyperparameter values as (K, slots, segments)."""
    return x.reshape(x.shape[0], 1, 1) if x.dim() == 1 else x


def _slot_of_names(group: _Group, slots: int) -> dict[str, int]:
    if slots == 1:
        return {n: 0 for n in group.names}
    if slots != len(group.slots):
        raise ValueError(f"{slots} per-layer values for a model of {len(group.slots)} parametrized layers.")
    return {n: i for i, names in enumerate(group.slots) for n in names}


def _unroll(group: _Group, lr: Tensor, momentum: Tensor, grad_from: int = 0) -> tuple[Tensor, Tensor]:
    """Train K candidate settings on every source of the group.

    lr, momentum: (K,) or (K, slots, segments), in the task's dtype and device; they may require
    grad. Run r = k * S + s trains source s with candidate k. Returns (val losses (K, S), diverged
    (K, S) bool: a training loss was not finite). Steps before grad_from record no graph.
    """
    from torch.func import grad_and_value, vmap

    task = group.task
    lr, momentum = _as_values(lr), _as_values(momentum)
    k_count, s_count = lr.shape[0], group.n_sources
    slots, segments = lr.shape[1], lr.shape[2]
    runs = k_count * s_count
    slot_of = _slot_of_names(group, slots)
    seg_of = _segment_of_steps(task.steps, segments)

    def per_run(v: Tensor, like: Tensor) -> Tensor:  # (K,) -> (R, 1, ..., 1)
        return v.repeat_interleave(s_count).view(runs, *([1] * (like.dim() - 1)))

    tables = {}
    for i in range(slots):
        for j in range(segments):
            tables[i, j] = (lr[:, i, j], momentum[:, i, j])
    loss = _loss_fn(group)
    step_fn = vmap(grad_and_value(loss))
    params = {n: (p.repeat(k_count, *([1] * (p.dim() - 1))) if k_count > 1 else p) for n, p in group.init.items()}
    bufs: dict[str, Tensor] = {}
    diverged = torch.zeros(runs, dtype=torch.bool, device=task.x_train.device)
    grad_on = torch.is_grad_enabled()
    for t in range(task.steps):
        if t == grad_from and t > 0:
            params = {n: p.detach() for n, p in params.items()}
            bufs = {n: b.detach() for n, b in bufs.items()}
        rows = group.idx[:, t]  # (S, B)
        xb, yb = task.x_train[rows], task.y_train[rows]
        if k_count > 1:
            xb = xb.repeat(k_count, *([1] * (xb.dim() - 1)))
            yb = yb.repeat(k_count, *([1] * (yb.dim() - 1)))
        with torch.set_grad_enabled(grad_on and t >= grad_from):
            grads, values = step_fn(params, xb, yb)
            diverged = diverged | ~torch.isfinite(values.detach())
            new_params, new_bufs = {}, {}
            for n in params:
                lr_k, mom_k = tables[slot_of[n], seg_of[t]]
                g = grads[n]
                buf = g if t == 0 else torch.addcmul(g, bufs[n], per_run(mom_k, g))
                new_bufs[n] = buf
                new_params[n] = torch.addcmul(params[n], buf, per_run(lr_k, buf), value=-1.0)
            params, bufs = new_params, new_bufs
    val = vmap(_loss_fn(group, validation=True), in_dims=(0, None, None))(params, task.x_val, task.y_val)
    return val.view(k_count, s_count), diverged.view(k_count, s_count)


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
        self.groups = [_make_group(t, [int(d) for d in draws]) for t in self.tasks]
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
                    val, bad = _unroll(g, lr_c, mom_c)
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
                    val, div = _unroll(g, lr, mom, grad_from=grad_from)
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
        val, div = _unroll(group, lr, mom)
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
    group = _make_group(task, [int(draw)])
    dt, dev = task.x_train.dtype, task.x_train.device

    def run_tensor(v) -> Tensor:
        if isinstance(v, Tensor):
            return v.to(dtype=dt, device=dev).unsqueeze(0) if v.dim() == 2 else v.to(dtype=dt, device=dev).reshape(1)
        return torch.tensor([float(v)], dtype=dt, device=dev)

    with torch.set_grad_enabled(create_graph):
        val, bad = _unroll(group, run_tensor(lr), run_tensor(momentum))
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
