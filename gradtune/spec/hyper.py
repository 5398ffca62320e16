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


# A warm job of a study that left its search to the defaults: the line search, this many iterations
# (docs/benchmarks.md, "Studies (issue 14)"): it starts at settings already learned on the study's
# pool, so it needs no population and no stencil to find the region.
WARM_LINE_ITERATIONS = 3
# ... and with per-layer or scheduled values (the study's table is where its table starts): 5, of
# which constant_fraction gives the pair 2. Measured against half the rich default (7):
# benchmarks/studies.py --rich, held out closer to one 32-task job on all three families in
# 0.30-0.63x a cold job's time against 0.41-0.69x (docs/benchmarks.md, "Per-layer studies").
WARM_RICH_ITERATIONS = 5


def warm_meta(search: str, iterations: int, *, rich: bool, defaulted: bool) -> tuple[str, int]:
    """(search, iterations) of a job that starts warm from a study's learned settings. A job that
    left its search to the defaults (``defaulted``) runs the line search: WARM_LINE_ITERATIONS for
    the pair, WARM_RICH_ITERATIONS with per-layer or scheduled values; one that chose its search
    keeps it with half its iterations (warm_iterations). Either way the engine starts it without its
    population (worker/engine/study.py warm_config)."""
    if not defaulted:
        return search, warm_iterations(iterations)
    return "line", WARM_RICH_ITERATIONS if rich else WARM_LINE_ITERATIONS


# The default search (issue 13; docs/benchmarks.md, "Issue 13's targets: the default search and
# richer values"): for the constant pair the stencil search, 40 iterations (within 0.03 of the
# train-grid reference on 11 of 12 splits of 8 + 8 tasks in at most 0.44x the wall time of Optuna
# TPE-20 as users run it; the line search 10 of 12 with 3 iterations, 9 with 5, in 0.02-0.10x);
# for per-layer or scheduled values the line search, LINE_PAIR_ITERATIONS for the pair, then
# LINE_RICH_ITERATIONS (the stencil moves each of their 16-24 values alone: 5-13x the pair's time).
LINE_PAIR_ITERATIONS = 5
LINE_RICH_ITERATIONS = 8
STENCIL_ITERATIONS = 40


def default_search(rich: bool) -> str:
    """A job's meta.search when it does not say: see above."""
    return "line" if rich else "stencil"


def default_iterations(search: str, rich: bool) -> int:
    """A job's meta-iterations when it does not say: see above."""
    if search == "line":
        return LINE_PAIR_ITERATIONS + (LINE_RICH_ITERATIONS if rich else 0)
    return STENCIL_ITERATIONS


def constant_fraction(search: str, iterations: int) -> float:
    """The share of a job's iterations the constant pair may use before per-layer or scheduled values
    take over (MetaConfig.constant_fraction): half, and with the line search at most
    LINE_PAIR_ITERATIONS of them (the half-iteration margin keeps int(iterations * fraction) exact)."""
    if search == "line":
        return min(0.5, (LINE_PAIR_ITERATIONS + 0.5) / max(1, iterations))
    return 0.5
