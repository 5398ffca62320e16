"""FROZEN pre-refactor reference: worker/engine/meta.py as of commit 5ebbf85 (state version 1).

The tests compare the refactored worker.engine.meta package against it (same records, same
best_settings) and use it to write version-1 checkpoints that the new engine must resume.
Only the imports were changed (relative -> absolute). Do not edit; delete this file (and the tests
that load it) once a release with the refactored engine has passed.
"""

# ruff: noqa: C901
from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from worker.engine.errors import EngineError
from worker.engine.functional import METHODS, segment_boundaries
from worker.engine.reference import EVAL_DRAWS
from worker.engine.tasks import Task, derive_seed

STATE_VERSION = 1
_Z_LIMIT = 10.0  # |momentum parameter| limit: keeps sigmoid out of saturation


@dataclass
class MetaConfig:
    iterations: int = 40
    # Reserved. The loop draws nothing at random: initial weights and batch orders derive from
    # (Task.seed, draw) and the draws trained on are `draws` below.
    seed: int = 0
    lr_bounds: tuple[float, float] = (1e-5, 10.0)
    momentum_bounds: tuple[float, float] = (0.0, 0.999)
    # (task, draw) pairs the meta-objective trains on; disjoint from EVAL_DRAWS.
    draws: tuple[int, ...] = (0, 1)
    # start: population of lr multipliers 10**(k * population_lr_step), |k| <= population_lr_span,
    # times these momenta (and the starting momentum). population=False: plain start with backoff.
    population: bool = True
    population_lr_span: int = 4
    population_lr_step: float = 0.5
    population_momenta: tuple[float, ...] = (0.0, 0.5, 0.9, 0.99)
    backoff_factor: float = 10.0
    backoff_tries: int = 6
    # refine: step in theta units (natural-log lr, momentum logit)
    step_size: float = 0.5
    step_growth: float = 1.5
    step_shrink: float = 0.5
    max_step: float = 1.0
    min_step: float = 0.05
    max_log_lr_step: float = 1.0
    # screen the gradient proposal together with the 8 neighbours of theta at the current step
    # (forward only, batched), then verify the best with a reverse pass
    stencil: bool = True
    # the 4 diagonal neighbours too (8 in all); False screens only the 4 axis neighbours
    stencil_diagonals: bool = True
    # verify a winning stencil move with a reverse pass (its loss again, plus its hypergradient).
    # False accepts it on its screened forward loss (the same quantity, already computed) and
    # leaves the hypergradient unknown there, so the next iteration screens the stencil only;
    # hypergradient moves are always verified.
    verify_stencil: bool = False
    # how the constant pair is refined after the start: "stencil" (above: the sign-hypergradient
    # move screened with the 8 neighbours) or "line" (a line search along the normalised negative
    # hypergradient: the steps `line_steps` x the current step screened in one batched forward pass,
    # the best accepted if it lowers the meta-loss, then one hypergradient there; the step follows
    # the accepted one; when none improves, the next iteration screens the stencil, which shrinks
    # the step or ends the search; the job's last iteration skips that hypergradient; without a
    # finite hypergradient the iteration screens the stencil instead). "line" costs about
    # len(line_steps) + 3 forward evaluations per iteration against the stencil's 9-12. With
    # per_layer / schedule_segments the richer values are line-
    # searched the same way, all at once (4 candidates per iteration where the stencil screens
    # 2 per value plus rich_random_directions).
    search: str = "stencil"
    line_steps: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    # hypergradient method: "auto" (picks reverse or forward by memory, see choose_method),
    # "reverse" (exact, memory grows with steps), "forward" (exact, forward mode, memory independent
    # of steps, cost grows with the number of hyperparameters), "truncated" (reverse through the last
    # `truncation` steps only: biased towards short horizons, i.e. small learning rates).
    method: str = "auto"
    truncation: int = 20
    # "auto" picks reverse while its estimated graph fits this budget
    memory_budget_mb: float = 1024.0
    # richer hyperparameters, learned after the constant pair and starting from it: one (lr,
    # momentum) per Linear layer, and/or values shared over S equal blocks of the steps
    # (boundaries: functional.segment_boundaries). The constant phase gets at most
    # `iterations * constant_fraction` iterations (fewer if it converges), the rest refine these.
    per_layer: bool = False
    schedule_segments: int = 1
    constant_fraction: float = 0.5
    # richer phase: besides each value moved alone, this many random joint moves per iteration
    rich_random_directions: int = 8
    # richer phase: a move is accepted only if training still converges with every learned lr
    # multiplied by this factor: a finite meta-loss within 10x of the move's own (one more forward
    # evaluation per accepted move; 1.0 turns it off).
    # Per-layer and per-segment values can sit right at the edge of stability of the training tasks
    # and diverge on a new task of the same kind (measured: benchmarks/quality.py, teacher-illcond).
    stability_margin: float = 1.5


