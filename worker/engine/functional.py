"""Functional SGD and the differentiable unroll.

The unroll trains many runs at once: a run is one (task, draw, lr, momentum). Runs whose tasks have
the same shapes are stacked along a leading batch dimension and trained with batched matmuls (one
Python step drives them all), with the training gradients written out by hand (backprop through an
MLP), so that a single reverse pass through the whole unroll gives the hypergradient. Each run
reproduces train_sgd: same initial weights (build_model), same mini-batches (batch_indices), same
update (sgd_step == torch.optim.SGD).

Hyperparameters may be constants or (slots, segments) tables: one value per Linear layer and/or per
block of steps (segment_boundaries). The MLP's hand-written gradients and tangents are in
mlp_calculus.py. Hypergradients come three ways (Objective.value_and_grad*):
reverse (autograd through the whole unroll), truncated (the same through the last W steps only) and
forward (_forward_mode_group: one tangent per hyperparameter carried through the unroll, no graph).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .losses import mean_floor
from .mlp_calculus import _layer_names, _train_grads, _train_grads_and_tangents, _val_losses, _val_losses_and_tangents
from .tasks import Task, batch_indices, build_model, validate_task

# --------------------------------------------------------------------------- functional SGD


def sgd_init(params: dict[str, Tensor]) -> dict[str, Tensor]:
    """Momentum buffers for sgd_step. Zeros: mu * 0 + g == g, so the first step sets buf = g."""
    return {k: torch.zeros_like(p) for k, p in params.items()}


def sgd_step(
    params: dict[str, Tensor],
    bufs: dict[str, Tensor],
    grads: dict[str, Tensor],
    lr: float | Tensor,
    momentum: float | Tensor,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """One torch.optim.SGD step, out of place: buf = mu * buf + g; p = p - lr * buf.

    No dampening, no Nesterov, no weight decay. Differentiable with respect to params, grads, lr
    and momentum; lr and momentum may be tensors that broadcast against every parameter.
    """
    new_params: dict[str, Tensor] = {}
    new_bufs: dict[str, Tensor] = {}
    tensors = isinstance(lr, Tensor) and isinstance(momentum, Tensor)
    for k, p in params.items():
        g = grads[k]
        if tensors:
            buf = torch.addcmul(g, bufs[k], momentum)
            new_params[k] = torch.addcmul(p, buf, lr, value=-1.0)
        else:
            buf = bufs[k] * momentum + g
            new_params[k] = p - lr * buf
        new_bufs[k] = buf
    return new_params, new_bufs


def group_signature(task: Task) -> tuple:
    """The key MLP tasks are grouped by: tasks of equal shapes train batched together (plan.py
    counts the groups the same way)."""
    return (
        task.x_train.shape[1],
        tuple(task.hidden),
        task.activation,
        task.loss,
        task.out_features,
        task.steps,
        task.batch_size,
        task.x_train.dtype,
        str(task.x_train.device),
    )


@dataclass
class _Group:
    """Sources (task, draw) with equal shapes, prepared for batched unrolls.

    The mini-batches are gathered step by step from the tasks' rows (stored once per task), so
    what the group keeps per step is only the row indices: memory for data does not grow with the
    steps beyond 8 bytes per row of a batch.
    """

    tasks: list[Task]  # one per source
    names: list[tuple[str, str]]
    act: str
    loss: str
    steps: int
    x_rows: Tensor  # (N_total, F): every task's training rows, concatenated
    y_rows: Tensor  # (N_total, C|D): one-hot for cross_entropy
    idx: Tensor  # (steps, S, B) int64 indices into x_rows / y_rows
    init: dict[str, Tensor]  # (S, out, in) / (S, 1, out)

    @property
    def n_sources(self) -> int:
        return len(self.tasks)

    @property
    def dtype(self) -> torch.dtype:
        return self.x_rows.dtype

    @property
    def device(self) -> torch.device:
        return self.x_rows.device

    def batch(self, t: int) -> tuple[Tensor, Tensor]:
        """Step t's mini-batches of every source: (S, B, F), (S, B, C|D)."""
        i = self.idx[t]
        return self.x_rows[i], self.y_rows[i]


