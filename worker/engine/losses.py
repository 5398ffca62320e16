"""Validation losses as the meta-objective and the evaluation measure them, and where they stop
mattering.

Cross-entropy is computed from the logits in float64 as (max - z_y) + log1p(sum over the other
classes of exp(z_j - max)), which is logsumexp(z) - z_y written so that a confident correct
prediction keeps its small loss (about exp(-margin)) instead of rounding to exactly 0.
F.cross_entropy in float32 computes log(1 + exp(-margin)) as log of a float32 sum, which is exactly
0.0 once every margin exceeds about 16.6 nats (exp(-margin) below half of float32's epsilon): on
separable data a run with large enough weights then scores exactly 0.0, and every such run ties
with every other (measured: tests/worker/data/blobs.npz, where the meta-loss was 0.0 from the first
iteration). Training losses (the gradients) are unchanged: only the reported validation losses.

zero_loss_floor: the validation loss below which a lower one is not better, because the trained
network's predictions are already exact in its own precision (eps: the machine epsilon of the task's
dtype, 2**-23 for float32): eps nats for cross-entropy (the softmax then leaves less than eps off
the right class, on average), and eps**2 times the mean squared target for mse (residuals at the
rounding level of the targets). The search treats meta-losses both at or below the mean floor of
its tasks as tied (meta/search.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def cross_entropy_terms(logits: Tensor, target: Tensor) -> Tensor:
    """Per-example cross-entropy, float64: logits (..., C), integer targets (...)."""
    z = logits.double()
    top, arg = z.max(dim=-1, keepdim=True)
    rest = torch.exp(z - top).scatter(-1, arg, 0.0).sum(dim=-1)
    return (top - z.gather(-1, target.unsqueeze(-1))).squeeze(-1) + torch.log1p(rest)


def val_loss(kind: str, output: Tensor, target: Tensor) -> Tensor:
    """The validation loss named `kind`: cross-entropy by cross_entropy_terms (float64, mean over
    examples; output (N, C), target (N,)), mse as F.mse_loss."""
    if kind == "cross_entropy":
        return cross_entropy_terms(output, target).mean()
    return F.mse_loss(output, target)


def zero_loss_floor(kind: str, y_val: Tensor, dtype: torch.dtype = torch.float32) -> float:
    """The validation loss of a task below which a lower one does not matter (module docstring)."""
    eps = float(torch.finfo(dtype).eps)
    if kind == "cross_entropy":
        return eps
    return eps**2 * float(y_val.double().square().mean())


def mean_floor(tasks: Sequence) -> float:
    """zero_loss_floor of each task (at its features' dtype) averaged like the meta-loss: every task
    weighs the same."""
    floors = [zero_loss_floor(t.loss, t.y_val, t.x_train.dtype) for t in tasks]
    return sum(floors) / len(floors) if floors else 0.0
