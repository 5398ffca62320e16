"""Quality per compute on held-out tasks: gradtune against the default, random search, Optuna TPE
and a dense grid chosen on the held-out tasks themselves.

    pip install -e '.[bench]'
    .venv/bin/python benchmarks/quality.py            # three families, 8 + 8 tasks (~7 min on 2 cores)
    .venv/bin/python benchmarks/quality.py --tasks 12 # 12 + 12 tasks (~11 min)
    .venv/bin/python benchmarks/quality.py --quick    # fewer trials and iterations, smoke run

Families, each a set of same-shape tasks built from what ships offline, scaled the way a user would
scale them; settings are learned on the "train" tasks (draws (0, 1), MetaConfig's) and judged on the
other, "held-out" tasks of the family with plain torch.optim.SGD (evaluate / evaluate_groups, draws
JUDGE_DRAWS: draws 1001-1008, the service's 3 evaluation draws and 5 more); 8 train + 8 held-out
tasks by default (--tasks):
  digits-classes  digits restricted to 5 of the 10 classes (a different subset per task), pixels
                  scaled to [0, 1] (/16, as torchvision's ToTensor does for images), MLP [32] tanh,
                  100 steps of batch 32
  cancer-features breast_cancer, 10 of its 30 features per task, min-max scaled to [0, 1] with the
                  task's training rows (sklearn's MinMaxScaler), MLP [16] tanh, 100 steps of batch 32
  teacher-illcond synthetic regression: 2,000 rows of 16 inputs with scales log-spaced over
                  1e-2..1e0 (condition number 1e4 for the Hessian of a linear model), targets from a
                  random tanh teacher plus noise, MLP [32] tanh, mse, 100 steps of batch 32
The first version of these families (raw pixels 0..16, standardised features, inputs over 1e-1..1e1
with 600 rows; 4 + 4 tasks) left the default within 5-48 % of the best pair, so the regret's
denominator was 0.015-0.042 and family-to-family noise dominated it; they stay selectable as
--families digits-raw cancer-standard teacher-wide --tasks 4 to reproduce the earlier tables.
Black-box searchers (random search, Optuna TPE) get the engine's batched forward evaluation of the
same meta-objective (every train task x draw in one unroll), the fastest evaluator there is, so
wall time compares search strategies, not training loops; one more row gives TPE-20 the plain
torch.optim.SGD loop a user would write (one run per task and draw). The grid (25 lr log-spaced 1e-4..3 x
momentum {0, .5, .8, .9, .95, .99}) is scored on the held-out tasks and evaluation draws
themselves: the best any constant pair can do, the yardstick of the regret
(loss - grid) / (default - grid); the grid is not infinitely fine, so a learned pair between its
points can score below it (negative regret). A reference row chooses the same grid on the train
tasks and training draws (the objective every searcher minimises) and scores it held out: the regret
that minimising the training objective gives on the family, however good the search. Search space
for every method: lr in [1e-4, 3], momentum in [0, 0.99].
"""

from __future__ import annotations

import argparse
import math
import pathlib
import random
import sys
import time

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from worker.datasets import load_builtin
from worker.engine import (
    LINE_SEARCH,
    MetaConfig,
    Task,
    best_settings,
    evaluate,
    evaluate_groups,
    init_state,
    run_meta,
    train_sgd,
)
from worker.engine.functional import Objective

DEFAULT = (0.01, 0.9)
LR_BOUNDS = (1e-4, 3.0)
MOM_BOUNDS = (0.0, 0.99)
MOMENTA = (0.0, 0.5, 0.8, 0.9, 0.95, 0.99)
TRAIN_DRAWS = (0, 1)
# Held-out judging: 8 draws (initialisation and batch order) per held-out task. With the service's 3
# (EVAL_DRAWS, 1001-1003) the held-out grid, a minimum over 150 noisy values, picked a pair that won
# on those draws only: on teacher-illcond it chose lr 0.35, momentum 0.8 where 8 draws choose 0.148,
# 0.8, and every method's regret carried that noise (the train-grid reference +0.092 against +0.000).
JUDGE_DRAWS = tuple(range(1001, 1009))