def _make_group(sources: list[tuple[Task, int]]) -> _Group:
    first = sources[0][0]
    n_layers = len(first.hidden) + 1
    names = _layer_names(n_layers)
    offsets: dict[int, int] = {}
    xs, ys = [], []
    total = 0
    idxs, inits = [], []
    for task, draw in sources:
        if id(task) not in offsets:
            offsets[id(task)] = total
            total += task.x_train.shape[0]
            xs.append(task.x_train)
            if task.loss == "cross_entropy":
                ys.append(F.one_hot(task.y_train, task.out_features).to(task.x_train.dtype))
            else:
                ys.append(task.y_train.to(task.x_train.dtype))
        idxs.append(batch_indices(task, draw) + offsets[id(task)])
        model = build_model(task, draw)
        inits.append({k: v.detach() for k, v in model.state_dict().items()})
    init = {}
    for wn, bn in names:
        init[wn] = torch.stack([p[wn] for p in inits])
        init[bn] = torch.stack([p[bn] for p in inits]).unsqueeze(1)
    return _Group(
        tasks=[t for t, _ in sources],
        names=names,
        act=first.activation,
        loss=first.loss,
        steps=first.steps,
        x_rows=torch.cat(xs),
        y_rows=torch.cat(ys),
        idx=torch.stack(idxs, dim=1),
        init=init,
    )