# The cheap search (MetaConfig(**LINE_SEARCH, iterations=3) is the "budget" row of
# benchmarks/quality.py): a 5-point start (the starting lr times 10**-2 .. 10**2 at the starting
# momentum) and line searches along the hypergradient.
LINE_SEARCH = {"search": "line", "population_momenta": (), "population_lr_step": 1.0, "population_lr_span": 2}


# --------------------------------------------------------------------------- parametrisation


def momentum_to_param(momentum: float, bounds: tuple[float, float]) -> float:
    lo, hi = bounds
    u = (momentum - lo) / (hi - lo)
    u = min(max(u, 1e-12), 1.0 - 1e-12)
    return _clamp(math.log(u / (1.0 - u)), -_Z_LIMIT, _Z_LIMIT)


def param_to_momentum(z: float, bounds: tuple[float, float]) -> float:
    lo, hi = bounds
    m = lo + (hi - lo) / (1.0 + math.exp(-z))
    return _clamp(m, lo, hi)


def _clamp(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


def _theta_bounds(config: MetaConfig) -> tuple[tuple[float, float], tuple[float, float]]:
    lo, hi = config.lr_bounds
    return (math.log(lo), math.log(hi)), (-_Z_LIMIT, _Z_LIMIT)


def _clamp_theta(config: MetaConfig, theta: Sequence[float]) -> list[float]:
    (alo, ahi), (zlo, zhi) = _theta_bounds(config)
    return [_clamp(theta[0], alo, ahi), _clamp(theta[1], zlo, zhi)]


def _settings(config: MetaConfig, theta: Sequence[float]) -> tuple[float, float]:
    lo, hi = config.lr_bounds
    return _clamp(math.exp(theta[0]), lo, hi), param_to_momentum(theta[1], config.momentum_bounds)


def _finite(*xs: float | None) -> bool:
    return all(x is not None and math.isfinite(x) for x in xs)


def _json_float(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


# --------------------------------------------------------------------------- state


def _check_config(config: MetaConfig) -> None:
    lo, hi = config.lr_bounds
    if not (0.0 < lo < hi and math.isfinite(hi)):
        raise EngineError("The learning-rate bounds must satisfy 0 < lower < upper.")
    mlo, mhi = config.momentum_bounds
    if not (0.0 <= mlo < mhi < 1.0):
        raise EngineError("The momentum bounds must satisfy 0 <= lower < upper < 1.")
    if not config.draws or set(config.draws) & set(EVAL_DRAWS):
        raise EngineError("The training draws must be non-empty and distinct from the evaluation draws.")
    if config.iterations < 1:
        raise EngineError("The number of meta-iterations must be at least 1.")
    if config.search not in ("stencil", "line"):
        raise EngineError("The search must be 'stencil' or 'line'.")
    if not config.line_steps or min(config.line_steps) <= 0:
        raise EngineError("The line-search steps must be positive.")
    if config.method not in ("auto", *METHODS):
        raise EngineError(f"The hypergradient method must be one of auto, {', '.join(METHODS)}.")
    if int(config.truncation) < 1:
        raise EngineError("The truncation window must be at least one step.")
    if int(config.schedule_segments) < 1:
        raise EngineError("The number of schedule segments must be at least 1.")
    if not config.memory_budget_mb > 0:
        raise EngineError("The memory budget must be positive.")
    if not (math.isfinite(config.stability_margin) and config.stability_margin >= 1.0):
        raise EngineError("The stability margin must be a number of at least 1.")
    if not 0.0 < config.constant_fraction <= 1.0:
        raise EngineError("The constant fraction must lie in (0, 1].")


def init_state(config: MetaConfig, lr: float, momentum: float) -> dict:
    """A fresh, JSON-serializable meta-state starting from (lr, momentum), clamped to the bounds."""
    _check_config(config)
    if not (math.isfinite(lr) and lr > 0.0):
        raise EngineError("The starting learning rate must be a positive number.")
    if not math.isfinite(momentum):
        raise EngineError("The starting momentum must be a number.")
    theta = _clamp_theta(config, [math.log(lr), momentum_to_param(momentum, config.momentum_bounds)])
    lr0, mom0 = _settings(config, theta)
    return {
        "version": STATE_VERSION,
        "iteration": 0,
        "start": {"lr": lr0, "momentum": mom0},
        "theta": theta,
        "loss": None,
        "grad": None,
        "step": float(config.step_size),
        "converged": False,
        "best": None,
        "hyper": {"per_layer": bool(config.per_layer), "segments": int(config.schedule_segments)},
    }


def state_iteration(state: dict) -> int:
    return int(state["iteration"])


def best_settings(state: dict) -> dict:
    """The best (lr, momentum) seen so far and its meta-loss (on the training draws).

    With per_layer or schedule_segments > 1 (once run_meta has seen the tasks) it adds
    "param_groups": [{"params": [names as nn.Sequential's named_parameters()], "lr": [one per
    segment], "momentum": [one per segment]}, ...] (one group per Linear layer with per_layer, else
    a single group of every parameter), "boundaries": the step where each segment starts, and
    "meta_loss_groups": their meta-loss. Before the richer phase starts they hold the best constant
    pair. Apply them with reference.make_optimizer / apply_schedule (train_sgd_groups is the recipe).
    """
    best = state.get("best")
    if best is None:
        lr, mom = state["start"]["lr"], state["start"]["momentum"]
        out = {"lr": lr, "momentum": mom, "meta_loss": None}
    else:
        out = {"lr": best["lr"], "momentum": best["momentum"], "meta_loss": best["meta_loss"]}
    hyper, layout = state.get("hyper"), state.get("layout")
    if hyper and layout and _rich_enabled(hyper):
        rich = state.get("rich")
        if rich and rich.get("best"):
            lrs, moms, loss = rich["best"]["lrs"], rich["best"]["momenta"], rich["best"]["meta_loss"]
        else:  # the richer phase has not started: the constant pair, in the richer form
            slots, segs = layout["slots"], len(layout["boundaries"])
            lrs = [[out["lr"]] * segs for _ in range(slots)]
            moms = [[out["momentum"]] * segs for _ in range(slots)]
            loss = out["meta_loss"]
        out["param_groups"] = [
            {"params": list(names), "lr": list(lrs[i]), "momentum": list(moms[i])}
            for i, names in enumerate(layout["groups"])
        ]
        out["boundaries"] = list(layout["boundaries"])
        out["meta_loss_groups"] = loss
    return out


def _rich_enabled(hyper: dict | MetaConfig) -> bool:
    if isinstance(hyper, MetaConfig):
        return bool(hyper.per_layer) or int(hyper.schedule_segments) > 1
    return bool(hyper.get("per_layer")) or int(hyper.get("segments", 1)) > 1


def _layout(tasks: Sequence[Task], config: MetaConfig) -> dict:
    """Parameter groups (names as nn.Sequential's named_parameters()) and segment boundaries."""
    from worker.engine.modules import param_layout  # MLP Tasks and any-module ModuleTasks alike

    layouts = [param_layout(t) for t in tasks]
    steps = {t.steps for t in tasks}
    if config.per_layer and any(lay != layouts[0] for lay in layouts[1:]):
        raise EngineError("Per-layer settings need every task to have the same number of layers.")
    segs = int(config.schedule_segments)
    if segs > 1 and len(steps) > 1:
        raise EngineError("A learned schedule needs every task to train for the same number of steps.")
    n_steps = min(steps)
    if segs > n_steps:
        raise EngineError(f"The number of schedule segments ({segs}) cannot exceed the number of steps ({n_steps}).")
    names = max(layouts, key=len)
    if config.per_layer:
        groups = [list(g) for g in names]
    else:
        groups = [[n for g in names for n in g]]
    return {"groups": groups, "slots": len(groups), "boundaries": segment_boundaries(n_steps, segs)}


_BYTES_PER_MB = 1024.0 * 1024.0


def estimate_costs(tasks: Sequence[Task], config: MetaConfig) -> dict:
    """Memory (MB) of one hypergradient by method, for the job's shapes, steps and hyperparameters.

    reverse keeps, per step and run, about 1.5 x the parameters and 2 x every layer's activations
    for the batch (measured with saved-tensor hooks on MLPs: within 10 %); forward keeps, per
    hyperparameter and run, tangents of the weights and buffers plus one step's activations;
    truncated keeps `truncation` steps of reverse.
    """
    from worker.engine.modules import cost_terms, param_layout  # MLP Tasks and any-module ModuleTasks alike

    segs = int(config.schedule_segments)
    slots = max(len(param_layout(t)) for t in tasks) if config.per_layer else 1
    n_hyper = 2 * slots * segs if _rich_enabled(config) else 2
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


# --------------------------------------------------------------------------- iterations


def _record(
    config: MetaConfig, state: dict, phase: str, accepted: bool, candidate_loss, candidate_theta, **extra
) -> dict:
    """The JSON-serializable progress record of one iteration (non-finite floats as None)."""
    lr, mom = _settings(config, state["theta"])
    grad = state["grad"] or [None, None]
    rec = {
        "iteration": state["iteration"],
        "phase": phase,
        "meta_loss": _json_float(state["loss"]),
        "lr": lr,
        "momentum": mom,
        "accepted": bool(accepted),
        "step_size": float(state["step"]),
        "hypergradient": [_json_float(g) for g in grad],
        "candidate_loss": _json_float(candidate_loss),
        "candidate_lr": None,
        "candidate_momentum": None,
        "best_meta_loss": _json_float(state["best"]["meta_loss"]) if state["best"] else None,
        "best_lr": state["best"]["lr"] if state["best"] else None,
        "best_momentum": state["best"]["momentum"] if state["best"] else None,
    }
    if candidate_theta is not None:
        rec["candidate_lr"], rec["candidate_momentum"] = _settings(config, candidate_theta)
    if state.get("method"):
        rec["method"] = state["method"]
    rec.update(extra)
    return rec


def _rich_record(config: MetaConfig, state: dict, phase: str, accepted: bool, candidate_loss, **extra) -> dict:
    """Record of a richer-phase iteration: meta_loss is the richer loss; lr/momentum stay the best
    constant pair; group_lr / group_momentum are the current [slot][segment] values."""
    rich = state["rich"]
    const = state["best"]
    lrs, moms = _rich_values(config, rich["theta"], rich["slots"], rich["segments"])
    grad = rich["grad"] or [None] * len(rich["theta"])
    rec = {
        "iteration": state["iteration"],
        "phase": phase,
        "meta_loss": _json_float(rich["loss"]),
        "lr": const["lr"],
        "momentum": const["momentum"],
        "accepted": bool(accepted),
        "step_size": float(rich["step"]),
        "hypergradient": [_json_float(g) for g in grad],
        "candidate_loss": _json_float(candidate_loss),
        "candidate_lr": None,
        "candidate_momentum": None,
        "best_meta_loss": _json_float(const["meta_loss"]),
        "best_lr": const["lr"],
        "best_momentum": const["momentum"],
        "group_lr": lrs,
        "group_momentum": moms,
        "meta_loss_groups": _json_float(rich["best"]["meta_loss"]) if rich.get("best") else None,
        "method": state.get("method"),
    }
    rec.update(extra)
    return rec


def _rich_values(config: MetaConfig, theta: Sequence[float], slots: int, segs: int):
    """Flat theta [log lr (slot-major), momentum params] -> ([[lr]*segs]*slots, [[mom]...])."""
    half = slots * segs
    lo, hi = config.lr_bounds
    lrs = [[_clamp(math.exp(theta[i * segs + j]), lo, hi) for j in range(segs)] for i in range(slots)]
    moms = [
        [param_to_momentum(theta[half + i * segs + j], config.momentum_bounds) for j in range(segs)]
        for i in range(slots)
    ]
    return lrs, moms


def _clamp_rich(config: MetaConfig, theta: Sequence[float]) -> list[float]:
    (alo, ahi), (zlo, zhi) = _theta_bounds(config)
    half = len(theta) // 2
    return [_clamp(float(x), alo, ahi) if i < half else _clamp(float(x), zlo, zhi) for i, x in enumerate(theta)]


def _line_candidates(
    config: MetaConfig, theta: Sequence[float], grad: Sequence[float] | None, h: float
) -> tuple[list[list[float]], list[float]] | None:
    """The points of a line search from theta along the normalised negative gradient, at h times
    each of config.line_steps, clamped to the bounds, with their step lengths. None when there is
    no usable direction: a non-finite gradient, or zero once the components that would push further
    out through a bound are dropped. theta is the constant pair (log lr, momentum logit) or a richer
    table (every log lr, then every logit): both are clamped by _clamp_rich."""
    if grad is None or not _finite(*grad):
        return None
    (alo, ahi), (zlo, zhi) = _theta_bounds(config)
    half = len(theta) // 2
    d = [-float(x) for x in grad]
    for i, x in enumerate(theta):
        lo, hi = (alo, ahi) if i < half else (zlo, zhi)
        if (x <= lo and d[i] < 0) or (x >= hi and d[i] > 0):
            d[i] = 0.0
    norm = math.sqrt(sum(x * x for x in d))
    if norm == 0.0:
        return None
    d = [x / norm for x in d]
    cands: list[list[float]] = []
    steps: list[float] = []
    for t in config.line_steps:
        c = _clamp_rich(config, [x + h * t * di for x, di in zip(theta, d)])
        if c != list(theta) and c not in cands:
            cands.append(c)
            steps.append(h * t)
    return cands, steps


class _Loop:
    def __init__(self, tasks: Sequence[Task], config: MetaConfig, method: str):
        self.config = config
        from worker.engine.modules import make_objective  # functional.Objective for MLP Tasks, else ModuleObjective

        self.method = method
        self.objective = make_objective(tasks, config.draws)

    # evaluations -------------------------------------------------------------------------
    def value_and_grad(self, theta: Sequence[float]) -> tuple[float, list[float]]:
        loss, grad = self.objective.value_and_grad(
            theta[0], theta[1], self.config.momentum_bounds, self.method, self.config.truncation
        )
        return loss, list(grad)

    def rich_tensors(self, thetas: Sequence[Sequence[float]], slots: int, segs: int):
        t = torch.tensor([list(th) for th in thetas], dtype=torch.float64)
        half = slots * segs
        lo, hi = self.config.lr_bounds
        mlo, mhi = self.config.momentum_bounds
        a, z = t[:, :half].view(-1, slots, segs), t[:, half:].view(-1, slots, segs)
        return torch.exp(a).clamp(lo, hi), (mlo + (mhi - mlo) * torch.sigmoid(z)).clamp(mlo, mhi)

    def rich_forward(self, thetas, slots: int, segs: int) -> list[float]:
        lr, mom = self.rich_tensors(thetas, slots, segs)
        return self.objective.losses_values(lr, mom)

    def rich_stable(self, theta, loss: float, slots: int, segs: int) -> bool:
        """With every lr of theta times the stability margin, does training still converge: a
        finite meta-loss within an order of magnitude of theta's own `loss` (a run that blows up
        in float64 can stay finite)?"""
        if self.config.stability_margin == 1.0:
            return True
        lr, mom = self.rich_tensors([theta], slots, segs)
        probe = self.objective.losses_values(lr * self.config.stability_margin, mom)[0]
        return _finite(probe) and probe <= 10.0 * loss

    def rich_pick(self, cands, losses, current: float, slots: int, segs: int):
        """The best candidate that lowers `current` and passes the stability probe (the two best
        improving ones are probed, in order). Returns (index or None, the lowest finite loss or
        None, probes run, probes failed)."""
        finite = sorted((l, i) for i, l in enumerate(losses) if _finite(l))
        probes = rejected = 0
        for loss_i, i in [f for f in finite if f[0] < current][:2]:
            probes += 1
            if self.rich_stable(cands[i], loss_i, slots, segs):
                return i, loss_i, probes, rejected
            rejected += 1
        return None, finite[0][0] if finite else None, probes, rejected

    def rich_value_and_grad(self, theta, slots: int, segs: int) -> tuple[float, list[float]]:
        half = slots * segs
        t = torch.tensor(list(theta), dtype=torch.float64)
        loss, ga, gz = self.objective.value_and_grad_values(
            t[:half].view(slots, segs),
            t[half:].view(slots, segs),
            self.config.momentum_bounds,
            self.method,
            self.config.truncation,
        )
        return loss, ga.reshape(-1).tolist() + gz.reshape(-1).tolist()

    def forward(self, thetas: Sequence[Sequence[float]]) -> list[float]:
        pairs = [_settings(self.config, th) for th in thetas]
        return self.objective.losses([p[0] for p in pairs], [p[1] for p in pairs])

    # bookkeeping -------------------------------------------------------------------------
    def note_best(self, state: dict, theta: Sequence[float], loss: float) -> None:
        if not _finite(loss):
            return
        best = state["best"]
        if best is None or loss < best["meta_loss"]:
            lr, mom = _settings(self.config, theta)
            state["best"] = {
                "lr": lr,
                "momentum": mom,
                "meta_loss": float(loss),
                "theta": [float(theta[0]), float(theta[1])],
                "iteration": state["iteration"],
            }

    # phase 1 -----------------------------------------------------------------------------
    def population(self, theta0: Sequence[float]) -> list[list[float]]:
        cfg = self.config
        ln10 = math.log(10.0)
        ks = range(-cfg.population_lr_span, cfg.population_lr_span + 1)
        zs = [theta0[1]] + [momentum_to_param(m, cfg.momentum_bounds) for m in cfg.population_momenta]
        cands: list[list[float]] = []
        for z in zs:
            for k in ks:
                th = _clamp_theta(cfg, [theta0[0] + k * cfg.population_lr_step * ln10, z])
                if th not in cands:
                    cands.append(th)
        return cands

    def start(self, state: dict) -> dict:
        cfg = self.config
        theta0 = list(state["theta"])
        evaluations = 0
        if cfg.population:
            cands = self.population(theta0)
            losses = self.forward(cands)
            evaluations += len(cands)
            ranked = [cands[i] for _, i in sorted((l, i) for i, l in enumerate(losses) if _finite(l))]
            lowest = min(c[0] for c in cands)
        else:
            ranked, lowest = [theta0], theta0[0]
        chosen = None
        for theta in ranked[:3]:
            loss, grad = self.value_and_grad(theta)
            evaluations += 1
            if _finite(loss):
                chosen = (theta, loss, grad)
                break
        backoffs = 0
        a, a_min = lowest, math.log(cfg.lr_bounds[0])
        while chosen is None and backoffs < cfg.backoff_tries and a > a_min:
            a = max(a - math.log(cfg.backoff_factor), a_min)
            backoffs += 1
            theta = _clamp_theta(cfg, [a, theta0[1]])
            loss, grad = self.value_and_grad(theta)
            evaluations += 1
            if _finite(loss):
                chosen = (theta, loss, grad)
        if chosen is None:
            raise EngineError(
                "Training diverged (the loss became infinite or NaN) at every learning rate tried, "
                f"down to {math.exp(a):.3g}. Check the data for missing or extreme values, scale "
                "the features, or start from a smaller learning rate."
            )
        theta, loss, grad = chosen
        self.accept(state, theta, loss, grad)
        self.note_best(state, theta, loss)
        return _record(self.config, state, "start", True, loss, theta, evaluations=evaluations, backoffs=backoffs)

    def accept(self, state: dict, theta: Sequence[float], loss: float, grad: Sequence[float]) -> None:
        state["theta"] = [float(theta[0]), float(theta[1])]
        state["loss"] = float(loss)
        state["grad"] = [float(g) for g in grad] if _finite(*grad) else None

    # phase 2 -----------------------------------------------------------------------------
    def direction(self, state: dict) -> list[float] | None:
        cfg = self.config
        g = state["grad"]
        if g is None or not _finite(*g):
            return None
        (alo, ahi), (zlo, zhi) = _theta_bounds(cfg)
        theta = state["theta"]
        d = [0.0 if gi == 0.0 else math.copysign(1.0, gi) for gi in g]
        # project: drop components that would push further out through a bound
        if (theta[0] <= alo and d[0] > 0) or (theta[0] >= ahi and d[0] < 0):
            d[0] = 0.0
        if (theta[1] <= zlo and d[1] > 0) or (theta[1] >= zhi and d[1] < 0):
            d[1] = 0.0
        if d == [0.0, 0.0]:
            return None
        return d

    def propose(self, state: dict, d: Sequence[float], step: float) -> list[float]:
        cfg = self.config
        theta = state["theta"]
        da = _clamp(step * d[0], -cfg.max_log_lr_step, cfg.max_log_lr_step)
        return _clamp_theta(cfg, [theta[0] - da, theta[1] - step * d[1]])

    def line_refine(self, state: dict) -> dict:
        cfg = self.config
        if state.pop("screen_next", False):
            return self.stencil_refine(state)
        theta, h = state["theta"], state["step"]
        evaluations = 0
        if state["grad"] is None:  # a state left by the stencil search or a final line move: gradient first
            loss, grad = self.value_and_grad(theta)
            evaluations += 1
            if _finite(loss, *grad):  # the loss there is known already (the same, up to rounding)
                state["grad"] = [float(x) for x in grad]
        line = _line_candidates(cfg, theta, state["grad"], h)
        if line is None:  # no usable hypergradient (non-finite, or zero within the bounds): the stencil
            return self.stencil_refine(state)
        cands, steps = line
        losses = self.forward(cands) if cands else []
        evaluations += len(cands)
        finite = sorted((l, i) for i, l in enumerate(losses) if _finite(l))
        accepted, chosen, cand_loss = False, None, finite[0][0] if finite else None
        if finite and finite[0][0] < state["loss"]:
            screened, i = finite[0]
            chosen = cands[i]
            if state["iteration"] >= cfg.iterations:
                # the job's last iteration: no next direction is needed, so the move is accepted on
                # its screened loss (the same full-training loss) without a hypergradient pass; a
                # resumed state with more iterations takes the hypergradient first (above)
                loss, grad = screened, [math.nan, math.nan]
            else:
                loss, grad = self.value_and_grad(chosen)
                evaluations += 1
            cand_loss = loss
            self.note_best(state, chosen, loss)
            if _finite(loss) and loss < state["loss"]:
                self.accept(state, chosen, loss, grad)
                accepted = True
                state["step"] = min(steps[i], cfg.max_step)
        if not accepted:
            # the hypergradient's direction did not pay at any step (near the edge of stability its
            # sign says little about a finite step): the next iteration screens the stencil, which
            # shrinks the step or ends the search if nothing around the point is better either
            state["screen_next"] = True
        return _record(cfg, state, "refine", accepted, cand_loss, chosen, evaluations=evaluations, move="line")

    def refine(self, state: dict) -> dict:
        return self.line_refine(state) if self.config.search == "line" else self.stencil_refine(state)

    def stencil_refine(self, state: dict) -> dict:
        cfg = self.config
        theta, h = state["theta"], state["step"]
        cands: list[list[float]] = []
        d = self.direction(state)
        gradient_move = None
        if d is not None:
            c = self.propose(state, d, h)
            if c != theta:
                cands.append(c)
                gradient_move = c
        if cfg.stencil or d is None:
            for da in (-h, 0.0, h):
                for dz in (-h, 0.0, h):
                    if da and dz and not cfg.stencil_diagonals:
                        continue
                    c = _clamp_theta(cfg, [theta[0] + da, theta[1] + dz])
                    if c != theta and c not in cands:
                        cands.append(c)
        if not cands:  # pinned in a corner of the bounds with nothing to try
            state["converged"] = True
            return _record(self.config, state, "refine", False, None, None, evaluations=0)
        if len(cands) == 1:
            chosen, screened = cands[0], None
        else:
            losses = self.forward(cands)
            finite = [(l, i) for i, l in enumerate(losses) if _finite(l)]
            if finite and min(finite)[0] < state["loss"]:
                screened, i = min(finite)
                chosen = cands[i]
            else:
                chosen, screened = None, min(finite)[0] if finite else None
        accepted = False
        cand_loss = screened
        unverified = cfg.stencil and not cfg.verify_stencil  # stencil off: its moves are fallbacks
        if chosen is not None and screened is not None and chosen != gradient_move and unverified:
            self.note_best(state, chosen, screened)
            state["theta"] = [float(chosen[0]), float(chosen[1])]
            state["loss"] = float(screened)
            state["grad"] = None
            accepted = True
        elif chosen is not None:
            loss, grad = self.value_and_grad(chosen)
            cand_loss = loss
            self.note_best(state, chosen, loss)
            if _finite(loss) and loss < state["loss"]:
                self.accept(state, chosen, loss, grad)
                accepted = True
        if accepted:
            state["step"] = min(h * cfg.step_growth, cfg.max_step)
        elif h <= cfg.min_step:
            state["converged"] = True
        else:
            state["step"] = max(h * cfg.step_shrink, cfg.min_step)
        move = None if chosen is None else ("gradient" if chosen == gradient_move else "stencil")
        return _record(self.config, state, "refine", accepted, cand_loss, chosen, evaluations=len(cands), move=move)

    # phase 3: per-layer / scheduled values, from the best constant pair ----------------------
    def rich_start(self, state: dict) -> dict:
        layout = state["layout"]
        slots, segs = layout["slots"], len(layout["boundaries"])
        const = state["best"]["theta"]
        theta = [const[0]] * (slots * segs) + [const[1]] * (slots * segs)
        loss, grad = self.rich_value_and_grad(theta, slots, segs)
        state["rich"] = {
            "slots": slots,
            "segments": segs,
            "theta": theta,
            "loss": float(loss) if _finite(loss) else state["best"]["meta_loss"],
            "grad": [float(g) for g in grad] if _finite(*grad) else None,
            "step": float(self.config.step_size),
            "converged": False,
            "best": None,
        }
        self.note_rich_best(state, theta, state["rich"]["loss"])
        return _rich_record(self.config, state, "rich_start", True, loss, evaluations=1)

    def note_rich_best(self, state: dict, theta, loss: float) -> None:
        rich = state["rich"]
        if not _finite(loss) or (rich["best"] is not None and loss >= rich["best"]["meta_loss"]):
            return
        lrs, moms = _rich_values(self.config, theta, rich["slots"], rich["segments"])
        rich["best"] = {
            "theta": [float(x) for x in theta],
            "lrs": lrs,
            "momenta": moms,
            "meta_loss": float(loss),
            "iteration": state["iteration"],
        }

    def rich_step(self, state: dict) -> dict:
        return self.rich_line(state) if self.config.search == "line" else self.rich_refine(state)

    def rich_line(self, state: dict) -> dict:
        """search="line" for the richer values: the line search of line_refine along the normalised
        negative hypergradient of all of them at once (4 candidates per iteration where the stencil
        screens two per value plus the random joint moves), each accepted move checked against the
        stability margin; a line that finds nothing lower, or no finite hypergradient, hands the next
        iteration (or this one) to rich_refine."""
        cfg = self.config
        rich = state["rich"]
        if rich.pop("screen_next", False):
            return self.rich_refine(state)
        slots, segs = rich["slots"], rich["segments"]
        theta, h = rich["theta"], rich["step"]
        evaluations = 0
        if rich["grad"] is None:  # after a stencil move or a final line move: the hypergradient first
            _, grad = self.rich_value_and_grad(theta, slots, segs)
            evaluations += 1
            if _finite(*grad):
                rich["grad"] = [float(x) for x in grad]
        line = _line_candidates(cfg, theta, rich["grad"], h)
        if line is None:
            return self.rich_refine(state)
        cands, steps = line
        losses = self.rich_forward(cands, slots, segs) if cands else []
        i, cand_loss, probes, margin_rejected = self.rich_pick(cands, losses, rich["loss"], slots, segs)
        evaluations += len(cands) + probes
        accepted, chosen = False, None if i is None else cands[i]
        if chosen is not None:
            if state["iteration"] >= cfg.iterations:  # the job's last iteration: no next direction
                loss, grad = cand_loss, None
            else:
                loss, grad = self.rich_value_and_grad(chosen, slots, segs)
                evaluations += 1
                cand_loss = loss
            self.note_rich_best(state, chosen, loss)
            if _finite(loss) and loss < rich["loss"]:
                rich["theta"] = [float(x) for x in chosen]
                rich["loss"] = float(loss)
                rich["grad"] = [float(x) for x in grad] if grad is not None and _finite(*grad) else None
                rich["step"] = min(steps[i], cfg.max_step)
                accepted = True
        if not accepted:
            rich["screen_next"] = True
        return _rich_record(
            cfg,
            state,
            "rich_refine",
            accepted,
            cand_loss,
            evaluations=evaluations,
            move="line",
            margin_rejected=margin_rejected,
        )

    def rich_refine(self, state: dict) -> dict:
        cfg = self.config
        rich = state["rich"]
        slots, segs = rich["slots"], rich["segments"]
        theta, h = rich["theta"], rich["step"]
        n = len(theta)
        half = n // 2
        (alo, ahi), (zlo, zhi) = _theta_bounds(cfg)
        cands: list[list[float]] = []
        gradient_move = None
        g = rich["grad"]
        if g is not None and _finite(*g):
            move = []
            for i, (x, gi) in enumerate(zip(theta, g)):
                d = 0.0 if gi == 0.0 else math.copysign(1.0, gi)
                step = _clamp(h * d, -cfg.max_log_lr_step, cfg.max_log_lr_step) if i < half else h * d
                move.append(x - step)
            c = _clamp_rich(cfg, move)
            if c != theta:
                cands.append(c)
                gradient_move = c
        # coordinate stencil: each value alone, up and down by the step
        for i in range(n):
            for sign in (-1.0, 1.0):
                c = list(theta)
                c[i] += sign * h
                c = _clamp_rich(cfg, c)
                if c != theta and c not in cands:
                    cands.append(c)
        # joint moves: random +-h on every value at once (deterministic from the iteration, so a
        # resumed run makes the same moves); single-coordinate moves miss trade-offs between layers
        rng = random.Random(derive_seed("rich", state["iteration"]))
        for _ in range(cfg.rich_random_directions):
            c = _clamp_rich(cfg, [x + h * rng.choice((-1.0, 1.0)) for x in theta])
            if c != theta and c not in cands:
                cands.append(c)
        losses = self.rich_forward(cands, slots, segs) if cands else []
        i, cand_loss, probes, margin_rejected = self.rich_pick(cands, losses, rich["loss"], slots, segs)
        evaluations = len(cands) + probes
        accepted, chosen = False, None if i is None else cands[i]
        if chosen is not None:
            loss, grad = self.rich_value_and_grad(chosen, slots, segs)
            cand_loss = loss
            self.note_rich_best(state, chosen, loss)
            if _finite(loss) and loss < rich["loss"]:
                rich["theta"] = [float(x) for x in chosen]
                rich["loss"] = float(loss)
                rich["grad"] = [float(x) for x in grad] if _finite(*grad) else None
                accepted = True
        if accepted:
            rich["step"] = min(h * cfg.step_growth, cfg.max_step)
        elif h <= cfg.min_step or not cands:
            rich["converged"] = True
        else:
            rich["step"] = max(h * cfg.step_shrink, cfg.min_step)
        move = None if chosen is None else ("gradient" if chosen == gradient_move else "stencil")
        return _rich_record(
            cfg,
            state,
            "rich_refine",
            accepted,
            cand_loss,
            evaluations=evaluations,
            move=move,
            margin_rejected=margin_rejected,
        )


def run_meta(
    tasks: Sequence[Task],
    config: MetaConfig,
    state: dict,
    max_iterations: int,
    on_iteration: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict:
    """Run at most max_iterations more meta-iterations (never past config.iterations).

    Returns the new state (a new dict; the argument is not modified). on_iteration(record) is called
    after each iteration; should_stop() is checked before each one.
    """
    _check_config(config)
    if state.get("version") != STATE_VERSION:
        raise EngineError("This meta-state was written by an incompatible version of the engine.")
    state = _copy_state(state)
    todo = min(int(max_iterations), config.iterations - state_iteration(state))
    if todo <= 0:
        return state
    rich = _rich_enabled(config)
    if rich:
        state["layout"] = _layout(tasks, config)
    if not state.get("method"):
        state["method"], state["method_reason"] = choose_method(tasks, config)
    constant_budget = max(1, int(config.iterations * config.constant_fraction)) if rich else config.iterations
    loop: _Loop | None = None
    for _ in range(todo):
        if should_stop is not None and should_stop():
            break
        state["iteration"] += 1
        started = state["loss"] is not None
        if rich and started and (state["converged"] or state["iteration"] > constant_budget):
            if state.get("rich") is not None and state["rich"]["converged"]:
                rec = _rich_record(config, state, "converged", False, None, evaluations=0)
            else:
                if loop is None:
                    loop = _Loop(tasks, config, state["method"])
                rec = loop.rich_start(state) if state.get("rich") is None else loop.rich_step(state)
        elif started and state["converged"]:
            rec = _record(config, state, "converged", False, None, None, evaluations=0)
        else:
            if loop is None:
                loop = _Loop(tasks, config, state["method"])
            rec = loop.start(state) if not started else loop.refine(state)
        if on_iteration is not None:
            on_iteration(rec)
    return state


def _copy_state(state: dict) -> dict:
    return json.loads(json.dumps(state, allow_nan=False))
