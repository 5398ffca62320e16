"""Hypergradient methods: reverse, forward and truncated agree with each other and with central
finite differences of the reference trainer, in float64; forward's memory does not grow with steps;
"auto" records its choice and why."""

import json
import math
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.helpers.tasks import synthetic_task
from worker.engine import (
    METHODS,
    EngineError,
    MetaConfig,
    choose_method,
    estimate_costs,
    hypergradient,
    init_state,
    momentum_to_param,
    param_to_momentum,
    run_meta,
    train_sgd,
)
from worker.engine.functional import Objective

ROOT = pathlib.Path(__file__).resolve().parents[3]
H = 1e-5


def _reference(tasks, a, z, config):
    mom = param_to_momentum(z, config.momentum_bounds)
    runs = [train_sgd(t, math.exp(a), mom, d) for t in tasks for d in config.draws]
    return sum(runs) / len(runs)


@pytest.mark.parametrize(
    "loss,hidden,activation",
    [
        ("cross_entropy", (8,), "tanh"),
        ("mse", (6, 5), "gelu"),
        ("cross_entropy", (), "relu"),
        ("cross_entropy", (6, 5), "sigmoid"),
        ("mse", (7,), "relu"),
    ],
)
def test_all_methods_agree_with_each_other_and_with_finite_differences(loss, hidden, activation):
    config = MetaConfig(draws=(0, 3), momentum_bounds=(0.1, 0.95))
    tasks = [
        synthetic_task(loss=loss, hidden=hidden, activation=activation, steps=10),
        synthetic_task(loss=loss, hidden=hidden, activation=activation, steps=10, seed=1, n_val=13),
    ]
    a, z = math.log(0.1), momentum_to_param(0.7, config.momentum_bounds)
    fa = (_reference(tasks, a + H, z, config) - _reference(tasks, a - H, z, config)) / (2 * H)
    fz = (_reference(tasks, a, z + H, config) - _reference(tasks, a, z - H, config)) / (2 * H)
    assert abs(fa) > 1e-4 and abs(fz) > 1e-5
    results = {
        "reverse": hypergradient(tasks, a, z, config, method="reverse"),
        "forward": hypergradient(tasks, a, z, config, method="forward"),
        # a window at least as long as the run is the whole run: exactly reverse
        "truncated": hypergradient(
            tasks, a, z, MetaConfig(draws=(0, 3), momentum_bounds=(0.1, 0.95), truncation=10), method="truncated"
        ),
        "truncated-long": hypergradient(
            tasks, a, z, MetaConfig(draws=(0, 3), momentum_bounds=(0.1, 0.95), truncation=500), method="truncated"
        ),
    }
    ref_loss = _reference(tasks, a, z, config)
    rev = results["reverse"][1]
    for name, (value, (ga, gz)) in results.items():
        assert value == pytest.approx(ref_loss, rel=1e-12), name
        assert ga == pytest.approx(fa, rel=1e-5, abs=1e-9), name
        assert gz == pytest.approx(fz, rel=1e-5, abs=1e-9), name
        assert ga == pytest.approx(rev[0], rel=1e-10) and gz == pytest.approx(rev[1], rel=1e-10), name


def test_truncated_is_the_gradient_through_the_last_window_only():
    # Truncation to the last W steps is exactly the derivative w.r.t. values used in those steps
    # alone: with a two-segment schedule whose second block is the window, it is that block's
    # (exact, reverse) hypergradient; and it differs from the full one (the bias).
    config = MetaConfig(draws=(0,))
    tasks = [synthetic_task(steps=10)]
    obj = Objective(tasks, config.draws)
    a, z = math.log(0.2), 0.5
    _, (ta, tz) = obj.value_and_grad(a, z, config.momentum_bounds, "truncated", 5)
    _, (ra, rz) = obj.value_and_grad(a, z, config.momentum_bounds, "reverse")
    _, ga, gz = obj.value_and_grad_values(
        torch.full((1, 2), a, dtype=torch.float64),
        torch.full((1, 2), z, dtype=torch.float64),
        config.momentum_bounds,
        "reverse",
    )
    assert ta == pytest.approx(float(ga[0, 1]), rel=1e-10)
    assert tz == pytest.approx(float(gz[0, 1]), rel=1e-10)
    assert abs(ta - ra) > 0.05 * abs(ra)