def _task(name, xt, yt, xv, yv, hidden, loss, out, seed, steps=100, batch=32) -> Task:
    return Task(
        name=name,
        x_train=torch.as_tensor(xt, dtype=torch.float32),
        y_train=torch.as_tensor(yt),
        x_val=torch.as_tensor(xv, dtype=torch.float32),
        y_val=torch.as_tensor(yv),
        hidden=hidden,
        activation="tanh",
        loss=loss,
        out_features=out,
        steps=steps,
        batch_size=batch,
        seed=seed,
    )


def digits_classes(n: int, pixel_scale: float = 1 / 16) -> list[Task]:
    tasks = []
    for i in range(n):
        rng = np.random.default_rng(100 + i)
        classes = np.sort(rng.choice(10, size=5, replace=False))
        xt, yt, xv, yv = load_builtin("digits", seed=i)
        xt, xv = xt * pixel_scale, xv * pixel_scale
        remap = np.full(10, -1)
        remap[classes] = np.arange(5)
        mt, mv = np.isin(yt, classes), np.isin(yv, classes)
        tasks.append(
            _task(
                f"digits-{''.join(map(str, classes))}",
                xt[mt],
                remap[yt[mt]],
                xv[mv],
                remap[yv[mv]],
                (32,),
                "cross_entropy",
                5,
                seed=i,
            )
        )
    return tasks


def cancer_features(n: int, scaling: str = "minmax") -> list[Task]:
    tasks = []
    for i in range(n):
        rng = np.random.default_rng(200 + i)
        cols = np.sort(rng.choice(30, size=10, replace=False))
        xt, yt, xv, yv = load_builtin("breast_cancer", seed=i)
        xt, xv = xt[:, cols], xv[:, cols]
        if scaling == "minmax":  # sklearn's MinMaxScaler on the task's training rows
            lo, span = xt.min(0), xt.max(0) - xt.min(0) + 1e-6
        else:  # "standard": StandardScaler
            lo, span = xt.mean(0), xt.std(0) + 1e-6
        tasks.append(
            _task(f"cancer-f{i}", (xt - lo) / span, yt, (xv - lo) / span, yv, (16,), "cross_entropy", 2, seed=i)
        )
    return tasks


def teacher_illcond(n: int, scales: tuple[float, float] = (-2.0, 0.0), rows: int = 2000) -> list[Task]:
    tasks = []
    for i in range(n):
        g = torch.Generator().manual_seed(300 + i)
        d = 16
        scale = torch.logspace(*scales, d)
        x = torch.randn(rows, d, generator=g) * scale
        w1 = torch.randn(d, 32, generator=g) / scale[:, None] / math.sqrt(d)
        w2 = torch.randn(32, 1, generator=g) / math.sqrt(32)
        y = torch.tanh(x @ w1) @ w2 + 0.1 * torch.randn(rows, 1, generator=g)
        cut = int(rows * 0.8)
        tasks.append(_task(f"teacher-{i}", x[:cut], y[:cut], x[cut:], y[cut:], (32,), "mse", 1, seed=i))
    return tasks


FAMILIES = {"digits-classes": digits_classes, "cancer-features": cancer_features, "teacher-illcond": teacher_illcond}
# The first families (raw digits pixels 0..16, standardised cancer features, teacher inputs scaled
# 1e-1..1e1 with 600 rows), where the default was already within 1-48 % of the grid: kept to
# reproduce the earlier tables in docs/benchmarks.md (run with --families digits-raw ... --tasks 4).
LEGACY_FAMILIES = {
    "digits-raw": lambda n: digits_classes(n, pixel_scale=1.0),
    "cancer-standard": lambda n: cancer_features(n, scaling="standard"),
    "teacher-wide": lambda n: teacher_illcond(n, scales=(-1.0, 1.0), rows=600),
}


def grid_lrs(n: int) -> list[float]:
    lo, hi = math.log10(LR_BOUNDS[0]), math.log10(LR_BOUNDS[1])
    return [10 ** (lo + (hi - lo) * i / (n - 1)) for i in range(n)]


def grid_argmin(obj: Objective, pairs: list[tuple[float, float]]) -> tuple[float, float]:
    """The pair of the grid with the lowest loss on obj (diverged pairs never win)."""
    losses = obj.losses([p[0] for p in pairs], [p[1] for p in pairs])
    return pairs[min(range(len(pairs)), key=lambda i: losses[i] if math.isfinite(losses[i]) else math.inf)]


