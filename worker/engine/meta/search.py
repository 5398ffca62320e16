"""The one search: refine a (slots x segments) table of (lr, momentum) around its current point.

The constant pair is the 1 x 1 table; the per-layer / scheduled values are the larger tables. Every
iteration builds candidates (the sign-hypergradient move, a stencil of neighbours, random joint
moves, or points along a line), screens them in one batched forward pass, accepts the best if it
lowers the meta-loss, records the iteration and keeps the best point seen. What differs between
the two phases is a Policy, fixed per phase (constant_policy, table_policy):

- the stencil: every neighbour in {-h, 0, h}^n (the constant pair's 8, or 4 without diagonals)
  or each value alone moved up and down (tables), plus random joint moves (tables);
- whether a winning stencil move is accepted on its screened loss (constant pair, unless
  verify_stencil) or verified with a hypergradient pass (tables);
- whether accepted moves must pass the stability-margin probe (tables);
- whether a lone candidate is screened before it is verified (tables) or verified at once;
- what the records carry (tables: their values as group_lr / group_momentum, the best constant
  pair as lr / momentum).

Candidates keep the order in which they are built; ties between equal losses go to the first.

Meta-losses at or below the evaluator's floor (losses.zero_loss_floor: the validation loss below
which the trained networks' float32 predictions are already exact) are ties: none of them is lower
than another, so a move from one to another is not an improvement (the incumbent stays), and among
candidates that all reach the floor the safest wins: the smallest effective learning rate
lr / (1 - momentum) (the largest in the table). Without this, cross-entropy on separable data,
which keeps falling as the margins grow, rewards the most aggressive settings that happen not to
diverge on the training draws: the edge of stability (tests/worker/test_blobs_regression.py).
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from gradtune.spec.hyper import Z_LIMIT, clamp, param_to_momentum

from ..tasks import derive_seed
from .config import MetaConfig
from .state import Best, MetaState, SearchState

# --------------------------------------------------------------------------- values


def finite(*xs: float | None) -> bool:
    return all(x is not None and math.isfinite(x) for x in xs)


def lower(a: float, b: float, floor: float) -> bool:
    """a counts as lower than b: a < b, unless both are at or below the floor (tied at zero loss)."""
    return a < b and not (a <= floor and b <= floor)


def json_float(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def theta_bounds(config: MetaConfig) -> tuple[tuple[float, float], tuple[float, float]]:
    """Bounds of a log lr and of a momentum logit."""
    lo, hi = config.lr_bounds
    return (math.log(lo), math.log(hi)), (-Z_LIMIT, Z_LIMIT)


def clamp_theta(config: MetaConfig, theta: Sequence[float]) -> list[float]:
    """theta (every log lr, then every momentum logit) clamped to the bounds."""
    (alo, ahi), (zlo, zhi) = theta_bounds(config)
    half = len(theta) // 2
    return [clamp(float(x), alo, ahi) if i < half else clamp(float(x), zlo, zhi) for i, x in enumerate(theta)]


def values(config: MetaConfig, theta: Sequence[float], slots: int, segs: int) -> tuple[list, list]:
    """theta -> ([slot][segment] learning rates, [slot][segment] momenta), within the bounds."""
    half = slots * segs
    lo, hi = config.lr_bounds
    lrs = [[clamp(math.exp(theta[i * segs + j]), lo, hi) for j in range(segs)] for i in range(slots)]
    moms = [
        [param_to_momentum(theta[half + i * segs + j], config.momentum_bounds) for j in range(segs)]
        for i in range(slots)
    ]
    return lrs, moms


def line_candidates(
    config: MetaConfig, theta: Sequence[float], grad: Sequence[float] | None, h: float
) -> tuple[list[list[float]], list[float]] | None:
    """The points of a line search from theta along the normalised negative gradient, at h times
    each of config.line_steps, clamped to the bounds, with their step lengths. None when there is
    no usable direction: a non-finite gradient, or zero once the components that would push further
    out through a bound are dropped."""
    if grad is None or not finite(*grad):
        return None
    (alo, ahi), (zlo, zhi) = theta_bounds(config)
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
        c = clamp_theta(config, [x + h * t * di for x, di in zip(theta, d, strict=True)])
        if c != list(theta) and c not in cands:
            cands.append(c)
            steps.append(h * t)
    return cands, steps


# --------------------------------------------------------------------------- policies


class Evaluator(Protocol):
    """The meta-loss of one phase's thetas (evaluate.PairEvaluator, evaluate.TableEvaluator)."""

    def forward(self, thetas: Sequence[Sequence[float]]) -> list[float]: ...

    def value_and_grad(self, theta: Sequence[float]) -> tuple[float, list[float]]: ...

    def stable(self, theta: Sequence[float], loss: float) -> bool: ...

    def floor(self) -> float: ...


