"""One short run for a GPU machine: check the engine on CUDA against CPU float64, then time batched
hypergradients for 1 to 1024 same-shape tasks on CUDA and, side by side, on the CPU. Not needed by
the tests.

    .venv/bin/python benchmarks/gpu.py                    # on a machine with CUDA: the whole run
    .venv/bin/python benchmarks/gpu.py --device cpu --max-tasks 16   # CPU rows only, anywhere

Without CUDA (and without ``--device cpu``) it says so and exits 2 before computing anything.

Check: synthetic tasks (MLP 64-32-10 tanh, batch 32, 50 steps) in float64 on the device and on the
CPU; loss and hypergradient (reverse, forward, truncated; constant and per-layer x 2 segments) must
agree to 1e-9 relative. Timing: float32, K = 100 steps, reverse mode, n tasks x 1 draw in one
batched unroll (tasks 1, 4, 16, 64, 256, 1024); seconds per hypergradient on the device, the same
divided by one task's (the target: 1024 tasks within 2x one task's time), and the CPU peer with
``--cpu-threads`` threads (default 1, a worker's GRADTUNE_TORCH_THREADS default) up to
``--cpu-max-tasks`` tasks. Exit 0 only when every check agrees.
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

TARGET_RATIO = 2.0  # 1024 tasks within 2x one task's time


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


def seconds_per_hypergradient(n: int, device: str, min_reps: int, min_seconds: float) -> float:
    """One batched reverse hypergradient of n tasks: a warm-up call, then at least ``min_reps`` timed
    calls and ``min_seconds`` seconds."""
    obj = Objective(synthetic(n, 100, torch.float32, device), (0,), max_runs=4096)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    obj.value_and_grad(math.log(0.01), 0.0, (0.0, 0.999))
    sync()
    reps, t0 = 0, time.perf_counter()
    while reps < min_reps or time.perf_counter() - t0 < min_seconds:
        obj.value_and_grad(math.log(0.01), 0.0, (0.0, 0.999))
        reps += 1
    sync()
    return (time.perf_counter() - t0) / reps


def sizes(max_tasks: int) -> list[int]:
    out, n = [], 1
    while n <= max_tasks:
        out.append(n)
        n *= 4
    if out[-1] != max_tasks and max_tasks > out[-1]:
        out.append(max_tasks)
    return out


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def timing(device: str, max_tasks: int, cpu_max_tasks: int, cpu_threads: int) -> float | None:
    """Print the table; returns the device's time for the most tasks over its time for one."""
    on_gpu = device != "cpu"
    torch.set_num_threads(cpu_threads)
    print(f"\nfloat32, K = 100, reverse; CPU: {cpu_threads} thread(s)")
    head = "| tasks |"
    rule = "|------:|"
    if on_gpu:
        head += f" {device} s / hypergradient | x one task | {device} task-hypergradients / s |"
        rule += "------------------------:|-----------:|-------------------------------:|"
    head += " cpu s / hypergradient | cpu x one task | cpu task-hypergradients / s |"
    rule += "----------------------:|---------------:|----------------------------:|"
    print(head + "\n" + rule)
    first: dict[str, float] = {}
    ratio = None
    for n in sizes(max_tasks):
        row = f"| {n:5d} |"
        if on_gpu:
            sec = seconds_per_hypergradient(n, device, 3, 1.0)
            first.setdefault("dev", sec)
            ratio = sec / first["dev"]
            row += f" {sec:23.4f} | {ratio:10.2f} | {n / sec:30.1f} |"
        cpu = seconds_per_hypergradient(n, "cpu", 1, 0.5) if n <= cpu_max_tasks else None
        if cpu is not None:
            first.setdefault("cpu", cpu)
            if not on_gpu:
                ratio = cpu / first["cpu"]
        cpu_ratio = None if cpu is None else cpu / first["cpu"]
        row += f" {fmt(cpu, '21.4f')} | {fmt(cpu_ratio, '14.2f')} | {fmt(None if cpu is None else n / cpu, '27.1f')} |"
        print(row, flush=True)
    return ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (the CPU rows only)")
    ap.add_argument("--max-tasks", type=int, default=1024)
    ap.add_argument("--cpu-max-tasks", type=int, default=256, help="CPU peer rows up to this many tasks")
    ap.add_argument("--cpu-threads", type=int, default=1)
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            f"No CUDA device here (torch {torch.__version__}, torch.cuda.is_available() is false): this "
            "benchmark is for a GPU machine. For the CPU rows only: --device cpu --max-tasks 16",
            file=sys.stderr,
        )
        sys.exit(2)
    started = time.perf_counter()
    name = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else "cpu"
    print(f"torch {torch.__version__} on {args.device} ({name})")
    ok = check(args.device)
    cpu_max = args.cpu_max_tasks if args.device != "cpu" else args.max_tasks
    ratio = timing(args.device, args.max_tasks, cpu_max, args.cpu_threads)
    if ratio is not None and args.device != "cpu":
        verdict = "met" if ratio <= TARGET_RATIO else "not met"
        print(
            f"\n{args.max_tasks} tasks take {ratio:.2f}x one task's time on {args.device} "
            f"(target: within {TARGET_RATIO:g}x): {verdict}"
        )
    print(f"checks: {'all agree' if ok else 'FAILED'}; {time.perf_counter() - started:.0f} s in all")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
