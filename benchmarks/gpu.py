"""One short run for a GPU machine: check the engine on CUDA against CPU float64, then time batched
hypergradients for 1 to 1024 same-shape tasks. Not needed by the tests.

    .venv/bin/python benchmarks/gpu.py                         # on a machine with CUDA
    .venv/bin/python benchmarks/gpu.py --device cpu --max-tasks 16   # smoke run anywhere

Check: synthetic tasks (MLP 64-32-10 tanh, batch 32, 50 steps) in float64 on the device and on the
CPU; loss and hypergradient (reverse, forward, truncated; constant and per-layer x 2 segments) must
agree to 1e-9 relative. Timing: float32, K = 100, reverse mode, n tasks x 1 draw in one batched
unroll; prints seconds per hypergradient and task-hypergradients per second.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from worker.engine import Task
from worker.engine.functional import Objective


def synthetic(n: int, steps: int, dtype, device, rows: int = 512) -> list[Task]:
    tasks = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(rows + 128, 64, generator=g, dtype=torch.float64)
        y = (x @ torch.randn(64, 10, generator=g, dtype=torch.float64)).argmax(1)
        x = x.to(dtype=dtype, device=device)
        y = y.to(device)
        split = (x[:rows], y[:rows], x[rows:], y[rows:])
        tasks.append(Task(f"syn{i}", *split, (32,), "tanh", "cross_entropy", 10, steps, 32, i))
    return tasks


def check(device: str) -> bool:
    ok = True
    bounds = (0.0, 0.999)
    a1 = torch.tensor([[math.log(0.05)]], dtype=torch.float64)
    z1 = torch.tensor([[0.5]], dtype=torch.float64)
    a2 = torch.tensor([[math.log(0.05), math.log(0.1)], [math.log(0.02), math.log(0.04)]], dtype=torch.float64)
    z2 = torch.tensor([[0.5, 1.0], [0.0, -0.5]], dtype=torch.float64)
    cpu = Objective(synthetic(3, 50, torch.float64, "cpu"), (0, 1))
    dev = Objective(synthetic(3, 50, torch.float64, device), (0, 1))
    for name, a, z in (("constant", a1, z1), ("per-layer x 2 segments", a2, z2)):
        for method in ("reverse", "forward", "truncated"):
            w = 20 if method == "truncated" else None
            lc, gac, gzc = cpu.value_and_grad_values(a, z, bounds, method, w)
            ld, gad, gzd = dev.value_and_grad_values(a, z, bounds, method, w)
            ref = torch.cat([torch.tensor([lc]), gac.flatten(), gzc.flatten()])
            got = torch.cat([torch.tensor([ld]), gad.flatten().cpu(), gzd.flatten().cpu()])
            err = float(((got - ref).abs() / ref.abs().clamp_min(1e-12)).max())
            good = err < 1e-9
            ok &= good
            print(f"check {name:24s} {method:9s} max rel diff vs CPU float64 {err:.1e} {'ok' if good else 'FAIL'}")
    return ok


def timing(device: str, max_tasks: int) -> None:
    print("\n| tasks | s / hypergradient | task-hypergradients / s |")
    print("|------:|------------------:|------------------------:|")
    n = 1
    while n <= max_tasks:
        obj = Objective(synthetic(n, 100, torch.float32, device), (0,), max_runs=4096)
        obj.value_and_grad(math.log(0.01), 0.0, (0.0, 0.999))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        reps, t0 = 0, time.perf_counter()
        while reps < 3 or time.perf_counter() - t0 < 1.0:
            obj.value_and_grad(math.log(0.01), 0.0, (0.0, 0.999))
            reps += 1
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        sec = (time.perf_counter() - t0) / reps
        print(f"| {n:5d} | {sec:17.4f} | {n / sec:23.1f} |", flush=True)
        n *= 4 if n < 1024 else 2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--max-tasks", type=int, default=1024)
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("No CUDA device here; use --device cpu for a smoke run.")
        sys.exit(2)
    if args.device == "cpu":
        torch.set_num_threads(1)
    print(f"torch {torch.__version__} on {args.device}")
    ok = check(args.device)
    timing(args.device, args.max_tasks)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