def random_search(obj: Objective, trials: int, seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    lo, hi = math.log(LR_BOUNDS[0]), math.log(LR_BOUNDS[1])
    cands = [(math.exp(rng.uniform(lo, hi)), rng.uniform(*MOM_BOUNDS)) for _ in range(trials)]
    best = None
    for lr, mom in cands:  # one trial at a time, as a searcher would run them
        loss = obj.losses([lr], [mom])[0]
        if best is None or loss < best[0]:
            best = (loss, lr, mom)
    return best[1], best[2]


class PlainLoop:
    """The meta-objective as a user's own loop computes it: torch.optim.SGD, one run at a time."""

    def __init__(self, tasks, draws):
        self.tasks, self.draws = tasks, draws

    def losses(self, lrs, moms):
        out = []
        for lr, mom in zip(lrs, moms, strict=True):
            runs = [train_sgd(t, lr, mom, d) for t in self.tasks for d in self.draws]
            out.append(sum(runs) / len(runs))
        return out


def optuna_tpe(obj: Objective, trials: int, seed: int = 0) -> tuple[float, float]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def objective(trial):
        lr = trial.suggest_float("lr", *LR_BOUNDS, log=True)
        mom = trial.suggest_float("momentum", *MOM_BOUNDS)
        loss = obj.losses([lr], [mom])[0]
        return loss if math.isfinite(loss) else 1e10

    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(objective, n_trials=trials)
    return study.best_params["lr"], study.best_params["momentum"]


def gradtune(train, iters, **kw):
    config = MetaConfig(iterations=kw.pop("iterations", iters), lr_bounds=LR_BOUNDS, momentum_bounds=MOM_BOUNDS, **kw)
    state = run_meta(train, config, init_state(config, *DEFAULT), config.iterations)
    return best_settings(state)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=[*FAMILIES, *LEGACY_FAMILIES])
    ap.add_argument("--tasks", type=int, default=8, help="train tasks and held-out tasks per family")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import optuna  # noqa: F401  (imported before any clock starts: TPE's rows time the search only)

    n_lr = 9 if args.quick else 25
    iters = 15 if args.quick else 40
    summary = []
    for fam in args.families:
        tasks = {**FAMILIES, **LEGACY_FAMILIES}[fam](2 * args.tasks)
        train, held = tasks[: args.tasks], tasks[args.tasks :]
        # name, held-out loss, seconds, settings, meta-loss on the train tasks and training draws
        rows: list[tuple[str, float, float, object, float]] = []

        def score(lr, mom, held=held):
            return evaluate(held, lr, mom, JUDGE_DRAWS)["mean_val_loss"]

        t0 = time.perf_counter()
        held_obj = Objective(held, JUDGE_DRAWS)
        lrs = grid_lrs(n_lr)
        pairs = [(lr, m) for m in MOMENTA for lr in lrs]
        g_lr, g_mom = grid_argmin(held_obj, pairs)
        grid_s = time.perf_counter() - t0
        grid = score(g_lr, g_mom)
        default = score(*DEFAULT)
        train_obj = Objective(train, TRAIN_DRAWS)

        def train_loss(lr, mom, train_obj=train_obj):
            return train_obj.losses([lr], [mom])[0]

        rows.append(
            (
                f"grid {n_lr}x{len(MOMENTA)} on held-out (yardstick)",
                grid,
                grid_s,
                (g_lr, g_mom),
                train_loss(g_lr, g_mom),
            )
        )
        rows.append(("default (0.01, 0.9)", default, 0.0, DEFAULT, train_loss(*DEFAULT)))
        # the same grid chosen on the train tasks and training draws: the exact minimiser (to grid
        # resolution) of the objective every searcher below minimises, scored held out. Its regret
        # is what minimising the training objective can give on this family, whatever the search.
        t0 = time.perf_counter()
        t_lr, t_mom = grid_argmin(train_obj, pairs)
        secs = time.perf_counter() - t0  # taken before the held-out scoring, which no method pays
        rows.append(
            (
                f"grid {n_lr}x{len(MOMENTA)} on train tasks (reference)",
                score(t_lr, t_mom),
                secs,
                (t_lr, t_mom),
                train_loss(t_lr, t_mom),
            )
        )
        for name, fn in (
            ("random search 20", lambda obj=train_obj: random_search(obj, 20)),
            ("optuna TPE 20", lambda obj=train_obj: optuna_tpe(obj, 20)),
            ("optuna TPE 60", lambda obj=train_obj: optuna_tpe(obj, 60)),
            ("optuna TPE 20, plain SGD loop per trial", lambda t=train: optuna_tpe(PlainLoop(t, TRAIN_DRAWS), 20)),
        ):
            t0 = time.perf_counter()
            lr, mom = fn()
            secs = time.perf_counter() - t0
            rows.append((name, score(lr, mom), secs, (lr, mom), train_loss(lr, mom)))
        # TPE's answer depends on its seed: the mean of five seeds (0-4) as well
        runs = []
        for seed in range(5):
            t0 = time.perf_counter()
            lr, mom = optuna_tpe(train_obj, 20, seed=seed)
            secs = time.perf_counter() - t0
            runs.append((score(lr, mom), secs, train_loss(lr, mom)))
        seed_regrets = ", ".join(f"{(r[0] - grid) / (default - grid):+.3f}" for r in runs)
        rows.append(
            (
                "optuna TPE 20, mean of seeds 0-4",
                sum(r[0] for r in runs) / 5,
                sum(r[1] for r in runs) / 5,
                f"regrets {seed_regrets}",
                sum(r[2] for r in runs) / 5,
            )
        )
        for name, kw in (
            ("gradtune constant", {}),
            ("gradtune constant, line search, 3 iterations", {**LINE_SEARCH, "iterations": 3}),
            ("gradtune per-layer", {"per_layer": True}),
            ("gradtune per-layer x 4 segments", {"per_layer": True, "schedule_segments": 4}),
            ("gradtune per-layer, line search", {**LINE_SEARCH, "per_layer": True}),
            (
                "gradtune per-layer x 4 segments, line search",
                {**LINE_SEARCH, "per_layer": True, "schedule_segments": 4},
            ),
        ):
            t0 = time.perf_counter()
            best = gradtune(train, iters, **kw)
            secs = time.perf_counter() - t0
            if "param_groups" in best:
                loss = evaluate_groups(held, best["param_groups"], best["boundaries"], JUDGE_DRAWS)["mean_val_loss"]
                rows.append((name, loss, secs, "groups", best["meta_loss_groups"]))
            else:
                rows.append(
                    (name, score(best["lr"], best["momentum"]), secs, (best["lr"], best["momentum"]), best["meta_loss"])
                )
        print(f"\n### {fam}: {len(train)} train tasks, {len(held)} held-out tasks\n")
        print("| method | held-out loss | regret | wall s | train meta-loss | settings |")
        print("|---|---:|---:|---:|---:|---|")
        for name, loss, secs, st, tr in rows:
            regret = (loss - grid) / (default - grid) if default != grid else float("nan")
            sett = st if isinstance(st, str) else f"lr {st[0]:.4g}, mom {st[1]:.3f}"
            print(f"| {name} | {loss:.4f} | {regret:+.3f} | {secs:.2f} | {tr:.4f} | {sett} |", flush=True)
            summary.append((fam, name, regret, secs))
    # the target, family by family: regret <= 0.03 in less wall time than TPE-20
    print("\n### Against the target (regret <= 0.03, wall time < optuna TPE 20)\n")
    print("| family | method | regret | wall s | wall / TPE-20's (mean of 5 seeds) |")
    print("|---|---|---:|---:|---:|")
    for fam in args.families:
        mine = {name: (r, s) for f, name, r, s in summary if f == fam}
        tpe = mine["optuna TPE 20, mean of seeds 0-4"][1]
        for name in (
            "optuna TPE 20",
            "optuna TPE 20, mean of seeds 0-4",
            "gradtune constant",
            "gradtune constant, line search, 3 iterations",
        ):
            r, s = mine[name]
            print(f"| {fam} | {name} | {r:+.3f} | {s:.2f} | {s / tpe:.2f} |")


if __name__ == "__main__":
    main()
