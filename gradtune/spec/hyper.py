"""The momentum map: momentum = lo + (hi - lo) * sigmoid(z), z kept in [-Z_LIMIT, Z_LIMIT].

The search moves (log lr, z) without bounds of their own; these two functions turn z into the
momentum a user gets and back. The engine's tensor form (torch.sigmoid) is the same formula.
"""

from __future__ import annotations

import math

Z_LIMIT = 10.0  # |momentum parameter| limit: keeps sigmoid out of saturation


def clamp(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


def momentum_to_param(momentum: float, bounds: tuple[float, float]) -> float:
    lo, hi = bounds
    u = (momentum - lo) / (hi - lo)
    u = min(max(u, 1e-12), 1.0 - 1e-12)
    return clamp(math.log(u / (1.0 - u)), -Z_LIMIT, Z_LIMIT)


def param_to_momentum(z: float, bounds: tuple[float, float]) -> float:
    lo, hi = bounds
    m = lo + (hi - lo) / (1.0 + math.exp(-z))
    return clamp(m, lo, hi)


def warm_iterations(iterations: int) -> int:
    """Meta-iterations of a job that starts warm, from a study's learned settings: half of the
    iterations asked for (rounded up). The API stores it as the job's iterations; the engine starts
    such a search without its population (worker/engine/study.py warm_config)."""
    return max(1, math.ceil(iterations / 2))
