"""Hypergradients per second: gradtune's engine against `higher` and `torchopt`, side by side.

    pip install -e '.[bench]'
    .venv/bin/python benchmarks/hypergrad_throughput.py            # K = 10, 100, 1000 (~4 min)
    .venv/bin/python benchmarks/hypergrad_throughput.py --ks 10 100 # quicker
    .venv/bin/python benchmarks/hypergrad_throughput.py --model cnn exported --ks 100

One hypergradient = value and gradient w.r.t. (log lr, momentum) of the mean validation loss after K
steps of SGD with momentum, over n tasks (1, or 16 of the same shape): builtin digits (split seeds
0..n-1), cross-entropy, batch 32, float32, one thread. ``--model``: mlp (64-32-10 tanh, the
default), cnn (the digits as (1, 8, 8) images; conv 8 k3, relu, maxpool 2, flatten, linear: the
engine's module path, modules.ModuleObjective), exported (the same network as a torch.export
program, exported.ProgramModule; the peers train the same nn.Sequential, whose initial weights are
the same). gradtune batches the n tasks into one unroll (reverse or forward mode); higher and
torchopt, as a user would write them, loop over the tasks. Everything is prepared once (weights,
batch orders); the timed call is the hypergradient alone. The three agree to float32 rounding (the
"max rel diff" column).
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
from worker.engine.cnn import cnn_task
from worker.engine.exported import exported_task
from worker.engine.functional import Objective
from worker.engine.modules import ModuleObjective
from worker.engine.tasks import Task

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


CNN_LAYERS = [
    {"type": "conv2d", "out_channels": 8, "kernel_size": 3},
    {"type": "relu"},
    {"type": "maxpool", "kernel_size": 2},
    {"type": "flatten"},
    {"type": "linear"},
]


def image_tasks(n_tasks: int, steps: int) -> list:
    """digits_tasks' splits as (1, 8, 8) images for the cnn."""
    out = []
    for t in digits_tasks(n_tasks=n_tasks, steps=steps):
        xt, xv = t.x_train.reshape(-1, 1, 8, 8), t.x_val.reshape(-1, 1, 8, 8)
        out.append(cnn_task(t.name, xt, t.y_train, xv, t.y_val, CNN_LAYERS, t.loss, 10, steps, t.batch_size, t.seed))
    return out


def exported_tasks(cnns: list) -> list:
    """The cnn tasks with the same network as a torch.export program (read as the service reads it)."""
    import tempfile

    from torch import nn

    from service.exported_files import read_pt2, read_weights

    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(72, 10))
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "net.pt2"
        torch.export.save(torch.export.export(net, (torch.zeros(32, 1, 8, 8),)), str(path))
        program = read_pt2(path)
        weights = read_weights(path, program)
    return [
        exported_task(t.name, t.x_train, t.y_train, t.x_val, t.y_val, program, weights, t.loss, t.steps, 32, t.seed)
        for t in cnns
    ]


def ours(tasks, method):
    obj = Objective(tasks, (0,)) if isinstance(tasks[0], Task) else ModuleObjective(tasks, (0,))
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
    ap.add_argument("--model", nargs="+", default=["mlp"], choices=["mlp", "cnn", "exported"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    rows = []
    for model in args.model:
        for k in args.ks:
            for n in args.tasks:
                peer_tasks = digits_tasks(n_tasks=n, steps=k) if model == "mlp" else image_tasks(n, k)
                tasks = exported_tasks(peer_tasks) if model == "exported" else peer_tasks
                impls = {
                    "gradtune reverse": ours(tasks, "reverse"),
                    "gradtune forward": ours(tasks, "forward"),
                    "torchopt": peer(peer_tasks, torchopt_hypergradient),
                    "higher": peer(peer_tasks, higher_hypergradient),
                }
                res = {name: timed(fn, args.min_time) for name, fn in impls.items()}
                ref = res["torchopt"][1]
                base = res["torchopt"][0]
                for name, (sec, (loss, g)) in res.items():
                    pairs = zip([loss, *g], [ref[0], *ref[1]], strict=True)
                    diff = max(abs(a - b) / max(abs(b), 1e-12) for a, b in pairs)
                    rows.append((model, k, n, name, 1.0 / sec, base / sec, diff))
                    print(
                        f"{model:8s} K={k:5d} tasks={n:2d} {name:17s} {1.0 / sec:9.2f} hg/s  x{base / sec:6.2f} vs "
                        f"torchopt  max rel diff {diff:.1e}",
                        flush=True,
                    )
    print()
    print("| model    |     K | tasks | implementation    | hypergradients/s | vs torchopt | max rel diff |")
    print("|----------|------:|------:|-------------------|-----------------:|------------:|-------------:|")
    for model, k, n, name, hps, ratio, diff in rows:
        print(f"| {model:8s} | {k:5d} | {n:5d} | {name:17s} | {hps:16.2f} | {ratio:10.2f}x | {diff:12.1e} |")


if __name__ == "__main__":
    main()
