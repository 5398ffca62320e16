"""Hypergradients per second: gradtune's engine against `higher` and `torchopt`, side by side.

    pip install -e '.[bench]'
    .venv/bin/python benchmarks/hypergrad_throughput.py            # K = 10, 100, 1000 (~4 min)
    .venv/bin/python benchmarks/hypergrad_throughput.py --ks 10 100 # quicker

One hypergradient = value and gradient w.r.t. (log lr, momentum) of the mean validation loss after K
steps of SGD with momentum, over n tasks (1, or 16 of the same shape): MLP 64-32-10 tanh,
cross-entropy, batch 32, float32, builtin digits (split seeds 0..n-1), one thread. gradtune batches
the n tasks into one unroll (reverse or forward mode); higher and torchopt, as a user would write
them, loop over the tasks. Everything is prepared once (weights, batch orders); the timed call is
the hypergradient alone. The three agree to float32 rounding (the "max rel diff" column).
"""

from __future__ import annotations

import argparse
import math
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.digits_grid import digits_tasks
from benchmarks.peers import Prepared, higher_hypergradient, torchopt_hypergradient
from worker.engine.functional import Objective

LOG_LR, MOMENTUM = math.log(0.01), 0.5
BOUNDS = (0.0, 0.999)


def timed(fn, min_time: float, max_reps: int = 20) -> tuple[float, object]:
    out = fn()  # warm-up (and the value to compare)
    times = []
    while len(times) < max_reps and (sum(times) < min_time or len(times) < 3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if times[-1] > min_time:
            break
    return statistics.median(times), out


def ours(tasks, method):
    obj = Objective(tasks, (0,))
    z = math.log((MOMENTUM - BOUNDS[0]) / (BOUNDS[1] - MOMENTUM))
    s = 1.0 / (1.0 + math.exp(-z))
    dm_dz = (BOUNDS[1] - BOUNDS[0]) * s * (1.0 - s)

    def call():
        loss, (ga, gz) = obj.value_and_grad(LOG_LR, z, BOUNDS, method)
        return loss, [ga, gz / dm_dz]

    return call


def peer(tasks, fn):
    prepared = [Prepared(t, 0) for t in tasks]

    def call():
        loss, ga, gm = 0.0, 0.0, 0.0
        for p in prepared:
            task_loss, (a, m) = fn(p, LOG_LR, MOMENTUM)
            loss, ga, gm = loss + task_loss / len(prepared), ga + a / len(prepared), gm + m / len(prepared)
        return loss, [ga, gm]

    return call


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ks", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--tasks", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--min-time", type=float, default=1.0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    rows = []
    for k in args.ks:
        for n in args.tasks:
            tasks = digits_tasks(n_tasks=n, steps=k)
            impls = {
                "gradtune reverse": ours(tasks, "reverse"),
                "gradtune forward": ours(tasks, "forward"),
                "torchopt": peer(tasks, torchopt_hypergradient),
                "higher": peer(tasks, higher_hypergradient),
            }
            res = {name: timed(fn, args.min_time) for name, fn in impls.items()}
            ref = res["torchopt"][1]
            base = res["torchopt"][0]
            for name, (sec, (loss, g)) in res.items():
                diff = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip([loss, *g], [ref[0], *ref[1]], strict=True))
                rows.append((k, n, name, 1.0 / sec, base / sec, diff))
                print(
                    f"K={k:5d} tasks={n:2d} {name:17s} {1.0 / sec:9.2f} hg/s  x{base / sec:6.2f} vs torchopt  "
                    f"max rel diff {diff:.1e}",
                    flush=True,
                )
    print()
    print("|     K | tasks | implementation    | hypergradients/s | vs torchopt | max rel diff |")
    print("|------:|------:|-------------------|-----------------:|------------:|-------------:|")
    for k, n, name, hps, ratio, diff in rows:
        print(f"| {k:5d} | {n:5d} | {name:17s} | {hps:16.2f} | {ratio:10.2f}x | {diff:12.1e} |")


if __name__ == "__main__":
    main()