@dataclass(frozen=True)
class Policy:
    """How a phase searches: see the module docstring."""

    table: bool  # the richer table (state.rich; table records), else the constant pair (state.constant)
    refine_phase: str  # the records' "phase" of a refining iteration
    grid: bool  # stencil: every neighbour in {-h, 0, h}^n, else each value alone up and down
    diagonals: bool  # grid: neighbours that move more than one value too
    stencil: bool  # screen the stencil every iteration, else only when there is no gradient move
    random_directions: int  # random joint moves (every value +-h, seeded by the iteration)
    accept_screened: bool  # accept a winning stencil move on its screened loss, unverified
    screen_single: bool  # screen a lone candidate too (else it is verified at once)
    margin_probe: bool  # an improving move must pass Evaluator.stable (the two best are probed)


def constant_policy(config: MetaConfig) -> Policy:
    return Policy(
        table=False,
        refine_phase="refine",
        grid=True,
        diagonals=config.stencil_diagonals,
        stencil=config.stencil,
        random_directions=0,
        # stencil off: its moves are fallbacks, verified like the hypergradient's
        accept_screened=config.stencil and not config.verify_stencil,
        screen_single=False,
        margin_probe=False,
    )


def table_policy(config: MetaConfig) -> Policy:
    return Policy(
        table=True,
        refine_phase="rich_refine",
        grid=False,
        diagonals=False,
        stencil=True,
        random_directions=config.rich_random_directions,
        accept_screened=False,
        screen_single=True,
        margin_probe=True,
    )


# --------------------------------------------------------------------------- the search


