"""The constant-pair rows of benchmarks/quality.py over several disjoint train / held-out splits of
each family, with the regret that the family's own optimum scores on each held-out set.

    .venv/bin/python benchmarks/quality_splits.py                       # 3 families x 4 splits of 8 + 8 tasks (~9 min)
    .venv/bin/python benchmarks/quality_splits.py --tasks 32 --splits 2 # 2 splits of 32 + 32 tasks (~13 min)
    .venv/bin/python benchmarks/quality_splits.py --quick               # smoke run

Why: quality.py judges every method on one held-out set of 8 tasks, against the grid chosen on that
very set (the yardstick). A method that learns from other tasks pays that set's sampling noise on
top of its own: the yardstick fits the set, the learner cannot. This script measures how large that
part is. Split s uses tasks [16 s, 16 s + 8) to learn and [16 s + 8, 16 s + 16) to judge (split 0 is
quality.py's split); every row is scored as in quality.py (held-out loss with plain torch.optim.SGD
on JUDGE_DRAWS, regret against that split's own held-out grid). One more row, "family optimum",
is the best pair of the 25 x 6 grid on 64 further tasks of the family (tasks [16 S, 16 S + 64),
disjoint from every split) and 4 training draws: an estimate of what a perfect learner of the
family would answer, whatever its training sample. Its regret on a held-out set is the part of
every learner's regret that comes from that set alone. Rows: the train-grid reference, Optuna TPE-20
(mean of seeds 0-4), random search 20, gradtune's line search with 3 iterations and the stencil
search (MetaConfig(iterations=40)); wall time is the search alone, as in quality.py.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from quality import (
    DEFAULT,
    FAMILIES,
    JUDGE_DRAWS,
    LINE_SEARCH,
    MOMENTA,
    TRAIN_DRAWS,
    Objective,
    evaluate,
    gradtune,
    grid_argmin,
    grid_lrs,
    optuna_tpe,
    random_search,
)

FAMILY_DRAWS = (0, 1, 2, 3)
FAMILY_TASKS = 64


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--splits", type=int, default=4)
    ap.add_argument("--tasks", type=int, default=8, help="train tasks and held-out tasks per split")
    ap.add_argument(
        "--draws",
        type=int,
        default=len(TRAIN_DRAWS),
        help="training draws per train task, for every method (default: quality.py's 2)",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    import optuna  # noqa: F401  (imported before any clock starts)

    class Warm:  # one throwaway study, so that no timed row pays optuna's first-use costs
        def losses(self, lrs, moms):
            return [1.0 for _ in lrs]

    optuna_tpe(Warm(), 12)  # past TPE's 10 start-up trials, so its sampler has run once too

    n, splits, draws = args.tasks, args.splits, tuple(range(args.draws))
    family_tasks = 16 if args.quick else FAMILY_TASKS
    n_lr = 9 if args.quick else 25
    pairs = [(lr, m) for m in MOMENTA for lr in grid_lrs(n_lr)]
    methods = (
        f"family optimum ({family_tasks} other tasks)",
        f"grid {n_lr}x{len(MOMENTA)} on train tasks (reference)",
        "random search 20",
        "optuna TPE 20, mean of seeds 0-4",
        "gradtune constant, line search, 3 iterations",
        "gradtune constant",
    )
    for fam in args.families:
        tasks = FAMILIES[fam](2 * n * splits + family_tasks)
        family_opt = grid_argmin(Objective(tasks[2 * n * splits :], FAMILY_DRAWS), pairs)
        regrets: dict[str, list[float]] = {m: [] for m in methods}
        secs: dict[str, list[float]] = {m: [] for m in methods}
        for s in range(splits):
            train, held = tasks[2 * n * s : 2 * n * s + n], tasks[2 * n * s + n : 2 * n * (s + 1)]

            def score(lr, mom, held=held):
                return evaluate(held, lr, mom, JUDGE_DRAWS)["mean_val_loss"]

            grid = score(*grid_argmin(Objective(held, JUDGE_DRAWS), pairs))
            default = score(*DEFAULT)
            train_obj = Objective(train, draws)

            def regret(lr, mom, grid=grid, default=default, score=score):
                return (score(lr, mom) - grid) / (default - grid)

            def record(name, lr, mom, sec, regret=regret, regrets=regrets, secs=secs):
                regrets[name].append(regret(lr, mom))
                secs[name].append(sec)

            record(methods[0], *family_opt, 0.0)
            t0 = time.perf_counter()
            pair = grid_argmin(train_obj, pairs)
            record(methods[1], *pair, time.perf_counter() - t0)
            t0 = time.perf_counter()
            pair = random_search(train_obj, 20)
            record(methods[2], *pair, time.perf_counter() - t0)
            tpe = []
            for seed in range(5):
                t0 = time.perf_counter()
                lr, mom = optuna_tpe(train_obj, 20, seed=seed)
                sec = time.perf_counter() - t0  # taken before the held-out scoring, which no method pays
                tpe.append((regret(lr, mom), sec))
            regrets[methods[3]].append(sum(r for r, _ in tpe) / 5)
            secs[methods[3]].append(sum(t for _, t in tpe) / 5)
            for name, kw in ((methods[4], {**LINE_SEARCH, "iterations": 3}), (methods[5], {})):
                t0 = time.perf_counter()
                best = gradtune(train, 15 if args.quick else 40, draws=draws, **kw)
                record(name, best["lr"], best["momentum"], time.perf_counter() - t0)
            print(
                f"{fam} split {s}: " + "; ".join(f"{m} {regrets[m][-1]:+.3f}" for m in methods),
                file=sys.stderr,
                flush=True,
            )
        print(
            f"\n### {fam}: {splits} splits of {n} train + {n} held-out tasks, {len(draws)} training draws; "
            f"family optimum lr "
            f"{family_opt[0]:.4g}, momentum {family_opt[1]}\n"
        )
        print(
            "| method | "
            + " | ".join(f"regret, split {s}" for s in range(splits))
            + " | mean regret | splits <= 0.03 | mean wall s | wall / TPE-20's |"
        )
        print("|---|" + "---:|" * (splits + 4))
        tpe_s = statistics.mean(secs[methods[3]])
        for m in methods:
            r, t = regrets[m], statistics.mean(secs[m])
            wall = "- | -" if m == methods[0] else f"{t:.2f} | {t / tpe_s:.2f}"
            print(
                f"| {m} | "
                + " | ".join(f"{x:+.3f}" for x in r)
                + f" | {statistics.mean(r):+.3f} | {sum(x <= 0.03 for x in r)}/{splits} | {wall} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
