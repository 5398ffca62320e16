"""The meta-loss of thetas, for the search (search.Evaluator): the constant pair through the
objective's constant forms (losses, value_and_grad), tables through its table forms
(losses_values, value_and_grad_values), each exactly as the loop has always called them.
StopChecked asks a should_stop callback before each evaluation (run_meta's stop between evaluations)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .config import MetaConfig
from .search import finite, values


class PairEvaluator:
    """theta = [log lr, momentum logit]."""

    def __init__(self, objective, config: MetaConfig, method: str):
        self.objective, self.config, self.method = objective, config, method

    def forward(self, thetas: Sequence[Sequence[float]]) -> list[float]:
        pairs = [values(self.config, th, 1, 1) for th in thetas]
        return self.objective.losses([lrs[0][0] for lrs, _ in pairs], [moms[0][0] for _, moms in pairs])

    def value_and_grad(self, theta: Sequence[float]) -> tuple[float, list[float]]:
        loss, grad = self.objective.value_and_grad(
            theta[0], theta[1], self.config.momentum_bounds, self.method, self.config.truncation
        )
        return loss, list(grad)

    def stable(self, theta: Sequence[float], loss: float) -> bool:
        return True  # the constant phase does not probe a stability margin

    def floor(self) -> float:
        return self.objective.zero_loss_floor  # losses.zero_loss_floor, averaged over the tasks


class TableEvaluator:
    """theta = every log lr of the (slots x segments) table (slot-major), then every logit."""

    def __init__(self, objective, config: MetaConfig, method: str, slots: int, segments: int):
        self.objective, self.config, self.method = objective, config, method
        self.slots, self.segments = slots, segments

    def tensors(self, thetas: Sequence[Sequence[float]]) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.tensor([list(th) for th in thetas], dtype=torch.float64)
        half = self.slots * self.segments
        lo, hi = self.config.lr_bounds
        mlo, mhi = self.config.momentum_bounds
        a = t[:, :half].view(-1, self.slots, self.segments)
        z = t[:, half:].view(-1, self.slots, self.segments)
        return torch.exp(a).clamp(lo, hi), (mlo + (mhi - mlo) * torch.sigmoid(z)).clamp(mlo, mhi)

    def forward(self, thetas: Sequence[Sequence[float]]) -> list[float]:
        lr, mom = self.tensors(thetas)
        return self.objective.losses_values(lr, mom)

    def value_and_grad(self, theta: Sequence[float]) -> tuple[float, list[float]]:
        half = self.slots * self.segments
        t = torch.tensor(list(theta), dtype=torch.float64)
        loss, ga, gz = self.objective.value_and_grad_values(
            t[:half].view(self.slots, self.segments),
            t[half:].view(self.slots, self.segments),
            self.config.momentum_bounds,
            self.method,
            self.config.truncation,
        )
        return loss, ga.reshape(-1).tolist() + gz.reshape(-1).tolist()

    def stable(self, theta: Sequence[float], loss: float) -> bool:
        """With every lr of theta times the stability margin, does training still converge: a
        finite meta-loss within an order of magnitude of theta's own `loss`, or of the floor when
        `loss` is below it (a run that blows up in float64 can stay finite)?"""
        if self.config.stability_margin == 1.0:
            return True
        lr, mom = self.tensors([theta])
        probe = self.objective.losses_values(lr * self.config.stability_margin, mom)[0]
        return finite(probe) and probe <= 10.0 * max(loss, self.floor())

    def floor(self) -> float:
        return self.objective.zero_loss_floor


class Stopped(Exception):
    """should_stop() said stop before an evaluation; run_meta drops the iteration under way."""


class StopChecked:
    """An evaluator that asks ``should_stop()`` before each evaluation and raises Stopped when it
    says stop; otherwise it calls the evaluator it wraps, unchanged."""

    def __init__(self, inner, should_stop: Callable[[], bool]):
        self.inner, self.should_stop = inner, should_stop

    def _check(self) -> None:
        if self.should_stop():
            raise Stopped

    def forward(self, thetas: Sequence[Sequence[float]]) -> list[float]:
        self._check()
        return self.inner.forward(thetas)

    def value_and_grad(self, theta: Sequence[float]) -> tuple[float, list[float]]:
        self._check()
        return self.inner.value_and_grad(theta)

    def stable(self, theta: Sequence[float], loss: float) -> bool:
        self._check()
        return self.inner.stable(theta, loss)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)
