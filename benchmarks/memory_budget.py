"""A job near the memory budget runs with the worker's peak RSS under the budget.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/memory_budget.py                  # budgets 300, 450, 600 MB
    PYTHONPATH=$PWD .venv/bin/python benchmarks/memory_budget.py --budgets 400 --unbounded

The job: 4 mlp tasks (in 256, hidden [1024], 10 classes, batch 8, 5 steps, float32, random data),
2 draws, the default start population (45 candidates x 8 sources: about 2.4 GB in one unroll),
two meta-iterations (the start, a reverse hypergradient, a stencil screen). Each budget runs in a
fresh process, one torch thread: it warms the engine up on a tiny copy, reads its resident memory
(VmRSS), resets the peak (``/proc/self/clear_refs``), builds the tasks and runs the meta-loop with
``MetaConfig(job_memory_mb=budget)`` (what the worker passes from GRADTUNE_MAX_JOB_MEMORY_BYTES:
screens sub-batched to fit), and reads the peak (VmHWM). growth = peak - resident before; the
estimate is the spec's peak of the same job under that budget (plan.job_estimate), which the API
admits against the budget. ``--unbounded`` adds a row without a budget (one unroll per screen).
docs/benchmarks.md has the table this prints.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
MB = 1024.0 * 1024.0
JOB = {"tasks": 4, "in": 256, "hidden": [1024], "out": 10, "batch": 8, "steps": 5, "n_train": 512, "n_val": 64}


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def _tasks(job: dict, small: bool = False) -> list:
    import torch

    from worker.engine.tasks import Task

    gen = torch.Generator().manual_seed(0)
    n_train, n_val = (16, 4) if small else (job["n_train"], job["n_val"])
    width = 4 if small else job["in"]
    hidden = (2,) if small else tuple(job["hidden"])
    return [
        Task(
            name=f"t{i}",
            x_train=torch.randn(n_train, width, generator=gen),
            y_train=torch.randint(0, job["out"], (n_train,), generator=gen),
            x_val=torch.randn(n_val, width, generator=gen),
            y_val=torch.randint(0, job["out"], (n_val,), generator=gen),
            hidden=hidden,
            activation="tanh",
            loss="cross_entropy",
            out_features=job["out"],
            steps=job["steps"],
            batch_size=4 if small else job["batch"],
            seed=i,
        )
        for i in range(job["tasks"])
    ]


def _config(budget_mb: float | None):
    from worker.engine.meta import MetaConfig

    return MetaConfig(iterations=2, method="reverse", job_memory_mb=budget_mb)


def one(budget_mb: float | None, job: dict) -> dict:
    """Run the job in this process under the budget: {"base", "peak", "growth", "estimate", "seconds"}."""
    import torch

    from worker.engine import plan
    from worker.engine.meta import init_state, run_meta

    torch.set_num_threads(1)
    config = _config(budget_mb)
    run_meta(_tasks(job, small=True), config, init_state(config, 0.01, 0.9), 2)  # torch's lazy initialisation
    base = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM := the current RSS
        f.write("5")
    t0 = time.perf_counter()
    tasks = _tasks(job)
    run_meta(tasks, config, init_state(config, 0.01, 0.9), 2)
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM")
    est = plan.job_estimate(tasks, config)
    return {
        "base": base,
        "peak": peak,
        "growth": peak - base,
        "estimate": est.peak_bytes,
        "start_candidates": est.part("start").candidates,
        "seconds": seconds,
    }


def measure(budget_mb: float | None, job: dict = JOB, timeout: float = 600.0) -> dict:
    """one() in a fresh process (PYTHONPATH: this checkout)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-W", "ignore", __file__, "--one", json.dumps({"budget": budget_mb, "job": job})],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if out.returncode != 0:
        raise RuntimeError(f"budget {budget_mb}: the run failed\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=float, nargs="*", default=[300.0, 450.0, 600.0], help="MB")
    parser.add_argument("--unbounded", action="store_true", help="a row without a budget too")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        spec = json.loads(args.one)
        print(json.dumps(one(spec["budget"], spec["job"])))
        return
    print(f"job: {JOB}, 2 draws, 45 start candidates, 2 iterations (reverse)")
    print(
        "| budget MB | estimate MB | estimate / budget | start candidates per unroll "
        "| growth MB | growth / budget | s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    rows: list[float | None] = list(args.budgets) + ([None] if args.unbounded else [])
    for budget in rows:
        r = measure(budget)
        b = "none" if budget is None else f"{budget:g}"
        est_ratio = "" if budget is None else f"{r['estimate'] / MB / budget:.2f}"
        ratio = "" if budget is None else f"{r['growth'] / MB / budget:.2f}"
        print(
            f"| {b} | {r['estimate'] / MB:.0f} | {est_ratio} | {r['start_candidates']} | "
            f"{r['growth'] / MB:.0f} | {ratio} | {r['seconds']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
