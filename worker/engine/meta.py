"""The meta-loop: learn (lr, momentum) for torch.optim.SGD, robustly.

Parameters theta = (log lr, z), momentum = lo + (hi - lo) * sigmoid(z), both kept inside bounds.
The meta-loss L(theta) is the mean validation loss after training, over every task and every draw
in MetaConfig.draws (all runs are batched into one unroll).

Iteration 1 ("start") finds a finite starting point. With the population on (default) it evaluates,
forward only and batched, the starting lr times 10**(k/2), |k| <= 4, at the starting momentum and at
0, 0.5, 0.9, 0.99, and starts from the best. Without it, the starting point itself is used. Either way,
if training diverges there the lr is backed off (/ backoff_factor, a few times); if nothing finite
is found, EngineError. One reverse pass gives L and the hypergradient at the chosen point.

Every later iteration ("refine") builds candidates around theta at the current step h: the
hypergradient move theta - h * sign(g) (sign, because near the edge of stability the hypergradient's
magnitude is meaningless: 1e4 to 1e17 was measured), projected onto the bounds, with the log-lr
move capped; and, with the stencil on (default), the 8 neighbours theta + h * {-1, 0, 1}^2. One
batched forward pass screens them; the best, if lower than L(theta), is verified by a reverse pass
(which also gives its hypergradient) and accepted if its loss is finite and lower; then h grows,
otherwise h shrinks. A rejection at the smallest step means convergence: the remaining iterations
are recorded as "converged" without computing anything. Non-finite losses are never accepted and
a non-finite hypergradient is stored as None (the stencil still moves). The best point seen is
what best_settings returns.

Measured (docs/benchmarks.md): the population and the stencil do most of the work; near the edge
of stability, where the best settings sit, the hypergradient is dominated by chaos and is rarely
the move that wins. It wins where the loss is smooth (small learning rates, regression).

All randomness derives from the tasks' seeds and draws; the state is plain JSON, so a run split into
chunks (with a JSON round trip between them) gives the same result as one run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .errors import EngineError
from .functional import Objective
from .reference import EVAL_DRAWS
from .tasks import Task

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
    }


def state_iteration(state: dict) -> int:
    return int(state["iteration"])


def best_settings(state: dict) -> dict:
    """The best (lr, momentum) seen so far and its meta-loss (on the training draws)."""
    best = state.get("best")
    if best is None:
        lr, mom = state["start"]["lr"], state["start"]["momentum"]
        return {"lr": lr, "momentum": mom, "meta_loss": None}
    return {"lr": best["lr"], "momentum": best["momentum"], "meta_loss": best["meta_loss"]}


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
    rec.update(extra)
    return rec


class _Loop:
    def __init__(self, tasks: Sequence[Task], config: MetaConfig):
        self.config = config
        self.objective = Objective(tasks, config.draws)

    # evaluations -------------------------------------------------------------------------
    def value_and_grad(self, theta: Sequence[float]) -> tuple[float, list[float]]:
        loss, grad = self.objective.value_and_grad(theta[0], theta[1], self.config.momentum_bounds)
        return loss, list(grad)

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
        return _record(
            self.config, state, "start", True, loss, theta, evaluations=evaluations, backoffs=backoffs
        )

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

    def refine(self, state: dict) -> dict:
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
        if chosen is not None:
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
        return _record(
            self.config, state, "refine", accepted, cand_loss, chosen, evaluations=len(cands), move=move
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
    loop: _Loop | None = None
    for _ in range(todo):
        if should_stop is not None and should_stop():
            break
        state["iteration"] += 1
        if state["loss"] is not None and state["converged"]:
            rec = _record(config, state, "converged", False, None, None, evaluations=0)
        else:
            if loop is None:
                loop = _Loop(tasks, config)
            rec = loop.start(state) if state["loss"] is None else loop.refine(state)
        if on_iteration is not None:
            on_iteration(rec)
    return state


def _copy_state(state: dict) -> dict:
    return json.loads(json.dumps(state, allow_nan=False))
