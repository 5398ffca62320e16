"""A study's settings, learned again over a pool of tasks that grows job after job.

A study (service/studies.py) keeps every task its jobs brought; some are held out (the service
decides which and never passes them here). ``relearn`` takes the pool's training tasks and the
study's current settings and learns them again, warm, through the engine's public API only
(init_state, run_meta, best_settings): no search internals.

Each round draws a meta-batch of ``PoolConfig.meta_batch`` tasks from the pool (all of them when the
pool is that small), deterministically from the study's seed and the round number (as MAML draws a
meta-batch of tasks per meta-iteration), runs ``PoolConfig.iterations`` meta-iterations on it,
starting at the current settings (no population: the start is already good; a smaller first
step; per-layer or scheduled values start from the current table, not from the pair), and keeps
the round's answer only if it does not get worse on a check: the mean training
loss, on the training draws, of up to ``PoolConfig.check_tasks`` other tasks of the pool (the batch
itself when the pool has no others), against the current settings on the same tasks. So a round
can only keep or improve the settings on tasks it did not train on.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .errors import EngineError
from .meta import MetaConfig, best_settings, init_state, run_meta
from .meta.config import LINE_SEARCH
from .reference import evaluate_groups


@dataclass(frozen=True)
class PoolConfig:
    """How a study learns over its pool (the defaults are benchmarks/studies.py's)."""

    # tasks per meta-batch: one unroll holds every task x draw of the batch
    meta_batch: int = 16
    # meta-batches per relearn (each warm from the settings the one before kept)
    rounds: int = 2
    # meta-iterations per round
    iterations: int = 3
    # tasks outside the batch the round's answer is checked on (the batch itself when none)
    check_tasks: int = 16
    # the first step of a warm search, in theta units (MetaConfig.step_size is 0.5 from cold)
    warm_step: float = 0.25
    # each round's search: "line" (LINE_SEARCH) or "stencil" (MetaConfig's), both started warm
    search: str = "line"


def warm_config(config: MetaConfig, warm_step: float = PoolConfig.warm_step) -> MetaConfig:
    """``config`` for a search that starts at settings already learned: no population (the start is
    evaluated as it is, backed off only if it diverges) and a smaller first step."""
    return dataclasses.replace(config, population=False, step_size=min(config.step_size, warm_step))


def draw_batch(pool_size: int, size: int, seed: int, round_: int) -> list[int]:
    """Indices of a meta-batch of ``size`` tasks of a pool of ``pool_size`` (every index when the pool
    is not larger), the same for the same (seed, round): sorted, without repeats."""
    if size >= pool_size:
        return list(range(pool_size))
    rng = random.Random(f"gradtune-study:{seed}:{round_}")
    return sorted(rng.sample(range(pool_size), size))


def _check_indices(pool_size: int, batch: list[int], size: int, seed: int, round_: int) -> list[int]:
    others = [i for i in range(pool_size) if i not in set(batch)]
    if not others:
        return list(batch)
    if len(others) <= size:
        return others
    rng = random.Random(f"gradtune-study-check:{seed}:{round_}")
    return sorted(rng.sample(others, size))


def _check_loss(tasks: Sequence, settings: dict, draws: Sequence[int], config: MetaConfig) -> float:
    """Mean loss of ``settings`` on ``tasks`` and the training ``draws`` (inf when not finite)."""
    if "param_groups" in settings:
        loss = evaluate_groups(tasks, settings["param_groups"], settings["boundaries"], draws)["mean_val_loss"]
    else:
        from .modules import make_objective  # the batched forward objective (MLP fast path included)

        loss = make_objective(tasks, draws, config).losses([settings["lr"]], [settings["momentum"]])[0]
    return float(loss) if math.isfinite(loss) else math.inf


def settings_of(best: dict) -> dict:
    """best_settings' answer as settings: "lr", "momentum" and, for richer values, "param_groups" and
    "boundaries" (no meta-losses)."""
    out = {"lr": float(best["lr"]), "momentum": float(best["momentum"])}
    if "param_groups" in best:
        out["param_groups"] = best["param_groups"]
        out["boundaries"] = best["boundaries"]
    return out


def relearn(
    tasks: Sequence,
    config: MetaConfig,
    settings: dict,
    *,
    seed: int,
    first_round: int = 0,
    pool: PoolConfig | None = None,
    alternatives: Sequence[dict] = (),
    should_stop: Callable[[], bool] | None = None,
) -> dict:
    """Learn ``settings`` ({"lr", "momentum"} and, for richer settings, "param_groups" and
    "boundaries") again over ``tasks`` (the pool's training tasks, nothing held out), warm.

    ``config`` carries the study's bounds, per_layer, schedule_segments, method and memory budget;
    the search is the line search (LINE_SEARCH) started warm (warm_config). Rounds are numbered from
    ``first_round`` (the study's count of rounds so far: each relearn draws fresh meta-batches).
    ``should_stop`` is checked before each round and within its search; a round stopped part-way
    keeps nothing. Returns {"settings", "rounds": [per round: round, batch (indices into ``tasks``),
    check (indices), loss_before, loss_after, kept], "start": 0 for ``settings``, i for
    ``alternatives[i - 1]``}. With ``alternatives`` (e.g. the settings the last job learned on its
    own), the search starts from whichever has the lowest loss on the first round's meta-batch.
    """
    pool = pool or PoolConfig()
    if not tasks:
        raise EngineError("A study needs at least one training task to learn from.")
    search = LINE_SEARCH if pool.search == "line" else {"search": "stencil"}
    round_config = warm_config(dataclasses.replace(config, **search, iterations=pool.iterations), pool.warm_step)
    current, chosen = dict(settings), 0
    if alternatives:
        first = [tasks[i] for i in draw_batch(len(tasks), pool.meta_batch, seed, first_round)]
        options = [current, *(settings_of(a) for a in alternatives)]
        losses = [_check_loss(first, option, config.draws, config) for option in options]
        chosen = min(range(len(options)), key=lambda i: (losses[i], i))
        current = options[chosen]
    rounds: list[dict] = []
    for r in range(first_round, first_round + pool.rounds):
        if should_stop is not None and should_stop():
            break
        batch = draw_batch(len(tasks), pool.meta_batch, seed, r)
        table = current if "param_groups" in current else None  # richer values start from the current ones
        state = init_state(round_config, current["lr"], current["momentum"], table=table)
        state = run_meta([tasks[i] for i in batch], round_config, state, pool.iterations, should_stop=should_stop)
        if should_stop is not None and should_stop():
            break
        candidate = settings_of(best_settings(state))
        check = _check_indices(len(tasks), batch, pool.check_tasks, seed, r)
        check_tasks = [tasks[i] for i in check]
        before = _check_loss(check_tasks, current, config.draws, config)
        after = _check_loss(check_tasks, candidate, config.draws, config)
        kept = after <= before
        if kept:
            current = candidate
        rounds.append(
            {
                "round": r,
                "batch": batch,
                "check": check,
                "loss_before": before if math.isfinite(before) else None,
                "loss_after": after if math.isfinite(after) else None,
                "kept": kept,
            }
        )
    return {"settings": current, "rounds": rounds, "start": chosen}
