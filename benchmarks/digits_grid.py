"""Learned (lr, momentum) against a dense grid of constant settings on builtin digits.

    .venv/bin/python benchmarks/digits_grid.py            # full benchmark (about 2 minutes, 2 cores)
    .venv/bin/python benchmarks/digits_grid.py --quick    # smaller grid, for a smoke run

Four tasks (digits split seeds 0..3, task.seed = split seed), MLP [32] tanh, cross-entropy, 100
steps of batch 32, float32, one thread. The meta-loop trains on MetaConfig().draws; every row of the
table is scored the same way, by evaluate(tasks, lr, momentum, EVAL_DRAWS), i.e. by plain
torch.optim.SGD on initialisations and batch orders the meta-loop never saw.

Rows: the best grid point scored on the evaluation draws themselves (optimistic: chosen on the
draws it is scored on), the grid point a user could choose honestly (best on the meta-loop's
training draws, then scored), the start, the learned settings, and ablations of the meta-loop.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from worker.datasets import load_builtin
from worker.engine import EVAL_DRAWS, MetaConfig, Task, best_settings, evaluate, init_state, run_meta

START = (0.01, 0.9)
FAR_START = (0.001, 0.0)  # two decades of effective learning rate below the basin
MOMENTA = (0.0, 0.5, 0.8, 0.9, 0.95, 0.99)


def digits_tasks(n_tasks: int = 4, steps: int = 100) -> list[Task]:
    tasks = []
    for seed in range(n_tasks):
        xt, yt, xv, yv = load_builtin("digits", val_fraction=0.2, seed=seed)
        tasks.append(
            Task(
                name=f"digits-split{seed}",
                x_train=torch.from_numpy(xt),
                y_train=torch.from_numpy(yt),
                x_val=torch.from_numpy(xv),
                y_val=torch.from_numpy(yv),
                hidden=(32,),
                activation="tanh",
                loss="cross_entropy",
                out_features=10,
                steps=steps,
                batch_size=32,
                seed=seed,
            )
        )
    return tasks


def lr_grid(n: int) -> list[float]:
    lo, hi = math.log10(1e-3), math.log10(3.0)
    return [10 ** (lo + (hi - lo) * i / (n - 1)) for i in range(n)]


def learn(tasks, config, start=START):
    t0 = time.perf_counter()
    records = []
    state = run_meta(tasks, config, init_state(config, *start), config.iterations, on_iteration=records.append)
    best = best_settings(state)
    working = sum(r["phase"] != "converged" for r in records)
    return best["lr"], best["momentum"], time.perf_counter() - t0, working


def grid_search(tasks, draws, lrs):
    t0 = time.perf_counter()
    scored = []
    for mom in MOMENTA:
        for lr in lrs:
            scored.append((evaluate(tasks, lr, mom, draws)["mean_val_loss"], lr, mom))
    loss, lr, mom = min(scored)
    return lr, mom, loss, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 learning rates instead of 25, no honest grid")
    parser.add_argument("--iterations", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tasks = digits_tasks()
    base = MetaConfig(iterations=args.iterations)
    lrs = lr_grid(8 if args.quick else 25)

    rows = []  # (label, lr, momentum, seconds to choose, meta-iterations that computed something)
    g_lr, g_mom, g_loss, g_time = grid_search(tasks, EVAL_DRAWS, lrs)
    rows.append((f"grid best ({len(lrs)}x{len(MOMENTA)}, chosen on eval draws)", g_lr, g_mom, g_time, None))
    if not args.quick:
        h_lr, h_mom, _, h_time = grid_search(tasks, base.draws, lrs)
        rows.append((f"grid, chosen on training draws {base.draws}", h_lr, h_mom, h_time, None))
    rows.append(("start", *START, 0.0, None))
    variants = [
        ("learned (default: population + stencil + hypergradient)", base),
        ("ablation: no population", MetaConfig(iterations=args.iterations, population=False)),
        ("ablation: no stencil (hypergradient moves only)", MetaConfig(iterations=args.iterations, stencil=False)),
        (
            "ablation: neither (plain accept/reject hypergradient descent)",
            MetaConfig(iterations=args.iterations, population=False, stencil=False),
        ),
    ]
    for label, config in variants:
        rows.append((label, *learn(tasks, config)))
    rows.append((f"far start {FAR_START}", *FAR_START, 0.0, None))
    rows.append(("  learned from the far start (default)", *learn(tasks, base, FAR_START)))
    no_pop = MetaConfig(iterations=args.iterations, population=False)
    rows.append(("  learned from the far start, no population", *learn(tasks, no_pop, FAR_START)))

    print(f"digits, 4 tasks, MLP [32] tanh, 100 steps, batch 32, float32; scored on EVAL_DRAWS={EVAL_DRAWS}")
    print(
        f"| {'settings':62s} | {'lr':>8s} | {'momentum':>8s} | {'val loss':>8s} | {'ratio':>6s} "
        f"| {'time s':>7s} | {'iters':>5s} |"
    )
    print(f"|{'-' * 64}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 8}|{'-' * 9}|{'-' * 7}|")
    for label, lr, mom, seconds, iters in rows:
        loss = evaluate(tasks, lr, mom, EVAL_DRAWS)["mean_val_loss"]
        it = "" if iters is None else str(iters)
        print(
            f"| {label:62s} | {lr:8.4g} | {mom:8.4f} | {loss:8.4f} | {loss / g_loss:6.3f} | {seconds:7.1f} | {it:>5s} |"
        )
    print("ratio: val loss / grid best. time s: wall time to choose the settings (grid: all its")
    print("evaluations; learned: run_meta). iters: meta-iterations before convergence (of the budget).")


if __name__ == "__main__":
    main()
