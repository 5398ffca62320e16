"""The meta-loop: states in and out as JSON, the two phases' starts, and which phase runs when."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

from gradtune.spec.hyper import momentum_to_param

from ..errors import EngineError
from ..functional import segment_boundaries
from ..tasks import Task
from .config import MetaConfig, check_config, rich_enabled
from .costs import choose_method
from .evaluate import PairEvaluator, StopChecked, Stopped, TableEvaluator
from .search import Search, clamp_theta, constant_policy, finite, json_float, lower, table_policy, values
from .state import Layout, MetaState, SearchState


def init_state(config: MetaConfig, lr: float, momentum: float, table: dict | None = None) -> dict:
    """A fresh, JSON-serializable meta-state starting from (lr, momentum), clamped to the bounds.

    ``table`` (best_settings' "param_groups" and "boundaries", e.g. a study's learned values): with
    per_layer or schedule_segments the richer phase starts from it rather than from the best
    constant pair, when its meta-loss there is lower (start_table); one of another shape than the
    job's layout is left out, and the richer phase's first record says so. Ignored without richer
    values."""
    check_config(config)
    if not (math.isfinite(lr) and lr > 0.0):
        raise EngineError("The starting learning rate must be a positive number.")
    if not math.isfinite(momentum):
        raise EngineError("The starting momentum must be a number.")
    start_table = _start_table(table) if table is not None and rich_enabled(config) else None
    theta = clamp_theta(config, [math.log(lr), momentum_to_param(momentum, config.momentum_bounds)])
    lrs, moms = values(config, theta, 1, 1)
    state = MetaState(
        iteration=0,
        start_lr=lrs[0][0],
        start_momentum=moms[0][0],
        per_layer=bool(config.per_layer),
        segments=int(config.schedule_segments),
        constant=SearchState(slots=1, segments=1, theta=theta, loss=None, grad=None, step=float(config.step_size)),
        start_table=start_table,
    )
    return state.to_json()


def _start_table(table: dict) -> dict:
    """init_state's ``table`` as [slot][segment] values (EngineError when it is not one)."""
    try:
        groups, boundaries = table["param_groups"], [int(b) for b in table["boundaries"]]
        lrs = [[float(x) for x in g["lr"]] for g in groups]
        moms = [[float(x) for x in g["momentum"]] for g in groups]
    except (KeyError, TypeError, ValueError) as exc:
        raise EngineError(f"The starting table is malformed ({type(exc).__name__}: {exc}).") from exc
    segs = len(boundaries)
    if not lrs or any(len(r) != segs for r in lrs + moms):
        raise EngineError("The starting table needs one lr and one momentum per group and segment.")
    if not all(math.isfinite(x) and x > 0.0 for r in lrs for x in r):
        raise EngineError("The starting table's learning rates must be positive numbers.")
    if not all(math.isfinite(x) for r in moms for x in r):
        raise EngineError("The starting table's momenta must be numbers.")
    return {"lrs": lrs, "momenta": moms, "boundaries": boundaries}


