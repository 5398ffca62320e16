"""The same hypergradient as gradtune's, computed with `higher` and with `torchopt`.

d(validation loss after K steps of SGD(lr, momentum)) / d(log lr, momentum), one task at a time, on
the same initial weights (build_model) and mini-batches (batch_indices) as the engine, so the
numbers can be compared to worker.engine's. Benchmark-only: pip install -e '.[bench]'.
"""

from __future__ import annotations

import torch
from torch.func import functional_call

from worker.engine import Task, batch_indices, build_model
from worker.engine.kinds import ModuleTask
from worker.engine.reference import task_loss


class Prepared:
    """Model, its initial weights and the batch order of one (task, draw), built once (an MLP Task's
    build_model, or a ModuleTask's own model: a cnn, an exported program's nn.Module)."""

    def __init__(self, task: Task | ModuleTask, draw: int = 0):
        self.task = task
        self.model = task.model(draw) if isinstance(task, ModuleTask) else build_model(task, draw)
        self.init = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.idx = batch_indices(task, draw)

    def reset(self) -> None:
        self.model.load_state_dict(self.init)


def higher_hypergradient(p: Prepared, log_lr: float, momentum: float) -> tuple[float, list[float]]:
    import higher

    task = p.task
    p.reset()
    a = torch.tensor(log_lr, dtype=task.x_train.dtype, requires_grad=True)
    mu = torch.tensor(momentum, dtype=task.x_train.dtype, requires_grad=True)
    lr = torch.exp(a)
    opt = torch.optim.SGD(p.model.parameters(), lr=0.1, momentum=0.5)
    with higher.innerloop_ctx(p.model, opt, copy_initial_weights=True, override={"lr": [lr], "momentum": [mu]}) as (
        fmodel,
        diffopt,
    ):
        for t in range(task.steps):
            rows = p.idx[t]
            diffopt.step(task_loss(task, fmodel(task.x_train[rows]), task.y_train[rows]))
        val = task_loss(task, fmodel(task.x_val), task.y_val)
        ga, gm = torch.autograd.grad(val, (a, mu))
    return float(val.detach()), [float(ga), float(gm)]


def torchopt_hypergradient(p: Prepared, log_lr: float, momentum: float) -> tuple[float, list[float]]:
    import torchopt

    task = p.task
    a = torch.tensor(log_lr, dtype=task.x_train.dtype, requires_grad=True)
    mu = torch.tensor(momentum, dtype=task.x_train.dtype, requires_grad=True)
    lr = torch.exp(a)
    params = {k: v.clone().requires_grad_(True) for k, v in p.init.items()}
    # torchopt's functional SGD: trace (buf = mu * buf + g) then scale by -lr, both differentiable
    trace = torchopt.transform.trace(momentum=mu, moment_requires_grad=True)
    opt = torchopt.chain(trace, torchopt.transform.scale(-lr))
    state = opt.init(params)
    for t in range(task.steps):
        rows = p.idx[t]
        loss = task_loss(task, functional_call(p.model, params, (task.x_train[rows],)), task.y_train[rows])
        grads = torch.autograd.grad(loss, tuple(params.values()), create_graph=True)
        updates, state = opt.update(dict(zip(params.keys(), grads, strict=True)), state, inplace=False)
        params = torchopt.apply_updates(params, updates, inplace=False)
    val = task_loss(task, functional_call(p.model, params, (task.x_val,)), task.y_val)
    ga, gm = torch.autograd.grad(val, (a, mu))
    return float(val.detach()), [float(ga), float(gm)]