def test_unknown_method_and_bad_window_are_errors():
    obj = Objective([synthetic_task(steps=4)], (0,))
    with pytest.raises(ValueError):
        obj.value_and_grad(0.0, 0.0, (0.0, 0.9), "adjoint")
    with pytest.raises(ValueError):
        obj.value_and_grad(0.0, 0.0, (0.0, 0.9), "truncated", 0)
    for kwargs in ({"method": "adjoint"}, {"truncation": 0}, {"schedule_segments": 0}, {"memory_budget_mb": 0}):
        with pytest.raises(EngineError):
            init_state(MetaConfig(**kwargs), 0.1, 0.5)


_MEMORY_PROBE = """
import math, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {root!r})
from tests.helpers.tasks import synthetic_task
from worker.engine.functional import Objective
peaks = []
for steps in (4, 50, 400):  # 4: warm-up (lazy initialisation inside torch)
    task = synthetic_task(features=32, hidden=(64,), n=256, batch=64, steps=steps)
    Objective([task], (0,)).value_and_grad(math.log(0.05), 0.0, (0.0, 0.999), {method!r})
    # VmHWM: this process's peak resident memory (ru_maxrss would inherit the parent's peak)
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
    peaks.append(int(hwm.split()[1]) / 1024.0)
print(peaks[2] - peaks[1])
"""


def _peak_growth_mb(method: str) -> float:
    code = textwrap.dedent(_MEMORY_PROBE.format(root=str(ROOT), method=method))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not pathlib.Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_forward_mode_peak_memory_does_not_grow_with_steps():
    # Peak resident memory of a fresh process after K=50 and then K=400 steps (float64, MLP 32-64-3,
    # batch 64). Reverse keeps about 0.13 MB per step here (about 45 MB more at K=400): the probe
    # sees it, so it would see forward mode growing too.
    reverse = _peak_growth_mb("reverse")
    forward = _peak_growth_mb("forward")
    assert reverse > 20.0
    assert forward < 4.0


def test_auto_chooses_by_memory_and_records_why():
    tasks = [synthetic_task(seed=s, steps=12) for s in range(2)]
    roomy = MetaConfig(iterations=2)
    assert choose_method(tasks, roomy)[0] == "reverse"
    c = estimate_costs(tasks, roomy)
    assert c["forward_mb"] < c["reverse_mb"]  # 12 steps: reverse keeps them all, forward one
    tight = MetaConfig(iterations=2, memory_budget_mb=(c["forward_mb"] + c["reverse_mb"]) / 2)
    method, reason = choose_method(tasks, tight)
    assert method == "forward" and "budget" in reason
    assert choose_method(tasks, MetaConfig(memory_budget_mb=1e-5))[0] == "truncated"
    assert choose_method(tasks, MetaConfig(method="forward"))[0] == "forward"
    records = []
    state = run_meta(tasks, tight, init_state(tight, 0.05, 0.5), 2, on_iteration=records.append)
    assert state["method"] == "forward" and state["method_reason"] == reason
    assert [r["method"] for r in records] == ["forward", "forward"]
    json.dumps(state, allow_nan=False)


@pytest.mark.parametrize("method", METHODS)
def test_meta_loop_runs_with_every_method(method):
    tasks = [synthetic_task(seed=s, n=64, steps=16) for s in range(2)]
    config = MetaConfig(iterations=6, method=method, truncation=16)
    state = run_meta(tasks, config, init_state(config, 1e-3, 0.0), 6)
    assert state["method"] == method
    # truncation covering the whole run is reverse, and forward is exact: identical paths
    assert state["best"]["meta_loss"] < 0.8 * _reference(
        tasks, math.log(1e-3), momentum_to_param(0.0, config.momentum_bounds), config
    )


@pytest.mark.parametrize("hidden,batch", [((8,), 16), ((16, 8), 32), ((), 16)])
def test_reverse_memory_estimate_is_close_to_what_autograd_saves(hidden, batch):
    # what "auto" compares with the budget: the bytes autograd saves for the backward pass
    tasks = [synthetic_task(hidden=hidden, batch=batch, n=64, steps=30, seed=s) for s in range(2)]
    config = MetaConfig(draws=(0, 1))
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    obj = Objective(tasks, config.draws)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        obj.value_and_grad(math.log(0.1), 0.0, config.momentum_bounds, "reverse")
    measured_mb = sum(saved.values()) / 2**20
    estimate = estimate_costs(tasks, config)["reverse_mb"]
    # the spec's model bounds the process's peak (saved tensors, plus the data, the live step and
    # the allocator's slack: tests/gradtune/spec/test_costs_measured.py checks it against peak RSS), so it is
    # an upper bound of what autograd saves, and not a loose one
    assert measured_mb <= estimate <= 2.5 * measured_mb