def _table_theta(config: MetaConfig, table: dict | None, layout: Layout) -> list[float] | None:
    """theta of the starting table on ``layout`` (None: no table, or one of another shape)."""
    if table is None or len(table["lrs"]) != layout.slots or list(table["boundaries"]) != list(layout.boundaries):
        return None
    logs = [math.log(x) for row in table["lrs"] for x in row]
    zs = [momentum_to_param(m, config.momentum_bounds) for row in table["momenta"] for m in row]
    return clamp_theta(config, logs + zs)


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
    Reads version-1 and version-2 states.
    """
    s = MetaState.from_json(state)
    best = s.constant.best
    if best is None:
        out = {"lr": s.start_lr, "momentum": s.start_momentum, "meta_loss": None}
    else:
        out = {"lr": best.lr, "momentum": best.momentum, "meta_loss": best.meta_loss}
    layout = s.layout
    if layout is None or not s.rich_enabled:
        return out
    kept = s.rich_check is None or s.rich_check.get("kept") == "table"
    if s.rich is not None and s.rich.best is not None and kept:
        lrs, moms, loss = s.rich.best.lrs, s.rich.best.momenta, s.rich.best.meta_loss
    else:  # the richer phase has not started, or its values failed the check: the constant pair
        segs = len(layout.boundaries)
        lrs = [[out["lr"]] * segs for _ in range(layout.slots)]
        moms = [[out["momentum"]] * segs for _ in range(layout.slots)]
        loss = out["meta_loss"]
    out["param_groups"] = [
        {"params": list(names), "lr": list(lrs[i]), "momentum": list(moms[i])} for i, names in enumerate(layout.groups)
    ]
    out["boundaries"] = list(layout.boundaries)
    out["meta_loss_groups"] = loss
    if s.rich_check is not None:
        out["rich_check"] = dict(s.rich_check)
    return out


# The check's draws: 8, none of them a training draw (MetaConfig.draws) or an evaluation draw. With
# the two training draws, noise decided it: on teacher-illcond (benchmarks/quality.py, 8 tasks) the
# table lost to the pair on draws 0-1 of the held-back tasks (0.256 against 0.243) and won on draws
# 2-9 (0.271 against 0.279) and on the 8 held-out tasks (0.120 against 0.127).
CHECK_DRAWS = tuple(range(2, 10))


def held_back(n_tasks: int, config: MetaConfig) -> list[int]:
    """Indices of the tasks the richer search never sees (MetaConfig.rich_holdout): every k-th task
    once there are rich_holdout_min_tasks (and k) of them; none when the check is off or the job
    has fewer tasks."""
    k = int(config.rich_holdout)
    if not rich_enabled(config) or k < 2 or n_tasks < max(k, int(config.rich_holdout_min_tasks)):
        return []
    return [i for i in range(n_tasks) if i % k == k - 1]


def check_rich(tasks: Sequence[Task], config: MetaConfig, state: dict) -> dict:
    """Judge the richer values on the held-back tasks (held_back), once: the table is kept only if
    its mean validation loss there (CHECK_DRAWS, one batched forward pass) is lower than the best constant
    pair's. Returns the new state (unchanged without held-back tasks, a table, or when done before).
    run_meta calls it when the search ends; a job stopped early (a deadline) calls it itself."""
    s = MetaState.from_json(state)
    held = held_back(len(tasks), config)
    if not held or s.rich_check is not None or not _moved(s):  # nothing to judge: the table is the pair
        return s.to_json()
    assert s.rich is not None and s.rich.best is not None and s.constant.best is not None
    from ..modules import make_objective

    slots, segs = s.rich.slots, s.rich.segments
    c = s.constant.best.theta
    constant = [c[0]] * (slots * segs) + [c[1]] * (slots * segs)
    evaluator = TableEvaluator(
        make_objective([tasks[i] for i in held], CHECK_DRAWS, config), config, s.method or "reverse", slots, segs
    )
    table_loss, constant_loss = evaluator.forward([s.rich.best.theta, constant])
    better = finite(table_loss) and (not finite(constant_loss) or lower(table_loss, constant_loss, evaluator.floor()))
    s.rich_check = {
        "held_back": held,
        "table_loss": json_float(table_loss),
        "constant_loss": json_float(constant_loss),
        "kept": "table" if better else "constant",
        "reason": None
        if better
        else (
            f"The per-layer / scheduled values did not beat the constant pair on {len(held)} task(s) the "
            "search never saw (held back to check them), so the constant pair is returned in their form."
        ),
    }
    return s.to_json()


def _layout(tasks: Sequence[Task], config: MetaConfig) -> Layout:
    """Parameter groups (names as nn.Sequential's named_parameters()) and segment boundaries."""
    from ..modules import param_layout  # MLP Tasks and any-module ModuleTasks alike

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
    return Layout(groups=groups, boundaries=segment_boundaries(n_steps, segs))


class _LazyObjective:
    """The tasks' objective (modules.make_objective), prepared on first use: an iteration that only
    records convergence needs none."""

    def __init__(self, tasks: Sequence[Task], draws: Sequence[int], config: MetaConfig | None = None):
        self._tasks, self._draws, self._config, self._objective = tasks, draws, config, None

    def __getattr__(self, name: str):
        if self._objective is None:
            from ..modules import make_objective  # functional.Objective for MLP Tasks, else ModuleObjective

            self._objective = make_objective(self._tasks, self._draws, self._config)
        return getattr(self._objective, name)


class _Phases:
    """The two searches of one run_meta call: the constant pair and, with a layout, the table.
    With should_stop, each evaluator asks it before every evaluation (evaluate.StopChecked). The
    table searches without the held-back tasks until their check passes (refit: over every task)."""

    def __init__(
        self,
        tasks: Sequence[Task],
        config: MetaConfig,
        method: str,
        layout: Layout | None,
        should_stop: Callable[[], bool] | None = None,
        refit: bool = False,
    ):
        objective = _LazyObjective(tasks, config.draws, config)

        def checked(evaluator):
            return evaluator if should_stop is None else StopChecked(evaluator, should_stop)

        self.tasks, self.config, self.layout = tasks, config, layout
        self.held = held_back(len(tasks), config)
        self.constant = Search(config, constant_policy(config), checked(PairEvaluator(objective, config, method)))
        self.table = None
        if layout is not None:
            self._every = checked(TableEvaluator(objective, config, method, layout.slots, len(layout.boundaries)))
            evaluator = self._every
            if self.held and not refit:  # the richer search never sees the held-back tasks (check_rich)
                part = _LazyObjective([t for i, t in enumerate(tasks) if i not in self.held], config.draws, config)
                evaluator = checked(TableEvaluator(part, config, method, layout.slots, len(layout.boundaries)))
            self.table = Search(config, table_policy(config), evaluator)

    def refit(self) -> None:
        """From now on the table is searched over every task."""
        assert self.table is not None
        self.table.evaluator = self._every


# --------------------------------------------------------------------------- the starts


def _population(config: MetaConfig, theta0: Sequence[float]) -> list[list[float]]:
    """The starting lr times 10**(k * population_lr_step), |k| <= population_lr_span, at the
    starting momentum and at each of population_momenta."""
    ln10 = math.log(10.0)
    ks = range(-config.population_lr_span, config.population_lr_span + 1)
    zs = [theta0[1]] + [momentum_to_param(m, config.momentum_bounds) for m in config.population_momenta]
    cands: list[list[float]] = []
    for z in zs:
        for k in ks:
            th = clamp_theta(config, [theta0[0] + k * config.population_lr_step * ln10, z])
            if th not in cands:
                cands.append(th)
    return cands


def _first_finite(search: Search, thetas: Sequence[Sequence[float]]) -> tuple[tuple | None, int]:
    """(theta, loss, grad) of the first theta with a finite loss, or None; and the passes run."""
    for n, theta in enumerate(thetas, start=1):
        loss, grad = search.evaluator.value_and_grad(theta)
        if finite(loss):
            return (theta, loss, grad), n
    return None, len(thetas)


def _backoff(search: Search, theta0: Sequence[float], lowest: float) -> tuple[tuple | None, int, float]:
    """Divide the lowest lr tried by backoff_factor, a few times, until training converges."""
    cfg = search.config
    backoffs = 0
    a, a_min = lowest, math.log(cfg.lr_bounds[0])
    while backoffs < cfg.backoff_tries and a > a_min:
        a = max(a - math.log(cfg.backoff_factor), a_min)
        backoffs += 1
        chosen, _ = _first_finite(search, [clamp_theta(cfg, [a, theta0[1]])])
        if chosen is not None:
            return chosen, backoffs, a
    return None, backoffs, a


def start_constant(search: Search, state: MetaState) -> dict:
    """Iteration 1: a finite starting point for the constant pair (population, then backoff)."""
    cfg, s = search.config, state.constant
    theta0 = list(s.theta)
    evaluations = 0
    if cfg.population:
        cands = _population(cfg, theta0)
        losses = search.evaluator.forward(cands)
        evaluations += len(cands)
        ranked = [cands[i] for _, i in search.rank(cands, losses)]
        lowest = min(c[0] for c in cands)
    else:
        ranked, lowest = [theta0], theta0[0]
    chosen, passes = _first_finite(search, ranked[:3])
    evaluations += passes
    backoffs, a = 0, lowest
    if chosen is None:
        chosen, backoffs, a = _backoff(search, theta0, lowest)
        evaluations += backoffs
    if chosen is None:
        raise EngineError(
            "Training diverged (the loss became infinite or NaN) at every learning rate tried, "
            f"down to {math.exp(a):.3g}. Check the data for missing or extreme values, scale "
            "the features, or start from a smaller learning rate."
        )
    theta, loss, grad = chosen
    search.accept(s, theta, loss, grad)
    search.note_best(state, theta, loss)
    return search.record(state, "start", True, loss, theta, evaluations=evaluations, backoffs=backoffs)


def start_table(search: Search, state: MetaState, layout: Layout) -> dict:
    """The richer phase's first iteration: every value of the table at the best constant pair."""
    slots, segs = layout.slots, len(layout.boundaries)
    best = state.constant.best
    assert best is not None
    theta = _pair_table(best.theta, slots * segs)
    warm = _table_theta(search.config, state.start_table, layout)
    evaluations, extra = 1, {}
    if state.start_table is not None and warm is None:
        extra["start_table"] = "left out: its groups or segments differ from this job's"
    elif warm is not None and warm != theta:  # the start table against the constant pair, on the table's tasks
        screened = search.evaluator.forward([theta, warm])
        evaluations += 1
        use = finite(screened[1]) and (not finite(screened[0]) or screened[1] < screened[0])
        extra["start_table"] = "started from it" if use else "the constant pair was lower"
        theta = warm if use else theta
    loss, grad = search.evaluator.value_and_grad(theta)
    state.rich = SearchState(
        slots=slots,
        segments=segs,
        theta=theta,
        loss=float(loss) if finite(loss) else best.meta_loss,
        grad=[float(g) for g in grad] if finite(*grad) else None,
        step=float(search.config.step_size),
    )
    search.note_best(state, theta, state.rich.loss)
    return search.record(state, "rich_start", True, loss, None, evaluations=evaluations, **extra)


# --------------------------------------------------------------------------- the loop


def _iterate(phases: _Phases, state: MetaState, constant_budget: int) -> dict:
    """One iteration (state.iteration already counts it): the constant pair until it converges or
    its budget is spent, then the table (when there is one)."""
    constant, table = phases.constant, phases.table
    started = state.constant.loss is not None
    if table is not None and started and (state.constant.converged or state.iteration > constant_budget):
        if state.rich is None:
            return start_table(table, state, phases.layout)
        cfg = phases.config
        due = state.rich.converged or state.iteration > cfg.iterations - cfg.rich_refit
        # a table that has not left the constant pair yet has nothing to check: it keeps searching
        # (the check then runs when it moves, or when the search ends)
        if phases.held and state.rich_check is None and cfg.rich_refit and due and _moved(state):
            return _check_iteration(phases, state)
        return table.converged_record(state) if state.rich.converged else table.refine(state)
    if not started:
        return start_constant(constant, state)
    return constant.converged_record(state) if state.constant.converged else constant.refine(state)


def _moved(state: MetaState) -> bool:
    """The table's best point differs from the constant pair it started at."""
    rich, const = state.rich, state.constant.best
    if rich is None or rich.best is None or const is None:
        return False
    return list(rich.best.theta) != _pair_table(const.theta, rich.slots * rich.segments)


def _pair_table(pair: Sequence[float], n: int) -> list[float]:
    """The table's theta with the constant pair's (log lr, momentum logit) in every one of its n values."""
    return [pair[0]] * n + [pair[1]] * n


def _check_iteration(phases: _Phases, state: MetaState) -> dict:
    """The check (check_rich) as an iteration of its own. A table that passes is then searched over
    every task from where it stands (its loss and hypergradient there recomputed over all of them);
    one that fails ends the table's search (best_settings returns the constant pair)."""
    table = phases.table
    assert table is not None and state.rich is not None and state.rich.best is not None
    state.rich_check = check_rich(phases.tasks, phases.config, state.to_json())["rich_check"]
    s = state.rich
    if state.rich_check is None or state.rich_check["kept"] != "table":
        s.converged = True
        return table.record(state, "rich_check", False, None, None, evaluations=1, rich_check=state.rich_check)
    phases.refit()
    theta = list(s.best.theta)
    loss, grad = table.evaluator.value_and_grad(theta)
    if not finite(loss):  # cannot happen for a table that trained finitely; keep it and stop
        s.converged = True
        return table.record(state, "rich_check", True, loss, None, evaluations=2, rich_check=state.rich_check)
    table.accept(s, theta, loss, grad)
    s.best, s.converged, s.screen_next = None, False, False
    table.note_best(state, theta, loss)
    return table.record(state, "rich_check", True, loss, None, evaluations=2, rich_check=state.rich_check)


def run_meta(
    tasks: Sequence[Task],
    config: MetaConfig,
    state: dict,
    max_iterations: int,
    on_iteration: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict:
    """Run at most max_iterations more meta-iterations (never past config.iterations).

    Takes a version-1 or version-2 JSON state and returns a new version-2 one (the argument is not
    modified). on_iteration(record) is called after each iteration; should_stop() is checked before
    each one and before each evaluation within one: an iteration stopped part-way leaves no trace
    (the state returned is the one before it, and it is not reported), so a deadline or a cancel
    waits for one evaluation at most. Without a stop the results are those of a run without
    should_stop.
    """
    check_config(config)
    s = MetaState.from_json(state)
    todo = min(int(max_iterations), config.iterations - s.iteration)
    if todo <= 0:
        return s.to_json()
    rich = rich_enabled(config)
    if rich:
        s.layout = _layout(tasks, config)
    if not s.method:
        s.method, s.method_reason = choose_method(tasks, config)
    constant_budget = max(1, int(config.iterations * config.constant_fraction)) if rich else config.iterations
    refit = s.rich_check is not None and s.rich_check.get("kept") == "table"
    phases = _Phases(tasks, config, s.method, s.layout if rich else None, should_stop, refit)
    for _ in range(todo):
        if should_stop is not None and should_stop():
            break
        before = copy.deepcopy(s) if should_stop is not None else None
        s.iteration += 1
        try:
            rec = _iterate(phases, s, constant_budget)
        except Stopped:
            assert before is not None
            s = before
            break
        if on_iteration is not None:
            on_iteration(rec)
    out = s.to_json()
    if rich and s.rich is not None and (s.iteration >= config.iterations or s.rich.converged):
        out = check_rich(tasks, config, out)
    return out
