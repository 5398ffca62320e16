"""The cost model (gradtune/spec/costs.py) against the memory the engine really takes.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/cost_model.py              # every case 3 times, ~3 min on 2 cores
    PYTHONPATH=$PWD .venv/bin/python benchmarks/cost_model.py --only cnn   # cases whose name has "cnn"
    PYTHONPATH=$PWD .venv/bin/python benchmarks/cost_model.py --slopes     # the slopes behind the constants

Each case runs in a fresh process, one torch thread, float32, random data: it builds the tasks,
warms the same kind of evaluation up on a tiny copy (torch's lazy initialisation is not the
case's), reads its resident memory (VmRSS), resets the peak (``/proc/self/clear_refs``), builds
the engine's objective (functional.Objective for mlps, modules.ModuleObjective for cnns), runs one
evaluation (a forward screening batch of candidates, or one hypergradient by a method) and reads
the peak (VmHWM). measured = peak - resident before; the estimate is the spec's for the same
evaluation: the objective's prepared data plus the larger of its build-time copies and the
evaluation's working memory (the tasks' own tensors are in the resident memory before).
docs/cost_model.md has the table this prints.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
MB = 1024.0 * 1024.0

# A case: the model, the data sizes, the batching (tasks x draws x candidates) and the evaluation.
MLP = {"kind": "mlp", "in": 64, "out": 10, "activation": "tanh"}
CNN_LAYERS = [
    {"type": "conv2d", "out_channels": 16, "kernel_size": 3, "padding": 1},
    {"type": "relu"},
    {"type": "maxpool", "kernel_size": 2},
    {"type": "flatten"},
    {"type": "linear", "out_features": 32},
    {"type": "relu"},
    {"type": "linear"},
]
CNN = {"kind": "cnn", "in": [1, 16, 16], "out": 10, "layers": CNN_LAYERS}


def _case(
    name: str,
    model: dict,
    mode: str,
    batch: int,
    steps: int,
    tasks: int = 1,
    draws: int = 2,
    candidates: int = 1,
    n_train: int = 1024,
    n_val: int = 128,
    truncation: int = 20,
    segments: int = 1,
) -> dict:
    return {
        "name": name,
        "model": model,
        "mode": mode,
        "batch": batch,
        "steps": steps,
        "tasks": tasks,
        "draws": draws,
        "candidates": candidates,
        "n_train": n_train,
        "n_val": n_val,
        "truncation": truncation,
        "segments": segments,
    }


CASES = [
    # mlp path: a batch of activations, then a large parameter count, for each kind of evaluation
    _case("mlp [1024] B512 screen", {**MLP, "hidden": [1024]}, "screen", 512, 5, tasks=2, candidates=9),
    _case(
        "mlp [256,256] B16 screen", {**MLP, "in": 256, "hidden": [256, 256]}, "screen", 16, 5, tasks=4, candidates=16
    ),
    _case("mlp [512] B64 V2048 screen", {**MLP, "hidden": [512]}, "screen", 64, 5, tasks=2, candidates=9, n_val=2048),
    _case("mlp 16 tasks [64] B64 screen x20", {**MLP, "hidden": [64]}, "screen", 64, 5, tasks=16, candidates=20),
    _case("mlp [32] B256 T3000 screen", {**MLP, "hidden": [32]}, "screen", 256, 3000, tasks=4, candidates=2),
    _case("mlp [1024] B256 reverse", {**MLP, "hidden": [1024]}, "reverse", 256, 30, tasks=2),
    _case("mlp [512,512] B8 reverse", {**MLP, "in": 512, "hidden": [512, 512]}, "reverse", 8, 40, tasks=2),
    _case("mlp [1024] B256 truncated", {**MLP, "hidden": [1024]}, "truncated", 256, 200, tasks=2),
    _case("mlp [1024] B512 forward", {**MLP, "hidden": [1024]}, "forward", 512, 5, tasks=2),
    _case(
        "mlp [512,512] B16 forward H4", {**MLP, "in": 512, "hidden": [512, 512]}, "forward", 16, 5, tasks=2, segments=2
    ),
    _case(
        "mlp [512,512] B2 forward H6",
        {**MLP, "in": 512, "hidden": [512, 512]},
        "forward",
        2,
        6,
        tasks=2,
        n_train=64,
        n_val=2,
        segments=3,
    ),
    # module path (cnn): the same
    _case("cnn c16 16x16 B128 screen", CNN, "screen", 128, 3, tasks=1, candidates=9),
    _case("cnn c16 16x16 B128 reverse", CNN, "reverse", 128, 10, tasks=1),
    _case("cnn c16 16x16 B16 V1024 reverse", CNN, "reverse", 16, 10, tasks=1, n_val=1024),
    _case("cnn c16 16x16 B128 forward", CNN, "forward", 128, 3, tasks=1),
    _case("cnn c16 16x16 B64 forward H4", CNN, "forward", 64, 4, tasks=1, segments=2),
    _case(
        "mlp relu [512,512] B128 reverse",
        {**MLP, "hidden": [512, 512], "activation": "relu"},
        "reverse",
        128,
        20,
        tasks=2,
    ),
    _case(
        "mlp gelu [2048] B256 screen",
        {**MLP, "hidden": [2048], "activation": "gelu"},
        "screen",
        256,
        3,
        tasks=1,
        candidates=8,
    ),
]


# ---------------------------------------------------------------------------- the estimate (no torch)


def model_shapes(model: dict):
    from gradtune.spec.shapes import cnn_shapes, mlp_shapes

    if model["kind"] == "cnn":
        return cnn_shapes(model["layers"], model["in"], model["out"])
    return mlp_shapes(model["in"], model["hidden"], model["out"], model["activation"])


def spec_inputs(case: dict):
    from gradtune.spec.costs import MetaCost, TaskCost

    shapes = model_shapes(case["model"])
    kind = "module" if case["model"]["kind"] == "cnn" else "mlp"
    task = TaskCost(
        params=shapes.params,
        activations=shapes.activations,
        macs=shapes.macs,
        batch_size=case["batch"],
        steps=case["steps"],
        n_train=case["n_train"],
        n_val=case["n_val"],
        in_elements=shapes.in_size,
        out_features=shapes.out_features,
        kind=kind,
        group="same",
    )
    meta = MetaCost(
        method=case["mode"] if case["mode"] != "screen" else "reverse",
        draws=case["draws"],
        truncation=case["truncation"],
        segments=case["segments"],
    )
    return [task] * case["tasks"], meta


def estimate(case: dict) -> dict:
    """The spec's bytes for the case's evaluation: prepared data + max(build copies, working memory)."""
    from gradtune.spec.costs import evaluation, evaluation_peak

    tasks, meta = spec_inputs(case)
    part = evaluation(tasks, meta, case["mode"], case["candidates"])
    return {
        "bytes": evaluation_peak(tasks, meta, case["mode"], case["candidates"]),
        "runs": part.runs,
        "working": part.bytes,
        "flops": part.flops,
    }


# ---------------------------------------------------------------------------- the measurement (a child process)


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def _tasks(case: dict, small: bool = False) -> list:
    """Engine tasks for the case, random data (small: a tiny copy for the warm-up)."""
    import torch

    from worker.engine.tasks import Task

    model = case["model"]
    if small:
        n_train, n_val, batch, steps = 8, 4, 2, max(2, case["segments"])
    else:
        n_train, n_val, batch, steps = case["n_train"], case["n_val"], case["batch"], case["steps"]
    gen = torch.Generator().manual_seed(0)
    in_shape = model["in"] if isinstance(model["in"], list) else [model["in"]]
    tasks = []
    for i in range(case["tasks"]):
        common = dict(
            name=f"t{i}",
            x_train=torch.randn(n_train, *in_shape, generator=gen),
            y_train=torch.randint(0, model["out"], (n_train,), generator=gen),
            x_val=torch.randn(n_val, *in_shape, generator=gen),
            y_val=torch.randint(0, model["out"], (n_val,), generator=gen),
            loss="cross_entropy",
            steps=steps,
            batch_size=batch,
            seed=i,
        )
        if model["kind"] == "cnn":
            from worker.engine.cnn import cnn_task

            tasks.append(cnn_task(**common, layers=model["layers"], out_features=model["out"]))
        else:
            hidden = [2] * len(model["hidden"]) if small else model["hidden"]
            tasks.append(
                Task(**common, hidden=tuple(hidden), activation=model["activation"], out_features=model["out"])
            )
    return tasks


def _objective(case: dict, tasks: list):
    draws = tuple(range(case["draws"]))
    if case["model"]["kind"] == "cnn":
        from worker.engine.modules import ModuleObjective

        return ModuleObjective(tasks, draws)
    from worker.engine.functional import Objective

    return Objective(tasks, draws)


def _run(case: dict, tasks: list) -> None:
    import torch

    obj = _objective(case, tasks)
    k = case["candidates"]
    if case["mode"] == "screen":
        obj.losses([0.01 * (1.0 + 0.01 * i) for i in range(k)], [0.5] * k)
        return
    segs = case["segments"]
    a = torch.full((1, segs), math.log(0.01), dtype=torch.float64)
    z = torch.zeros((1, segs), dtype=torch.float64)
    obj.value_and_grad_values(a, z, (0.0, 0.999), case["mode"], case["truncation"])


def one(case: dict) -> dict:
    """Run the case in this process; {"base", "peak", "measured" (bytes), "seconds"}."""
    import torch

    torch.set_num_threads(1)
    _run(case, _tasks(case, small=True))  # warm-up: torch's lazy initialisation
    tasks = _tasks(case)
    base = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM := the current RSS
        f.write("5")
    t0 = time.perf_counter()
    _run(case, tasks)
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM")
    return {"base": base, "peak": peak, "measured": peak - base, "seconds": seconds}


def measure(case: dict, python: str = sys.executable, timeout: float = 600.0) -> dict:
    """Run the case in a fresh process (PYTHONPATH: this checkout) and return one()'s result."""
    import os

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [python, "-W", "ignore", __file__, "--one", json.dumps(case)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{case['name']}: the measurement failed\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- the slopes (--slopes)

_BIG = {**MLP, "in": 512, "hidden": [512, 512]}  # parameters dominate at batch 2
_WIDE = {**MLP, "hidden": [1024]}  # activations dominate at batch 256+
_CNN_P = {
    **CNN,
    "layers": [
        {"type": "conv2d", "out_channels": 8, "kernel_size": 3, "padding": 1},
        {"type": "relu"},
        {"type": "flatten"},
        {"type": "linear", "out_features": 256},
        {"type": "relu"},
        {"type": "linear"},
    ],
}
# (what, path and mode, case, the same case with one thing changed, what changed)
SLOPES = [
    ("P", "mlp screen", _case("", _BIG, "screen", 2, 3, 2, candidates=8, n_train=64, n_val=2), {"candidates": 16}),
    ("BA", "mlp screen", _case("", _WIDE, "screen", 256, 3, 2, candidates=9, n_val=2), {"batch": 512}),
    ("VA", "mlp screen", _case("", _WIDE, "screen", 2, 3, 2, candidates=9, n_val=1024), {"n_val": 2048}),
    ("P/step", "mlp reverse", _case("", _BIG, "reverse", 2, 20, 2, n_train=64, n_val=2), {"steps": 60}),
    ("BA/step", "mlp reverse", _case("", _WIDE, "reverse", 512, 10, 2, n_val=2), {"steps": 30}),
    ("VA", "mlp reverse", _case("", _WIDE, "reverse", 2, 3, 2, n_val=1024), {"n_val": 4096}),
    ("P", "mlp forward H2", _case("", _BIG, "forward", 2, 3, 2, n_train=64, n_val=2), {"tasks": 4}),
    ("BA", "mlp forward H2", _case("", _WIDE, "forward", 256, 3, 2, n_val=2), {"batch": 512}),
    ("P/tangent", "mlp forward", _case("", _BIG, "forward", 2, 6, 2, n_train=64, n_val=2), {"segments": 3}),
    ("BA/tangent", "mlp forward", _case("", _WIDE, "forward", 256, 6, 2, n_val=2), {"segments": 3}),
    ("P", "cnn screen", _case("", _CNN_P, "screen", 2, 3, 1, candidates=8, n_train=64, n_val=2), {"candidates": 16}),
    ("BA", "cnn screen", _case("", CNN, "screen", 64, 3, 1, candidates=9, n_val=2), {"batch": 192}),
    ("VA", "cnn screen", _case("", CNN, "screen", 2, 3, 1, candidates=9, n_val=512), {"n_val": 1536}),
    ("P/step", "cnn reverse", _case("", _CNN_P, "reverse", 2, 10, 1, n_train=64, n_val=2), {"steps": 30}),
    ("BA/step", "cnn reverse", _case("", CNN, "reverse", 128, 5, 1, n_val=2), {"steps": 15}),
    ("VA", "cnn reverse", _case("", CNN, "reverse", 2, 3, 1, n_val=512), {"n_val": 2048}),
    ("P", "cnn forward H2", _case("", _CNN_P, "forward", 2, 3, 1, n_train=64, n_val=2), {"draws": 6}),
    ("BA", "cnn forward H2", _case("", CNN, "forward", 64, 3, 1, n_val=2), {"batch": 256}),
]


def _runs(case: dict) -> int:
    return case["tasks"] * case["draws"] * case["candidates"]


def slope(what: str, case: dict, change: dict) -> float:
    """Elements per run of the quantity ``what`` (P: per parameter; BA: per batch row and activation;
    VA: per validation row and activation; /step: per step kept; /tangent: per hyperparameter), from
    the measured difference between ``case`` and ``case`` with ``change``."""
    other = {**case, **change}
    diff = (measure(other)["measured"] - measure(case)["measured"]) / 4.0  # float32 elements
    shapes = model_shapes(case["model"])
    unit = {"P": shapes.params, "BA": case["batch"] * shapes.activations, "VA": case["n_val"] * shapes.activations}
    base = what.split("/")[0]
    if base == "VA":  # the mlp path validates one source (a screen's candidates) at a time
        mlp_screen = case["model"]["kind"] == "mlp" and case["mode"] == "screen"
        runs = case["candidates"] if mlp_screen else _runs(case)
        return diff / runs / ((other["n_val"] - case["n_val"]) * shapes.activations)
    if what.endswith("/step"):
        return diff / _runs(case) / (other["steps"] - case["steps"]) / unit[base]
    if what.endswith("/tangent"):
        return diff / _runs(case) / (2 * (other["segments"] - case["segments"])) / unit[base]
    if base == "BA":
        return diff / _runs(case) / ((other["batch"] - case["batch"]) * shapes.activations)
    return diff / (_runs(other) - _runs(case)) / unit[base]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", help="a case as JSON: measure it in this process")
    ap.add_argument("--only", default="", help="only the cases whose name contains this")
    ap.add_argument("--repeat", type=int, default=3, help="measurements per case (fresh processes)")
    ap.add_argument("--slopes", action="store_true", help="measure the slopes the constants come from")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(json.loads(args.one))))
        return
    if args.slopes:
        print("| path, mode | per | measured slope (elements per run) |")
        print("|------------|-----|----------------------------------:|")
        for what, label, case, change in SLOPES:
            if args.only in label:
                print(f"| {label} | {what} | {slope(what, case, change):.2f} |", flush=True)
        return
    rows = []
    for case in CASES:
        if args.only not in case["name"]:
            continue
        est = estimate(case)
        got = [measure(case)["measured"] for _ in range(args.repeat)]
        lo, hi = min(got), max(got)
        rows.append((case, est, lo, hi))
        print(
            f"{case['name']:34s} runs {est['runs']:4d}  estimate {est['bytes'] / MB:8.1f} MB  measured "
            f"{lo / MB:8.1f} - {hi / MB:8.1f} MB  estimate / measured {est['bytes'] / hi:5.2f} - "
            f"{est['bytes'] / max(lo, 1):5.2f}",
            flush=True,
        )
    print()
    print("| case | mode | runs | estimate MB | measured MB (min - max) | estimate / measured |")
    print("|------|------|-----:|------------:|------------------------:|--------------------:|")
    for case, est, lo, hi in rows:
        print(
            f"| {case['name']} | {case['mode']} | {est['runs']} | {est['bytes'] / MB:.0f} | {lo / MB:.0f} - "
            f"{hi / MB:.0f} | {est['bytes'] / hi:.2f} - {est['bytes'] / max(lo, 1):.2f} |"
        )


if __name__ == "__main__":
    main()
