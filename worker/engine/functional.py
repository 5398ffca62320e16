"""Functional SGD and the differentiable unroll.

The unroll trains many runs at once: a run is one (task, draw, lr, momentum). Runs whose tasks have
the same shapes are stacked along a leading batch dimension and trained with batched matmuls (one
Python step drives them all), with the training gradients written out by hand (backprop through an
MLP), so that a single reverse pass through the whole unroll gives the hypergradient. Each run
reproduces train_sgd: same initial weights (build_model), same mini-batches (batch_indices), same
update (sgd_step == torch.optim.SGD).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .tasks import Task, batch_indices, build_model, validate_task

_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


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


# --------------------------------------------------------------------------- batched MLP


def _activate(name: str, z: Tensor) -> Tensor:
    if name == "tanh":
        return torch.tanh(z)
    if name == "relu":
        return torch.relu(z)
    if name == "sigmoid":
        return torch.sigmoid(z)
    return F.gelu(z)


def _activate_backward(name: str, dh: Tensor, z: Tensor, a: Tensor) -> Tensor:
    """dL/dz from dL/da, written with differentiable ops (so the unroll can be differentiated)."""
    if name == "tanh":  # 1 - a^2
        return torch.addcmul(dh, dh * a, a, value=-1.0)
    if name == "sigmoid":  # a (1 - a)
        t = dh * a
        return torch.addcmul(t, t, a, value=-1.0)
    if name == "relu":
        return dh * (z > 0).to(dh.dtype)
    # exact (erf) GELU, as nn.GELU(): Phi(z) + z phi(z)
    cdf = 0.5 * (1.0 + torch.erf(z * _SQRT_HALF))
    pdf = torch.exp(-0.5 * z * z) * _INV_SQRT_2PI
    return dh * torch.addcmul(cdf, z, pdf)


def _layer_names(n_layers: int) -> list[tuple[str, str]]:
    return [(f"{2 * i}.weight", f"{2 * i}.bias") for i in range(n_layers)]


def _train_grads(
    params: dict[str, Tensor], names, xb: Tensor, yb: Tensor, act: str, loss: str
) -> dict[str, Tensor]:
    """Gradients of the mean mini-batch loss for R stacked runs, by hand-written backprop.

    params: weights (R, out, in), biases (R, 1, out); xb (R, B, F); yb: one-hot (R, B, C) for
    cross_entropy, targets (R, B, D) for mse.
    """
    n_layers = len(names)
    inputs: list[Tensor] = []
    pre: list[Tensor] = []
    h = xb
    for i, (wn, bn) in enumerate(names):
        inputs.append(h)
        z = torch.baddbmm(params[bn], h, params[wn].transpose(1, 2))
        if i < n_layers - 1:
            pre.append(z)
            h = _activate(act, z)
        else:
            h = z
    out = h
    if loss == "cross_entropy":
        delta = (torch.softmax(out, dim=-1) - yb) * (1.0 / out.shape[1])
    else:
        delta = (out - yb) * (2.0 / (out.shape[1] * out.shape[2]))
    grads: dict[str, Tensor] = {}
    for i in range(n_layers - 1, -1, -1):
        wn, bn = names[i]
        grads[wn] = torch.bmm(delta.transpose(1, 2), inputs[i])
        grads[bn] = delta.sum(dim=1, keepdim=True)
        if i > 0:
            dh = torch.bmm(delta, params[wn])
            delta = _activate_backward(act, dh, pre[i - 1], inputs[i])
    return grads


def _val_losses(params: dict[str, Tensor], names, x: Tensor, y: Tensor, act: str, loss: str) -> Tensor:
    """Per-run mean validation loss (R,), for R stacked runs that share one validation set."""
    h = x
    for i, (wn, bn) in enumerate(names):
        runs = params[wn].shape[0]
        h = torch.baddbmm(params[bn], h.expand(runs, *h.shape[-2:]), params[wn].transpose(1, 2))
        if i < len(names) - 1:
            h = _activate(act, h)
    if loss == "cross_entropy":
        target = y.unsqueeze(0).expand(h.shape[0], -1)
        return F.cross_entropy(h.transpose(1, 2), target, reduction="none").mean(dim=1)
    return (h - y).square().mean(dim=(1, 2))


def _signature(task: Task) -> tuple:
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
    """Sources (task, draw) with equal shapes, prepared for batched unrolls."""

    tasks: list[Task]  # one per source
    names: list[tuple[str, str]]
    act: str
    loss: str
    steps: int
    xb: Tensor  # (S, steps, B, F)
    yb: Tensor  # (S, steps, B, C|D), one-hot for cross_entropy
    init: dict[str, Tensor]  # (S, out, in) / (S, 1, out)

    @property
    def n_sources(self) -> int:
        return len(self.tasks)


def _make_group(sources: list[tuple[Task, int]]) -> _Group:
    first = sources[0][0]
    n_layers = len(first.hidden) + 1
    names = _layer_names(n_layers)
    xbs, ybs, inits = [], [], []
    for task, draw in sources:
        idx = batch_indices(task, draw)
        xbs.append(task.x_train[idx])
        if task.loss == "cross_entropy":
            ybs.append(F.one_hot(task.y_train[idx], task.out_features).to(task.x_train.dtype))
        else:
            ybs.append(task.y_train[idx].to(task.x_train.dtype))
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
        xb=torch.stack(xbs),
        yb=torch.stack(ybs),
        init=init,
    )


def _unroll_group(group: _Group, lr: Tensor, momentum: Tensor) -> Tensor:
    """Train K candidate settings on every source of the group; return val losses (K, S).

    lr, momentum: (K,) tensors (may require grad). Run r = k * S + s trains source s with
    candidate k.
    """
    k_count, s_count = lr.shape[0], group.n_sources
    runs = k_count * s_count
    lr3 = lr.repeat_interleave(s_count).view(runs, 1, 1)
    mom3 = momentum.repeat_interleave(s_count).view(runs, 1, 1)
    params = {n: (p.repeat(k_count, 1, 1) if k_count > 1 else p) for n, p in group.init.items()}
    bufs = sgd_init(params)
    for t in range(group.steps):
        xb, yb = group.xb[:, t], group.yb[:, t]
        if k_count > 1:
            xb, yb = xb.repeat(k_count, 1, 1), yb.repeat(k_count, 1, 1)
        grads = _train_grads(params, group.names, xb, yb, group.act, group.loss)
        params, bufs = sgd_step(params, bufs, grads, lr3, mom3)
    columns = []
    for s, task in enumerate(group.tasks):
        sub = {n: p[s::s_count] for n, p in params.items()}
        columns.append(_val_losses(sub, group.names, task.x_val, task.y_val, group.act, group.loss))
    return torch.stack(columns, dim=1)


# --------------------------------------------------------------------------- objectives


class Objective:
    """Mean validation loss over (task, draw) sources, as a function of (lr, momentum).

    Preparation (initial weights, mini-batches) is done once; every evaluation reproduces
    train_sgd on every source.
    """

    def __init__(self, tasks: Sequence[Task], draws: Sequence[int], max_runs: int = 512):
        if not tasks or not draws:
            raise ValueError("An objective needs at least one task and one draw.")
        for task in tasks:
            validate_task(task)
        by_sig: dict[tuple, list[tuple[Task, int]]] = {}
        for task in tasks:
            for d in draws:
                by_sig.setdefault(_signature(task), []).append((task, int(d)))
        self.groups = [_make_group(src) for src in by_sig.values()]
        self.n_sources = sum(g.n_sources for g in self.groups)
        self.max_runs = max_runs

    def losses(self, lrs: Sequence[float], momenta: Sequence[float]) -> list[float]:
        """Forward only: mean loss of each candidate (math.inf where any run diverged)."""
        totals = [0.0] * len(lrs)
        with torch.no_grad():
            for g in self.groups:
                chunk = max(1, self.max_runs // g.n_sources)
                for start in range(0, len(lrs), chunk):
                    lr = torch.tensor(lrs[start : start + chunk], dtype=g.xb.dtype, device=g.xb.device)
                    mom = torch.tensor(momenta[start : start + chunk], dtype=g.xb.dtype, device=g.xb.device)
                    sums = _unroll_group(g, lr, mom).sum(dim=1).double().cpu().tolist()
                    for i, v in enumerate(sums):
                        totals[start + i] += v
        return [v / self.n_sources if math.isfinite(v) else math.inf for v in totals]

    def value_and_grad(
        self, log_lr: float, momentum_param: float, momentum_bounds: tuple[float, float]
    ) -> tuple[float, tuple[float, float]]:
        """Loss and its gradient w.r.t. (log lr, momentum parameter), one reverse pass.

        momentum = lo + (hi - lo) * sigmoid(momentum_param). Non-finite results are returned as
        they are (inf/nan); callers decide.
        """
        lo, hi = momentum_bounds
        a = torch.tensor(float(log_lr), dtype=torch.float64, requires_grad=True)
        z = torch.tensor(float(momentum_param), dtype=torch.float64, requires_grad=True)
        total = 0.0
        ga = gz = 0.0
        with torch.enable_grad():
            for g in self.groups:
                lr = torch.exp(a).to(g.xb.dtype).to(g.xb.device).reshape(1)
                mom = (lo + (hi - lo) * torch.sigmoid(z)).to(g.xb.dtype).to(g.xb.device).reshape(1)
                s = _unroll_group(g, lr, mom).sum() / self.n_sources
                da, dz = torch.autograd.grad(s, (a, z))
                total += float(s.detach())
                ga += float(da)
                gz += float(dz)
        return total, (ga, gz)


def _as_run_tensor(value, dtype, device) -> Tensor:
    if isinstance(value, Tensor):
        return value.to(dtype=dtype, device=device).reshape(1)
    return torch.tensor([float(value)], dtype=dtype, device=device)


def unrolled_val_loss(
    task: Task, lr: Tensor, momentum: Tensor, draw: int = 0, create_graph: bool = True
) -> Tensor:
    """Validation loss after functional SGD training; equals train_sgd(task, lr, momentum, draw).

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
    tasks: Sequence[Task], log_lr: float, momentum_param: float, config
) -> tuple[float, tuple[float, float]]:
    """Meta-loss (mean unrolled validation loss over tasks and config.draws) and its gradient with
    respect to (log lr, momentum parameter), momentum = lo + (hi - lo) * sigmoid(momentum_param)
    with (lo, hi) = config.momentum_bounds. Reverse mode through the whole unroll."""
    return Objective(tasks, config.draws).value_and_grad(log_lr, momentum_param, config.momentum_bounds)
