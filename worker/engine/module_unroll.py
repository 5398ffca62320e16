"""The unroll of modules.ModuleObjective: groups of (task, draw) sources trained as one batch of runs.

A group is every source whose model computes the same function of (parameters, input) on data of
the same shapes: tasks whose models are the same chain of known functions with the same parameter
shapes (batched.program_of; the cnn kind, exported programs and build_model's MLP), the same loss,
steps, batch size, example shape, dtype and device. The number of training rows and of validation
rows may differ between a group's tasks: the training rows of every task are concatenated (each
source's mini-batches index into its own task's rows), and the validation pass runs once per set of
sources with equal validation sizes. A model the engine cannot read as such a chain (any other
nn.Module) is a group of its own task's draws, as before.

Run r = k * S + s trains source s (tasks in order, each task's draws in order) with candidate k.
Each step computes every run's training gradient at once: by batched.grads_and_losses (a batched
program and torch.autograd.grad), or, for a group without a program or in forward mode (whose jvp
does not go through torch.autograd.grad), by ``torch.func.vmap`` of ``torch.func.grad_and_value``
over ``functional_call``. The SGD update is torch.optim.SGD's: buf = g (first step), then
buf = momentum * buf + g; p = p - lr * buf.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import batched
from .functional import _as_values, _segment_of_steps
from .kinds import ModuleTask, layer_groups, validate_module_task
from .losses import val_loss
from .tasks import batch_indices
from .training import loss_of


@dataclass
class _ValBlock:
    """Sources whose tasks have the same number of validation rows, validated in one pass."""

    sources: Tensor  # (S_b,) int64 source indices
    x: Tensor  # (S_b, N_val, ...) each source's task's validation features
    y: Tensor  # (S_b, N_val, ...)


@dataclass
class _Group:
    """The sources (task, draw) of one batched unroll."""

    tasks: list[ModuleTask]  # the group's tasks, in order; source s is task s // D, draw draws[s % D]
    draws: list[int]
    skeleton: nn.Module  # the architecture; its own parameter values are never used
    program: batched.Program | None  # None: vmap over functional_call
    names: list[str]  # trainable parameters, named_parameters() order
    slots: list[list[str]]  # layer_groups
    buffers: dict[str, Tensor]
    frozen: dict[str, Tensor]  # parameters with requires_grad=False: held constant
    init: dict[str, Tensor]  # (S, *shape)
    x_rows: Tensor  # every task's training rows, concatenated
    y_rows: Tensor
    idx: Tensor  # (S, steps, B) indices into x_rows / y_rows
    val: list[_ValBlock]

    @property
    def task(self) -> ModuleTask:
        """The first task: steps, batch size, loss, dtype and device are every task's."""
        return self.tasks[0]

    @property
    def n_sources(self) -> int:
        return len(self.tasks) * len(self.draws)


@dataclass
class _Prepared:
    task: ModuleTask
    skeleton: nn.Module
    program: batched.Program | None
    init: dict[str, Tensor]  # (D, *shape)
    key: Hashable


def _prepare(task: ModuleTask, draws: list[int]) -> _Prepared:
    models = [task.model(d) for d in draws]
    skeleton = validate_module_task(task, models[0])
    names = [n for n, p in skeleton.named_parameters() if p.requires_grad]
    init = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in models]) for n in names}
    program = batched.program_of(skeleton, task.x_val[:2])
    key = _key(task, skeleton, program)
    return _Prepared(task, skeleton, program, init, ("task", id(task)) if key is None else key)


def _key(task: ModuleTask, skeleton: nn.Module, program: batched.Program | None) -> Hashable | None:
    if program is None:
        return None
    x, y = task.x_train, task.y_train
    shapes = tuple((n, tuple(p.shape), p.dtype) for n, p in skeleton.named_parameters())
    data = (tuple(x.shape[1:]), x.dtype, str(x.device), tuple(y.shape[1:]), y.dtype)
    return ("program", program.key, shapes, task.loss, task.steps, task.batch_size, data)


def group_key(task: ModuleTask) -> Hashable | None:
    """The key make_groups batches the task's sources under (tasks with equal keys share one
    unroll), or None when its model is not a program (a group of its own). For plan.py."""
    model = task.model(0)
    return _key(task, model, batched.program_of(model, task.x_val[:2]))


