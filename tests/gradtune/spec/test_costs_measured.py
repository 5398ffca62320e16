"""The cost model against the memory the engine really takes: each case runs the real engine in a
fresh process (benchmarks/cost_model.py: peak resident memory minus the resident memory once torch
is imported and the tasks built) and the spec's estimate must bound it from above, within 2x.

Cases are large enough (100-500 MB) that the measurement is not noise and small enough to run in a
few seconds; they are ones whose measurement repeats within a few percent (docs/cost_model.md).
"""

from __future__ import annotations

import os

import pytest

from benchmarks.cost_model import CASES, estimate, measure

pytestmark = pytest.mark.skipif(
    not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's /proc/self/clear_refs to reset the peak"
)

MEASURED = [
    "mlp [1024] B512 screen",  # a forward screening batch: 9 candidates x 2 tasks x 2 draws
    "mlp [1024] B256 reverse",  # a reverse hypergradient of 2 tasks x 2 draws batched, 30 steps
    "cnn c16 16x16 B128 reverse",  # the module path (vmap, functional_call), 10 steps
]


@pytest.mark.parametrize("name", MEASURED)
def test_the_estimate_bounds_the_measured_peak_within_2x(name):
    case = next(c for c in CASES if c["name"] == name)
    got = measure(case, timeout=300)
    est = estimate(case)["bytes"]
    assert got["measured"] > 50 * 2**20, got  # big enough to mean something
    assert est >= got["measured"], (est / 2**20, got["measured"] / 2**20)
    assert est <= 2 * got["measured"], (est / 2**20, got["measured"] / 2**20)
