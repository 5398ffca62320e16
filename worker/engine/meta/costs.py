"""Memory of one hypergradient by method (the spec's cost model, via plan.py), and the method "auto" picks."""

from __future__ import annotations

from collections.abc import Sequence

from ..tasks import Task
from .config import MetaConfig


def estimate_costs(tasks: Sequence[Task], config: MetaConfig) -> dict:
    """Memory (MB) of one hypergradient by method, for the job's shapes, steps and hyperparameters:
    the spec's cost model (gradtune.spec.costs, through plan.estimate), the same one the API admits
    jobs with. Keys: hyperparameters, steps, reverse_mb, forward_mb, truncated_mb (and the whole
    job's method, peak_mb, data_mb, flops, parts)."""
    from ..plan import estimate

    return estimate(tasks, config)


def choose_method(tasks: Sequence[Task], config: MetaConfig) -> tuple[str, str]:
    """(method, reason). A requested method is used as is; "auto" picks reverse when its graph fits
    config.memory_budget_mb, else forward (exact, memory independent of the steps) when its tangents
    fit, else truncated. Compute, in units of one training unroll (measured on small MLPs,
    docs/benchmarks.md): reverse about 3 whatever the number H of hyperparameters, forward about
    1 + H; they tie at H = 2 (the constant pair), where reverse is kept."""
    c = estimate_costs(tasks, config)
    budget = float(config.memory_budget_mb)
    if config.method != "auto":
        return config.method, f"requested; estimated memory {c[config.method + '_mb']:.1f} MB"
    head = f"{c['steps']} steps, {c['hyperparameters']} hyperparameters: "
    h = c["hyperparameters"]
    if c["reverse_mb"] <= budget:
        return "reverse", head + (
            f"reverse needs about {c['reverse_mb']:.1f} MB (budget {budget:g} MB) and about 3 "
            f"training unrolls of compute, forward about {1 + h}"
        )
    if c["forward_mb"] <= budget:
        return "forward", head + (
            f"reverse would need about {c['reverse_mb']:.1f} MB, over the {budget:g} MB budget; "
            f"forward is exact in about {c['forward_mb']:.1f} MB whatever the number of steps "
            f"(about {1 + h} training unrolls of compute)"
        )
    return "truncated", head + (
        f"reverse ({c['reverse_mb']:.1f} MB) and forward ({c['forward_mb']:.1f} MB) exceed the "
        f"{budget:g} MB budget; truncated to the last {config.truncation} steps "
        f"({c['truncated_mb']:.1f} MB), which biases the learning rate downwards"
    )