def _val_blocks(tasks: list[ModuleTask], n_draws: int) -> list[_ValBlock]:
    by_rows: dict[int, list[int]] = {}
    for i, t in enumerate(tasks):
        by_rows.setdefault(int(t.x_val.shape[0]), []).append(i)
    blocks = []
    for members in by_rows.values():
        sources = [i * n_draws + d for i in members for d in range(n_draws)]
        pick = [i for i in members for _ in range(n_draws)]
        blocks.append(
            _ValBlock(
                sources=torch.tensor(sources, dtype=torch.int64, device=tasks[0].x_val.device),
                x=torch.stack([tasks[i].x_val for i in pick]),
                y=torch.stack([tasks[i].y_val for i in pick]),
            )
        )
    return blocks


def _group_of(prepared: list[_Prepared], draws: list[int]) -> _Group:
    first = prepared[0]
    skel = first.skeleton
    tasks = [p.task for p in prepared]
    names = list(first.init)
    offsets, total = [], 0
    for t in tasks:
        offsets.append(total)
        total += t.x_train.shape[0]
    idx = torch.stack([batch_indices(t, d) + off for t, off in zip(tasks, offsets, strict=True) for d in draws])
    return _Group(
        tasks=tasks,
        draws=list(draws),
        skeleton=skel,
        program=first.program,
        names=names,
        slots=layer_groups(skel),
        buffers={n: b.detach() for n, b in skel.named_buffers()},
        frozen={n: p.detach() for n, p in skel.named_parameters() if not p.requires_grad},
        init={n: torch.cat([p.init[n] for p in prepared]) for n in names},
        x_rows=torch.cat([t.x_train for t in tasks]) if len(tasks) > 1 else first.task.x_train,
        y_rows=torch.cat([t.y_train for t in tasks]) if len(tasks) > 1 else first.task.y_train,
        idx=idx.to(first.task.x_train.device),
        val=_val_blocks(tasks, len(draws)),
    )


def make_groups(tasks: Sequence[ModuleTask], draws: Sequence[int]) -> list[_Group]:
    """The batched groups of the tasks' sources, in order of each group's first task."""
    ds = [int(d) for d in draws]
    by_key: dict[Hashable, list[_Prepared]] = {}
    for t in tasks:
        p = _prepare(t, ds)
        by_key.setdefault(p.key, []).append(p)
    return [_group_of(members, ds) for members in by_key.values()]


# --------------------------------------------------------------------------- per-run losses


def _loss_fn(group: _Group, validation: bool = False):
    """The training loss of one run's parameters on (x, y) by functional_call (the vmap path); with
    validation, the validation loss (cross-entropy in float64, losses.val_loss)."""
    skel, loss_kind = group.skeleton, group.task.loss
    consts = {**group.buffers, **group.frozen}

    def loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = torch.func.functional_call(skel, {**params, **consts}, (x,))
        if loss_kind == "mse":  # = F.mse_loss; written out because its forward-mode rule under
            return (out - y).square().mean()  # vmap warns about resizing an output
        return val_loss(loss_kind, out, y) if validation else loss_of(loss_kind, out, y)

    return loss


def _val_losses(group: _Group, params: dict[str, Tensor], k_count: int, program: bool) -> Tensor:
    """(R,) validation loss of every run."""
    s_count = group.n_sources
    runs = k_count * s_count
    parts, order = [], []
    for block in group.val:
        whole = block.sources.numel() == s_count
        if whole:
            ids, sub = None, params
        else:
            first = torch.arange(k_count, device=block.sources.device).unsqueeze(1) * s_count
            ids = (first + block.sources).reshape(-1)
            sub = {n: p.index_select(0, ids) for n, p in params.items()}
        x, y = block.x, block.y
        if k_count > 1:
            x = x.repeat(k_count, *([1] * (x.dim() - 1)))
            y = y.repeat(k_count, *([1] * (y.dim() - 1)))
        if program:
            assert group.program is not None
            out = batched.run(group.program, sub, x)
            losses = batched.per_run_losses(group.task.loss, out, y, validation=True)
        else:
            losses = torch.func.vmap(_loss_fn(group, validation=True))(sub, x, y)
        if whole:
            return losses
        parts.append(losses)
        order.append(ids)
    assert all(o is not None for o in order)
    values = torch.cat(parts)
    where = torch.cat([o for o in order if o is not None])
    return values.new_zeros(runs).index_put((where,), values)