def segment_boundaries(steps: int, segments: int) -> list[int]:
    """The step index where each of `segments` equal blocks of a `steps`-step run starts.

    Block j covers steps floor(j * steps / S) .. floor((j + 1) * steps / S) - 1, so when S does not
    divide the steps the blocks differ in length by at most one step (the longer ones come last).
    """
    if not 1 <= segments <= steps:
        raise ValueError("The number of schedule segments must be between 1 and the number of steps.")
    return [(j * steps) // segments for j in range(segments)]


def _segment_of_steps(steps: int, segments: int) -> list[int]:
    bounds = segment_boundaries(steps, segments) + [steps]
    out: list[int] = []
    for j in range(segments):
        out.extend([j] * (bounds[j + 1] - bounds[j]))
    return out


def _as_values(x: Tensor) -> Tensor:
    """(K,) or (K, slots, segments) hyperparameter values as (K, slots, segments)."""
    return x.reshape(x.shape[0], 1, 1) if x.dim() == 1 else x


def _slot_of_layers(group: _Group, slots: int) -> list[int]:
    n_layers = len(group.names)
    if slots == 1:
        return [0] * n_layers
    if slots != n_layers:
        raise ValueError(f"{slots} per-layer values for a model of {n_layers} Linear layers.")
    return list(range(n_layers))


def _step_per_param(params, bufs, grads, lrs, moms):
    """sgd_step with a (runs, 1, 1) lr and momentum per parameter name."""
    new_params: dict[str, Tensor] = {}
    new_bufs: dict[str, Tensor] = {}
    for k, p in params.items():
        buf = torch.addcmul(grads[k], bufs[k], moms[k])
        new_params[k] = torch.addcmul(p, buf, lrs[k], value=-1.0)
        new_bufs[k] = buf
    return new_params, new_bufs


def _unroll_group(group: _Group, lr: Tensor, momentum: Tensor, grad_from: int = 0) -> Tensor:
    """Train K candidate settings on every source of the group; return val losses (K, S).

    lr, momentum: (K,) constants or (K, slots, segments) values (slots: 1, or one per Linear layer;
    segments: equal blocks of the steps, see segment_boundaries); they may require grad. Run
    r = k * S + s trains source s with candidate k. Steps before grad_from run without recording a
    graph (truncated hypergradients): the result then depends on the hyperparameters only through
    the later steps.
    """
    lr, momentum = _as_values(lr), _as_values(momentum)
    k_count, s_count = lr.shape[0], group.n_sources
    slots, segments = lr.shape[1], lr.shape[2]
    slot_of = _slot_of_layers(group, slots)
    seg_of = _segment_of_steps(group.steps, segments)
    runs = k_count * s_count

    def table(v: Tensor) -> list[list[Tensor]]:
        return [[v[:, i, j].repeat_interleave(s_count).view(runs, 1, 1) for j in range(segments)] for i in range(slots)]

    lr_tab, mom_tab = table(lr), table(momentum)
    params = {n: (p.repeat(k_count, 1, 1) if k_count > 1 else p) for n, p in group.init.items()}
    bufs = sgd_init(params)
    grad_on = torch.is_grad_enabled()
    for t in range(group.steps):
        if t == grad_from and t > 0:
            params = {n: p.detach() for n, p in params.items()}
            bufs = {n: b.detach() for n, b in bufs.items()}
        xb, yb = group.batch(t)
        if k_count > 1:
            xb, yb = xb.repeat(k_count, 1, 1), yb.repeat(k_count, 1, 1)
        seg = seg_of[t]
        lrs, moms = {}, {}
        for i, (wn, bn) in enumerate(group.names):
            lrs[wn] = lrs[bn] = lr_tab[slot_of[i]][seg]
            moms[wn] = moms[bn] = mom_tab[slot_of[i]][seg]
        with torch.set_grad_enabled(grad_on and t >= grad_from):
            grads = _train_grads(params, group.names, xb, yb, group.act, group.loss)
            params, bufs = _step_per_param(params, bufs, grads, lrs, moms)
    columns = []
    for s, task in enumerate(group.tasks):
        sub = {n: p[s::s_count] for n, p in params.items()}
        columns.append(_val_losses(sub, group.names, task.x_val, task.y_val, group.act, group.loss))
    return torch.stack(columns, dim=1)


def _forward_mode_group(group: _Group, a: Tensor, z: Tensor, momentum_bounds) -> tuple[Tensor, Tensor, Tensor]:
    """Forward-mode (exact) hypergradient of the summed validation losses of the group's sources.

    a: log learning rates, z: momentum parameters, both (slots, segments) float64. One tangent per
    hyperparameter (H = 2 * slots * segments) is carried through the unroll next to the weights:
        dv' = mu dv + dmu v + H_t dp      (H_t dp: Hessian-vector products, written out by hand in
                                           _train_grads_and_tangents, all H tangents batched)
        dp' = dp - lr dv' - dlr v'
    No graph is built, so memory does not depend on the number of steps.
    Returns (sum of losses, d/da (slots, segments), d/dz (slots, segments)).
    """
    dt, dev = group.dtype, group.device
    slots, segments = a.shape
    slot_of = _slot_of_layers(group, slots)
    seg_of = _segment_of_steps(group.steps, segments)
    lo, hi = momentum_bounds
    n_h = 2 * slots * segments
    with torch.no_grad():
        lr_v = torch.exp(a.double())
        sig = torch.sigmoid(z.double())
        mom_v = lo + (hi - lo) * sig
        dmom_v = (hi - lo) * sig * (1.0 - sig)
        lr_s = [[lr_v[i, j].to(dt) for j in range(segments)] for i in range(slots)]
        mom_s = [[mom_v[i, j].to(dt) for j in range(segments)] for i in range(slots)]

        def unit(index: int, value: Tensor) -> Tensor:
            e = torch.zeros(n_h, 1, 1, 1, dtype=dt, device=dev)
            e[index] = value.to(dt)
            return e

        clr = [[unit(i * segments + j, lr_v[i, j]) for j in range(segments)] for i in range(slots)]
        cmom = [
            [unit(slots * segments + i * segments + j, dmom_v[i, j]) for j in range(segments)] for i in range(slots)
        ]
        params = dict(group.init)
        bufs = sgd_init(params)
        dparams = {n: torch.zeros(n_h, *p.shape, dtype=dt, device=dev) for n, p in params.items()}
        dbufs = {n: torch.zeros_like(d) for n, d in dparams.items()}
        names, act, loss = group.names, group.act, group.loss
        for t in range(group.steps):
            xb, yb = group.batch(t)
            seg = seg_of[t]

            grads, dgrads = _train_grads_and_tangents(params, dparams, names, xb, yb, act, loss)
            new_params, new_bufs, new_dp, new_db = {}, {}, {}, {}
            for i, (wn, bn) in enumerate(names):
                lr, mom = lr_s[slot_of[i]][seg], mom_s[slot_of[i]][seg]
                c_lr, c_mom = clr[slot_of[i]][seg], cmom[slot_of[i]][seg]
                for n in (wn, bn):
                    g = grads[n]
                    buf = bufs[n] * mom + g
                    db = dbufs[n] * mom + c_mom * bufs[n] + dgrads[n]
                    new_bufs[n], new_db[n] = buf, db
                    new_params[n] = params[n] - lr * buf
                    new_dp[n] = dparams[n] - lr * db - c_lr * buf
            params, bufs, dparams, dbufs = new_params, new_bufs, new_dp, new_db
        total = torch.zeros((), dtype=torch.float64, device=dev)
        dtotal = torch.zeros(n_h, dtype=torch.float64, device=dev)
        for s, task in enumerate(group.tasks):
            sub = {n: p[s : s + 1] for n, p in params.items()}
            dsub = {n: d[:, s : s + 1] for n, d in dparams.items()}
            v, dv = _val_losses_and_tangents(sub, dsub, names, task.x_val, task.y_val, act, loss)
            total = total + v.sum().double()
            dtotal = dtotal + dv.sum(dim=1).double()
    half = slots * segments
    return total, dtotal[:half].view(slots, segments), dtotal[half:].view(slots, segments)


# --------------------------------------------------------------------------- objectives


METHODS: tuple[str, ...] = ("reverse", "forward", "truncated")

# (a group's first task, its sources) -> the most candidates one screen unroll of the group may
# batch within the job's memory budget (plan.screen_cap: the spec's cost model), None for no cap
ScreenCap = Callable[[Any, int], int | None]


def screen_chunk(max_runs: int, sources: int, task: Any, cap: ScreenCap | None) -> int:
    """Candidates per screen unroll of a group: max_runs // sources, and no more than the
    memory budget's cap (at least 1). Splitting changes no result: every run trains on its own."""
    chunk = max(1, max_runs // sources)
    limit = None if cap is None else cap(task, sources)
    return chunk if limit is None else max(1, min(chunk, int(limit)))


class ObjectiveBase:
    """What Objective and modules.ModuleObjective share: the constant-pair forms of their
    losses_values and value_and_grad_values, and the checks of a hypergradient method."""

    def losses(self, lrs: Sequence[float], momenta: Sequence[float]) -> list[float]:
        """Forward only: mean loss of each constant candidate (math.inf where any run diverged)."""
        lr = torch.tensor([float(x) for x in lrs], dtype=torch.float64).view(-1, 1, 1)
        mom = torch.tensor([float(x) for x in momenta], dtype=torch.float64).view(-1, 1, 1)
        return self.losses_values(lr, mom)

    def value_and_grad(
        self,
        log_lr: float,
        momentum_param: float,
        momentum_bounds: tuple[float, float],
        method: str = "reverse",
        truncation: int | None = None,
    ) -> tuple[float, tuple[float, float]]:
        """Loss and its gradient w.r.t. (log lr, momentum parameter) of a constant pair.

        momentum = lo + (hi - lo) * sigmoid(momentum_param). Non-finite results come as
        value_and_grad_values gives them.
        """
        a = torch.tensor([[float(log_lr)]], dtype=torch.float64)
        z = torch.tensor([[float(momentum_param)]], dtype=torch.float64)
        loss, ga, gz = self.value_and_grad_values(a, z, momentum_bounds, method, truncation)
        return loss, (float(ga.sum()), float(gz.sum()))

    def value_and_grad_values(
        self,
        a: Tensor,
        z: Tensor,
        momentum_bounds: tuple[float, float],
        method: str = "reverse",
        truncation: int | None = None,
    ) -> tuple[float, Tensor, Tensor]:
        """Loss and gradient w.r.t. log lr `a` and momentum parameter `z`, both (slots, segments).

        method: "reverse" (exact; memory grows with the steps), "forward" (exact; one tangent per
        hyperparameter, memory independent of the steps), "truncated" (reverse through the last
        `truncation` steps only: biased, it ignores how earlier steps depend on the values).
        Non-finite results: see the subclass's _value_and_grad.
        """
        if method not in METHODS:
            raise ValueError(f"Unknown hypergradient method {method!r}.")
        if method == "truncated" and (truncation is None or truncation < 1):
            raise ValueError("Truncated hypergradients need a window of at least one step.")
        return self._value_and_grad(a.detach().double(), z.detach().double(), momentum_bounds, method, truncation)


class Objective(ObjectiveBase):
    """Mean validation loss over (task, draw) sources, as a function of the hyperparameters.

    Preparation (initial weights, mini-batches) is done once; every evaluation reproduces
    train_sgd (or, for per-layer / scheduled values, train_sgd_groups) on every source.
    Hyperparameter values come as constants (lr, momentum) or as (slots, segments) tables: slots is
    1 (shared by all layers) or the number of Linear layers; segments split the steps into equal
    blocks (segment_boundaries).
    """

    def __init__(
        self,
        tasks: Sequence[Task],
        draws: Sequence[int],
        max_runs: int = 512,
        screen_cap: ScreenCap | None = None,
    ):
        if not tasks or not draws:
            raise ValueError("An objective needs at least one task and one draw.")
        for task in tasks:
            validate_task(task)
        by_sig: dict[tuple, list[tuple[Task, int]]] = {}
        for task in tasks:
            for d in draws:
                by_sig.setdefault(group_signature(task), []).append((task, int(d)))
        self.groups = [_make_group(src) for src in by_sig.values()]
        self.n_sources = sum(g.n_sources for g in self.groups)
        self.max_runs = max_runs
        self.chunks = [screen_chunk(max_runs, g.n_sources, g.tasks[0], screen_cap) for g in self.groups]
        self.zero_loss_floor = mean_floor(tasks)  # a meta-loss below it is no better (losses.py)

    def losses_values(self, lr: Tensor, momentum: Tensor) -> list[float]:
        """Forward only: mean loss of each candidate given as (K, slots, segments) value tables."""
        count = lr.shape[0]
        totals = [0.0] * count
        with torch.no_grad():
            for g, chunk in zip(self.groups, self.chunks, strict=True):
                for start in range(0, count, chunk):
                    lr_c = lr[start : start + chunk].to(dtype=g.dtype, device=g.device)
                    mom_c = momentum[start : start + chunk].to(dtype=g.dtype, device=g.device)
                    sums = _unroll_group(g, lr_c, mom_c).sum(dim=1).double().cpu().tolist()
                    for i, v in enumerate(sums):
                        totals[start + i] += v
        return [v / self.n_sources if math.isfinite(v) else math.inf for v in totals]

    def _value_and_grad(
        self, a: Tensor, z: Tensor, momentum_bounds, method: str, truncation
    ) -> tuple[float, Tensor, Tensor]:
        """value_and_grad_values (a, z: float64, detached; the method checked). Non-finite
        results are returned as they are (inf/nan); callers decide."""
        lo, hi = momentum_bounds
        total = 0.0
        ga = torch.zeros_like(a)
        gz = torch.zeros_like(z)
        for g in self.groups:
            if method == "forward":
                s, da, dz = _forward_mode_group(g, a.to(g.device), z.to(g.device), momentum_bounds)
                total += float(s) / self.n_sources
                ga += da.cpu() / self.n_sources
                gz += dz.cpu() / self.n_sources
                continue
            grad_from = 0 if method == "reverse" else max(0, g.steps - int(truncation))
            av = a.clone().requires_grad_(True)
            zv = z.clone().requires_grad_(True)
            with torch.enable_grad():
                lr = torch.exp(av).to(g.dtype).to(g.device).unsqueeze(0)
                mom = (lo + (hi - lo) * torch.sigmoid(zv)).to(g.dtype).to(g.device).unsqueeze(0)
                s = _unroll_group(g, lr, mom, grad_from=grad_from).sum() / self.n_sources
                da, dz = torch.autograd.grad(s, (av, zv), allow_unused=True)
            total += float(s.detach())
            ga += da if da is not None else 0.0
            gz += dz if dz is not None else 0.0
        return total, ga, gz


def _as_run_tensor(value, dtype, device) -> Tensor:
    if isinstance(value, Tensor):
        if value.dim() == 2:  # a (slots, segments) table
            return value.to(dtype=dtype, device=device).unsqueeze(0)
        return value.to(dtype=dtype, device=device).reshape(1)
    return torch.tensor([float(value)], dtype=dtype, device=device)


def unrolled_val_loss(task: Task, lr: Tensor, momentum: Tensor, draw: int = 0, create_graph: bool = True) -> Tensor:
    """Validation loss after functional SGD training; equals train_sgd(task, lr, momentum, draw).

    lr and momentum may also be (slots, segments) tables (slots: 1 or one per Linear layer;
    segments: equal blocks of the steps, segment_boundaries); then it equals train_sgd_groups.
    With create_graph the result is differentiable w.r.t. lr and momentum (0-d tensors); without
    it, no graph is built.
    """
    validate_task(task)
    group = _make_group([(task, draw)])
    dt, dev = task.x_train.dtype, task.x_train.device
    lr_t = _as_run_tensor(lr, dt, dev)
    mom_t = _as_run_tensor(momentum, dt, dev)
    with torch.set_grad_enabled(create_graph):
        return _unroll_group(group, lr_t, mom_t).reshape(())


def hypergradient(
    tasks: Sequence[Task], log_lr: float, momentum_param: float, config, method: str | None = None
) -> tuple[float, tuple[float, float]]:
    """Meta-loss (mean unrolled validation loss over tasks and config.draws) and its gradient with
    respect to (log lr, momentum parameter), momentum = lo + (hi - lo) * sigmoid(momentum_param)
    with (lo, hi) = config.momentum_bounds. By `method` (default: config.method, where "auto" means
    "reverse"): reverse mode through the whole unroll, forward mode, or truncated reverse mode
    through the last config.truncation steps."""
    method = method or getattr(config, "method", "reverse")
    if method == "auto":
        method = "reverse"
    return Objective(tasks, config.draws).value_and_grad(
        log_lr, momentum_param, config.momentum_bounds, method, getattr(config, "truncation", None)
    )
