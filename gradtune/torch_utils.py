"""Learned per-layer / scheduled SGD settings applied to a torch optimizer.

The client (``TunedSettings.sgd`` and ``apply_schedule``) and the engine (its reference training,
worker/engine/training.py) share these three functions, so a user's optimizer is built exactly the
way the engine trained. torch is imported on first use: ``import gradtune.torch_utils`` needs the
standard library only, and the client installs without torch.

Learned settings are ``param_groups`` (one entry per group: ``{"params": [names as
model.named_parameters() gives them], "lr": [one per segment], "momentum": [one per segment]}``)
and ``boundaries`` (the first step of each segment, starting with 0).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def segment_at(boundaries: Sequence[int], step: int) -> int:
    """Index of the schedule segment that contains `step` (0-based): the last boundary <= step."""
    return max(0, bisect.bisect_right(list(boundaries), int(step)) - 1)


def make_optimizer(model: torch.nn.Module, param_groups: Sequence[dict[str, Any]], boundaries: Sequence[int]):
    """torch.optim.SGD with one param group per entry of the learned `param_groups`, in that order;
    the values of the first segment are set. ValueError naming the parameters the model lacks."""
    import torch

    named = dict(model.named_parameters())
    groups = []
    for spec in param_groups:
        missing = [n for n in spec["params"] if n not in named]
        if missing:
            raise ValueError(f"The model has no parameters named {', '.join(missing)}.")
        params = [named[n] for n in spec["params"]]
        groups.append({"params": params, "lr": spec["lr"][0], "momentum": spec["momentum"][0]})
    opt = torch.optim.SGD(groups, lr=float(param_groups[0]["lr"][0]))
    apply_schedule(opt, param_groups, boundaries, 0)
    return opt


def apply_schedule(
    optimizer: torch.optim.Optimizer, param_groups: Sequence[dict[str, Any]], boundaries: Sequence[int], step: int
) -> None:
    """Set every optimizer param group's lr and momentum to the learned values for `step`.

    optimizer.param_groups[i] must hold the parameters listed in param_groups[i] (make_optimizer
    builds it so). Call it before optimizer.step() at every step (cheap), or at least at every
    boundary. torch.optim.SGD keeps its momentum buffers across the switches, exactly as the engine
    trained: buf = momentum * buf + grad; p = p - lr * buf, with the values of the current segment.
    """
    seg = segment_at(boundaries, step)
    for group, spec in zip(optimizer.param_groups, param_groups, strict=False):
        group["lr"] = float(spec["lr"][seg])
        group["momentum"] = float(spec["momentum"][seg])