# --------------------------------------------------------------------------- the unroll


def _slot_of_names(group: _Group, slots: int) -> dict[str, int]:
    if slots == 1:
        return {n: 0 for n in group.names}
    if slots != len(group.slots):
        raise ValueError(f"{slots} per-layer values for a model of {len(group.slots)} parametrized layers.")
    return {n: i for i, names in enumerate(group.slots) for n in names}


def unroll(
    group: _Group, lr: Tensor, momentum: Tensor, grad_from: int = 0, use_program: bool = True
) -> tuple[Tensor, Tensor]:
    """Train K candidate settings on every source of the group.

    lr, momentum: (K,) or (K, slots, segments), in the task's dtype and device; they may require
    grad. Run r = k * S + s trains source s with candidate k. Returns (val losses (K, S), diverged
    (K, S) bool: a training loss was not finite). Steps before grad_from record no graph. Without
    use_program (forward mode's jvp), the runs are batched by vmap even when there is a program.
    """
    from torch.func import grad_and_value, vmap

    task = group.task
    lr, momentum = _as_values(lr), _as_values(momentum)
    k_count, s_count = lr.shape[0], group.n_sources
    slots, segments = lr.shape[1], lr.shape[2]
    runs = k_count * s_count
    slot_of = _slot_of_names(group, slots)
    seg_of = _segment_of_steps(task.steps, segments)
    program = group.program if use_program else None

    # each parameter's (lr, momentum) per segment, as (R, 1, ..., 1) run columns, built once
    columns: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
    coef: dict[tuple[str, int], tuple[Tensor, Tensor]] = {}
    for n, p in group.init.items():
        for j in range(segments):
            i = slot_of[n]
            if (i, j) not in columns:
                columns[i, j] = (lr[:, i, j].repeat_interleave(s_count), momentum[:, i, j].repeat_interleave(s_count))
            shape = (runs, *([1] * (p.dim() - 1)))
            coef[n, j] = (columns[i, j][0].view(shape), columns[i, j][1].view(shape))
    step_fn = vmap(grad_and_value(_loss_fn(group)))
    params = {n: (p.repeat(k_count, *([1] * (p.dim() - 1))) if k_count > 1 else p) for n, p in group.init.items()}
    bufs: dict[str, Tensor] = {}
    seen: list[Tensor] = []  # every step's training losses (R,)
    grad_on = torch.is_grad_enabled()
    for t in range(task.steps):
        if t == grad_from and t > 0:
            params = {n: p.detach() for n, p in params.items()}
            bufs = {n: b.detach() for n, b in bufs.items()}
        rows = group.idx[:, t]  # (S, B)
        xb, yb = group.x_rows[rows], group.y_rows[rows]
        if k_count > 1:
            xb = xb.repeat(k_count, *([1] * (xb.dim() - 1)))
            yb = yb.repeat(k_count, *([1] * (yb.dim() - 1)))
        recording = grad_on and t >= grad_from
        with torch.set_grad_enabled(recording):
            if program is not None:
                grads, values = batched.grads_and_losses(program, task.loss, params, xb, yb, create_graph=recording)
            else:
                grads, values = step_fn(params, xb, yb)
            seen.append(values.detach())
            new_params, new_bufs = {}, {}
            for n in params:
                lr_n, mom_n = coef[n, seg_of[t]]
                g = grads[n]
                buf = g if t == 0 else torch.addcmul(g, bufs[n], mom_n)
                new_bufs[n] = buf
                new_params[n] = torch.addcmul(params[n], buf, lr_n, value=-1.0)
            params, bufs = new_params, new_bufs
    if seen:
        diverged = ~torch.isfinite(torch.stack(seen)).all(dim=0)
    else:
        diverged = torch.zeros(runs, dtype=torch.bool, device=task.x_train.device)
    val = _val_losses(group, params, k_count, program is not None)
    return val.view(k_count, s_count), diverged.view(k_count, s_count)
