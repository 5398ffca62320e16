"""Short-horizon bias: a 2,000-step job learned with exact forward-mode hypergradients against the
same job learned with hypergradients truncated to the last 100 steps.

    .venv/bin/python benchmarks/long_horizon.py           # ~25 s on 2 cores
    .venv/bin/python benchmarks/long_horizon.py --steps 500 --window 25   # quicker

Tasks: the ill-conditioned teacher regression family of benchmarks/quality.py (2 tasks to learn on,
2 held out), MLP [32] tanh, mse, batch 32, K = --steps. Part 1 prints, along a sweep of the learning
rate (momentum 0.5), the exact hypergradient d loss / d log lr (forward mode) next to the truncated
one (reverse through the last W steps): where they disagree in sign, truncation pushes the rate the
wrong way. Part 2 runs the meta-loop as plain hypergradient descent (no population, no stencil:
the hypergradient alone chooses every move; a move is kept only if the full-horizon loss falls) with
each method from lr 1e-3, momentum 0.5, and scores the result on the held-out tasks with
torch.optim.SGD. Part 3 is the bias as a user meets it: the same default meta-loop learned on
runs of K steps or of only W steps, both settings then used for K steps.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.quality import teacher_illcond
from worker.engine import EVAL_DRAWS, MetaConfig, best_settings, evaluate, init_state, momentum_to_param, run_meta
from worker.engine.functional import Objective

START = (1e-3, 0.5)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--window", type=int, default=100)
    ap.add_argument("--iterations", type=int, default=12)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tasks = teacher_illcond(4)
    for t in tasks:
        t.steps = args.steps
    train, held = tasks[:2], tasks[2:]
    bounds = (0.0, 0.999)
    z = momentum_to_param(0.5, bounds)
    obj = Objective(train, (0,))
    print(f"Part 1: d loss / d log lr at momentum 0.5, K = {args.steps}, W = {args.window}\n")
    print("| lr | meta-loss | exact (forward) | truncated | same sign |")
    print("|---:|---:|---:|---:|:---:|")
    for lr in (1e-3, 3e-3, 1e-2, 3e-2, 1e-1):
        loss, (gf, _) = obj.value_and_grad(math.log(lr), z, bounds, "forward")
        _, (gt, _) = obj.value_and_grad(math.log(lr), z, bounds, "truncated", args.window)
        print(f"| {lr:g} | {loss:.4f} | {gf:+.4g} | {gt:+.4g} | {'yes' if gf * gt > 0 else 'NO'} |", flush=True)
    print(f"\nPart 2: hypergradient descent from lr {START[0]:g}, momentum {START[1]}, {args.iterations} iterations\n")
    print("| method | lr | momentum | train meta-loss | held-out loss | wall s |")
    print("|---|---:|---:|---:|---:|---:|")
    before = evaluate(held, *START, EVAL_DRAWS)["mean_val_loss"]
    print(f"| start | {START[0]:g} | {START[1]:.3f} | | {before:.4f} | |")
    for method in ("forward", "truncated"):
        config = MetaConfig(
            iterations=args.iterations,
            method=method,
            truncation=args.window,
            population=False,
            stencil=False,
            draws=(0,),
            step_size=1.0,
            max_step=2.0,
        )
        t0 = time.perf_counter()
        state = run_meta(train, config, init_state(config, *START), args.iterations)
        secs = time.perf_counter() - t0
        best = best_settings(state)
        after = evaluate(held, best["lr"], best["momentum"], EVAL_DRAWS)["mean_val_loss"]
        name = f"{method} (W={args.window})" if method == "truncated" else "forward (exact)"
        cells = f"{best['lr']:.4g} | {best['momentum']:.3f} | {best['meta_loss']:.4f} | {after:.4f} | {secs:.1f}"
        print(f"| {name} | {cells} |", flush=True)
    print(
        f"\nPart 3: the default meta-loop (population + stencil), learned on the full {args.steps}-step runs "
        f"(method forward) or on {args.window}-step runs (a short horizon), both used for {args.steps} steps\n"
    )
    print(f"| learned on | lr | momentum | held-out loss at K = {args.steps} | wall s |")
    print("|---|---:|---:|---:|---:|")
    for horizon in (args.steps, args.window):
        short = teacher_illcond(4)[:2]
        for t in short:
            t.steps = horizon
        config = MetaConfig(iterations=args.iterations, method="forward", draws=(0,))
        t0 = time.perf_counter()
        state = run_meta(short, config, init_state(config, *START), args.iterations)
        secs = time.perf_counter() - t0
        best = best_settings(state)
        after = evaluate(held, best["lr"], best["momentum"], EVAL_DRAWS)["mean_val_loss"]
        print(f"| {horizon} steps | {best['lr']:.4g} | {best['momentum']:.3f} | {after:.4f} | {secs:.1f} |", flush=True)


if __name__ == "__main__":
    main()
