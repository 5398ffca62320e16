"""Memory of one hypergradient by method, and the method "auto" picks (moved from meta.py as they were)."""

from __future__ import annotations

from collections.abc import Sequence

from ..tasks import Task
from .config import MetaConfig, rich_enabled

_BYTES_PER_MB = 1024.0 * 1024.0


def estimate_costs(tasks: Sequence[Task], config: MetaConfig) -> dict:
    """Memory (MB) of one hypergradient by method, for the job's shapes, steps and hyperparameters.

    reverse keeps, per step and run, about 1.5 x the parameters and 2 x every layer's activations
    for the batch (measured with saved-tensor hooks on MLPs: within 10 %); forward keeps, per
    hyperparameter and run, tangents of the weights and buffers plus one step's activations;
    truncated keeps `truncation` steps of reverse.
    """
    from ..modules import cost_terms, param_layout  # MLP Tasks and any-module ModuleTasks alike

    segs = int(config.schedule_segments)
    slots = max(len(param_layout(t)) for t in tasks) if config.per_layer else 1
    n_hyper = 2 * slots * segs if rich_enabled(config) else 2
    runs = len(config.draws)
    per_step = 0.0
    steps = 0
    tangent = 0.0
    for t in tasks:
        n_params, per_example = cost_terms(t)
        acts = t.batch_size * per_example
        item = t.x_train.element_size()
        per_step += runs * item * (1.5 * n_params + acts)
        tangent += runs * item * (n_hyper * (4 * n_params + acts) + 3 * n_params)
        steps = max(steps, t.steps)
    w = min(int(config.truncation), steps)
    return {
        "hyperparameters": n_hyper,
        "steps": steps,
        "reverse_mb": per_step * steps / _BYTES_PER_MB,
        "forward_mb": tangent / _BYTES_PER_MB,
        "truncated_mb": per_step * w / _BYTES_PER_MB,
    }


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
