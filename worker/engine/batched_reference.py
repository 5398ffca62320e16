"""The reference runs of many (task, draw) sources at once: torch.optim.SGD on stacked parameters.

reference.evaluate trains every source of a job with plain torch.optim.SGD. For sources that
module_unroll groups together (same chain of known functions, same data shapes: batched.py), the
runs are independent and SGD's update is elementwise, so one torch.optim.SGD over the stacked
parameters (S, *shape), each under its model's own name, with the gradient of the summed per-run
training losses (each run's parameters get their own loss's gradient), performs on every slice
exactly the update torch.optim.SGD performs on that run's model alone: same optimizer, same
initial weights, same mini-batches; the forward and backward passes are batched.run's instead of
the nn.Module's, equal to rounding (module_unroll.py's groups are checked against the module, and
tests/worker/engine/test_batched.py compares the two). A run whose training loss is not finite
scores math.inf, as in training.fit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from . import batched
from .module_unroll import _Group
from .training import apply_schedule


class _Stacked(nn.Module):
    """Parameters (S, *shape) registered under the model's own (dotted) names."""

    def __init__(self, init: dict[str, Tensor]):
        super().__init__()
        for name, value in init.items():
            owner: nn.Module = self
            *path, leaf = name.split(".")
            for part in path:
                if not hasattr(owner, part):
                    owner.add_module(part, nn.Module())
                owner = getattr(owner, part)
            owner.register_parameter(leaf, nn.Parameter(value.detach().clone()))


Schedule = tuple[Sequence[dict], Sequence[int]]  # (param_groups, boundaries)


def fit_group(
    group: _Group, optimizer_for: Callable[[nn.Module], torch.optim.Optimizer], schedule: Schedule | None = None
) -> list[float]:
    """Validation loss of every source of the group (source order: tasks, then draws) after
    training with the optimizer ``optimizer_for`` builds on the stacked parameters (with
    schedule = (param_groups, boundaries), apply_schedule before every step); math.inf where the
    training diverged."""
    program, task = group.program, group.task
    assert program is not None
    model = _Stacked(group.init)
    optimizer = optimizer_for(model)
    params = dict(model.named_parameters())
    finite = torch.ones(group.n_sources, dtype=torch.bool, device=task.x_train.device)
    with torch.enable_grad():
        for t in range(task.steps):
            if schedule is not None:
                apply_schedule(optimizer, schedule[0], schedule[1], t)
            rows = group.idx[:, t]
            out = batched.run(program, params, group.x_rows[rows])
            losses = batched.per_run_losses(task.loss, out, group.y_rows[rows])
            finite &= torch.isfinite(losses.detach())
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            optimizer.step()
    val = torch.full((group.n_sources,), math.inf, dtype=torch.float64)
    with torch.no_grad():
        for block in group.val:
            sub = {n: p.index_select(0, block.sources) for n, p in params.items()}
            out = batched.run(program, sub, block.x)
            val[block.sources.cpu()] = batched.per_run_losses(task.loss, out, block.y, validation=True).double().cpu()
    ok = finite.cpu() & torch.isfinite(val)
    return [float(v) if good else math.inf for v, good in zip(val.tolist(), ok.tolist(), strict=True)]
