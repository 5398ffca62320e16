"""A job near the memory budget runs with the worker's peak RSS under it (benchmarks/memory_budget.py,
one budget, in a fresh process: about 15-25 s on 2 shared cores)."""

from __future__ import annotations

import importlib.util
import pathlib
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]


def _bench():
    spec = importlib.util.spec_from_file_location("memory_budget", ROOT / "benchmarks" / "memory_budget.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not pathlib.Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_a_job_near_the_budget_stays_under_it():
    bench = _bench()
    budget = 450.0
    job = {**bench.JOB, "steps": 3}
    t0 = time.perf_counter()
    r = bench.measure(budget, job, timeout=120)
    elapsed = time.perf_counter() - t0
    mb = bench.MB
    print(
        f"budget {budget} MB, estimate {r['estimate'] / mb:.0f} MB, growth {r['growth'] / mb:.0f} MB, {elapsed:.1f} s"
    )
    assert 0.8 * budget <= r["estimate"] / mb <= budget  # the job is near the budget, as admitted
    assert r["start_candidates"] < 45  # the start's screen was sub-batched (unbounded: one unroll of 45 x 8)
    assert r["growth"] / mb < budget
    assert elapsed < 60