class Search:
    """One phase's search: its config, Policy and Evaluator, applied to a MetaState."""

    def __init__(self, config: MetaConfig, policy: Policy, evaluator: Evaluator):
        self.config = config
        self.policy = policy
        self.evaluator = evaluator

    def of(self, state: MetaState) -> SearchState:
        s = state.rich if self.policy.table else state.constant
        assert s is not None
        return s

    # comparisons -------------------------------------------------------------------------
    def lower(self, a: float, b: float) -> bool:
        """a counts as lower than b (module docstring: ties at the floor)."""
        return lower(a, b, self.evaluator.floor())

    def reach(self, theta: Sequence[float]) -> float:
        """The largest effective learning rate lr / (1 - momentum) of theta's values."""
        lrs, moms = values(self.config, theta, len(theta) // 2, 1)  # a flat table: its order does not matter
        return max(lr[0] / (1.0 - m[0]) for lr, m in zip(lrs, moms, strict=True))

    def rank(self, cands: Sequence[Sequence[float]], losses: Sequence[float]) -> list[tuple[float, int]]:
        """(loss, index) of the finite losses, lowest first; ties in candidate order, except that
        losses at or below the floor all tie and go safest (smallest reach) first."""
        floor = self.evaluator.floor()

        def key(item: tuple[float, int]) -> tuple[float, float, int]:
            loss, i = item
            return (loss, 0.0, i) if loss > floor else (floor, self.reach(cands[i]), i)

        return sorted(((loss, i) for i, loss in enumerate(losses) if finite(loss)), key=key)

    # bookkeeping -------------------------------------------------------------------------
    def note_best(self, state: MetaState, theta: Sequence[float], loss: float | None) -> None:
        s = self.of(state)
        if not finite(loss) or (s.best is not None and not self.lower(loss, s.best.meta_loss)):
            return
        lrs, moms = values(self.config, theta, s.slots, s.segments)
        s.best = Best(
            theta=[float(x) for x in theta], meta_loss=float(loss), iteration=state.iteration, lrs=lrs, momenta=moms
        )

    @staticmethod
    def accept(s: SearchState, theta: Sequence[float], loss: float, grad: Sequence[float] | None) -> None:
        s.theta = [float(x) for x in theta]
        s.loss = float(loss)
        s.grad = [float(g) for g in grad] if grad is not None and finite(*grad) else None

    def record(
        self,
        state: MetaState,
        phase: str,
        accepted: bool,
        candidate_loss: float | None,
        candidate: Sequence[float] | None,
        **extra,
    ) -> dict:
        """The JSON-serializable progress record of one iteration (non-finite floats as None).

        meta_loss, step_size and hypergradient are this search's; lr / momentum are the current
        constant pair, or, in the table's records, the best constant pair with the table's current
        values as group_lr / group_momentum ([slot][segment]) and its best loss as meta_loss_groups."""
        s, table = self.of(state), self.policy.table
        lrs, moms = values(self.config, s.theta, s.slots, s.segments)
        const = state.constant.best
        if table:
            assert const is not None
            lr, mom = const.lr, const.momentum
        else:
            lr, mom = lrs[0][0], moms[0][0]
        rec = {
            "iteration": state.iteration,
            "phase": phase,
            "meta_loss": json_float(s.loss),
            "lr": lr,
            "momentum": mom,
            "accepted": bool(accepted),
            "step_size": float(s.step),
            "hypergradient": [json_float(g) for g in (s.grad or [None] * len(s.theta))],
            "candidate_loss": json_float(candidate_loss),
            "candidate_lr": None,
            "candidate_momentum": None,
            "best_meta_loss": json_float(const.meta_loss) if const else None,
            "best_lr": const.lr if const else None,
            "best_momentum": const.momentum if const else None,
        }
        if candidate is not None and not table:
            c_lrs, c_moms = values(self.config, candidate, 1, 1)
            rec["candidate_lr"], rec["candidate_momentum"] = c_lrs[0][0], c_moms[0][0]
        if table:
            rec["group_lr"], rec["group_momentum"] = lrs, moms
            rec["meta_loss_groups"] = json_float(s.best.meta_loss) if s.best else None
        rec["method"] = state.method
        rec.update(extra)
        return rec

    def converged_record(self, state: MetaState) -> dict:
        return self.record(state, "converged", False, None, None, evaluations=0)

    # candidates --------------------------------------------------------------------------
    def direction(self, s: SearchState) -> list[float] | None:
        """Sign of the hypergradient, without the components that would push further out through a
        bound; None without a finite hypergradient or when nothing is left."""
        g = s.grad
        if g is None or not finite(*g):
            return None
        (alo, ahi), (zlo, zhi) = theta_bounds(self.config)
        half = len(s.theta) // 2
        d = [0.0 if gi == 0.0 else math.copysign(1.0, gi) for gi in g]
        for i, x in enumerate(s.theta):
            lo, hi = (alo, ahi) if i < half else (zlo, zhi)
            if (x <= lo and d[i] > 0) or (x >= hi and d[i] < 0):
                d[i] = 0.0
        return d if any(d) else None

    def gradient_move(self, s: SearchState, d: Sequence[float]) -> list[float]:
        """theta - h * d, every log-lr move capped at max_log_lr_step."""
        cap, h = self.config.max_log_lr_step, s.step
        half = len(s.theta) // 2
        moved = [
            x - (clamp(h * di, -cap, cap) if i < half else h * di)
            for i, (x, di) in enumerate(zip(s.theta, d, strict=True))
        ]
        return clamp_theta(self.config, moved)

    def neighbours(self, theta: Sequence[float], h: float, iteration: int):
        """The stencil around theta at step h (see Policy), then the random joint moves (seeded by
        the iteration, so a resumed run makes the same moves), each clamped to the bounds."""
        cfg, pol = self.config, self.policy
        if pol.grid:
            for delta in itertools.product((-h, 0.0, h), repeat=len(theta)):
                if not pol.diagonals and sum(1 for x in delta if x) > 1:
                    continue
                yield clamp_theta(cfg, [x + dx for x, dx in zip(theta, delta, strict=True)])
        else:
            for i in range(len(theta)):
                for sign in (-1.0, 1.0):
                    c = list(theta)
                    c[i] += sign * h
                    yield clamp_theta(cfg, c)
        if pol.random_directions:
            rng = random.Random(derive_seed("rich", iteration))
            for _ in range(pol.random_directions):
                yield clamp_theta(cfg, [x + h * rng.choice((-1.0, 1.0)) for x in theta])

    def candidates(self, state: MetaState, s: SearchState) -> tuple[list[list[float]], list[float] | None]:
        """(candidates in screening order, the hypergradient move among them or None)."""
        cands: list[list[float]] = []
        move = None
        d = self.direction(s)
        if d is not None:
            c = self.gradient_move(s, d)
            if c != s.theta:
                cands.append(c)
                move = c
        if self.policy.stencil or d is None:
            for c in self.neighbours(s.theta, s.step, state.iteration):
                if c != s.theta and c not in cands:
                    cands.append(c)
        return cands, move

    def pick(self, cands, losses: Sequence[float], current: float):
        """The best candidate that lowers `current` (and, with margin_probe, passes the stability
        probe: the two best improving ones are probed, in order). Returns (index or None, its loss
        or else the lowest finite loss or None, probes run, probes failed)."""
        ranked = self.rank(cands, losses)
        improving = [f for f in ranked if self.lower(f[0], current)]
        probes = rejected = 0
        for loss_i, i in improving[:2]:
            if self.policy.margin_probe:
                probes += 1
                if not self.evaluator.stable(cands[i], loss_i):
                    rejected += 1
                    continue
            return i, loss_i, probes, rejected
        return None, ranked[0][0] if ranked else None, probes, rejected

    # iterations --------------------------------------------------------------------------
    def refine(self, state: MetaState) -> dict:
        return self.line(state) if self.config.search == "line" else self.stencil(state)

    def _extra(self, evaluations: int, move: str | None, rejected: int) -> dict:
        extra = {"evaluations": evaluations, "move": move}
        if self.policy.margin_probe:
            extra["margin_rejected"] = rejected
        return extra

    def stencil(self, state: MetaState) -> dict:
        """Screen the hypergradient move and the stencil, accept the best if lower; the step grows
        after a move and shrinks otherwise; a rejection at the smallest step ends the search."""
        cfg, pol, s = self.config, self.policy, self.of(state)
        h = s.step
        cands, gradient_move = self.candidates(state, s)
        if not cands:  # pinned in a corner of the bounds with nothing to try
            s.converged = True
            return self.record(state, pol.refine_phase, False, None, None, evaluations=0)
        if len(cands) == 1 and not pol.screen_single:
            i, screened, probes, rejected = 0, None, 0, 0
        else:
            i, screened, probes, rejected = self.pick(cands, self.evaluator.forward(cands), s.loss)
        chosen = None if i is None else cands[i]
        accepted, cand_loss = False, screened
        if chosen is not None and screened is not None and chosen != gradient_move and pol.accept_screened:
            # the screened loss is the full-training meta-loss; the hypergradient there stays unknown
            self.note_best(state, chosen, screened)
            self.accept(s, chosen, screened, None)
            accepted = True
        elif chosen is not None:
            loss, grad = self.evaluator.value_and_grad(chosen)
            cand_loss = loss
            self.note_best(state, chosen, loss)
            if finite(loss) and self.lower(loss, s.loss):
                self.accept(s, chosen, loss, grad)
                accepted = True
        if accepted:
            s.step = min(h * cfg.step_growth, cfg.max_step)
        elif h <= cfg.min_step:
            s.converged = True
        else:
            s.step = max(h * cfg.step_shrink, cfg.min_step)
        move = None if chosen is None else ("gradient" if chosen == gradient_move else "stencil")
        return self.record(
            state, pol.refine_phase, accepted, cand_loss, chosen, **self._extra(len(cands) + probes, move, rejected)
        )

    def line(self, state: MetaState) -> dict:
        """search="line": points along the normalised negative hypergradient, screened at once; the
        best, if lower, is accepted after a hypergradient pass there (skipped at the job's last
        iteration, where no next direction is needed) and the step follows it. A line that finds
        nothing lower hands the next iteration to the stencil; without a usable hypergradient this
        iteration is the stencil's."""
        cfg, s = self.config, self.of(state)
        if s.screen_next:
            s.screen_next = False
            return self.stencil(state)
        evaluations = 0
        if s.grad is None:  # after a stencil move or a final line move: the hypergradient first
            loss, grad = self.evaluator.value_and_grad(s.theta)
            evaluations += 1
            if finite(loss, *grad):
                s.grad = [float(x) for x in grad]
        line = line_candidates(cfg, s.theta, s.grad, s.step)
        if line is None:
            return self.stencil(state)
        cands, steps = line
        losses = self.evaluator.forward(cands) if cands else []
        i, cand_loss, probes, rejected = self.pick(cands, losses, s.loss)
        evaluations += len(cands) + probes
        accepted, chosen = False, None if i is None else cands[i]
        if chosen is not None:
            if state.iteration >= cfg.iterations:
                # accepted on its screened loss (the same full-training loss); a resumed state with
                # more iterations takes the hypergradient first (above)
                loss, grad = cand_loss, None
            else:
                loss, grad = self.evaluator.value_and_grad(chosen)
                evaluations += 1
                cand_loss = loss
            self.note_best(state, chosen, loss)
            if finite(loss) and self.lower(loss, s.loss):
                self.accept(s, chosen, loss, grad)
                s.step = min(steps[i], cfg.max_step)
                accepted = True
        if not accepted and self.policy.table:
            # a table's stencil moves each value alone (2 per value plus the random moves: 40
            # candidates for 16 values, ten lines' worth): the line is retried at a shorter step
            # instead, and a miss at the smallest step ends the search
            if s.step <= cfg.min_step:
                s.converged = True
            else:
                s.step = max(s.step * cfg.step_shrink, cfg.min_step)
        elif not accepted:
            # near the edge of stability the hypergradient's sign says little about a finite step:
            # the stencil shrinks the step, or ends the search if nothing around is lower either
            s.screen_next = True
        return self.record(
            state, self.policy.refine_phase, accepted, cand_loss, chosen, **self._extra(evaluations, "line", rejected)
        )
