"""check_job and the unroll memory estimate, without HTTP."""

from __future__ import annotations

import pytest

from service.schemas import BUILTIN_DATASETS, BuiltinData, JobCreate, TaskSpec
from service.settings import Settings
from service.validation import (
    builtin_split_sizes,
    check_job,
    estimate_unroll_bytes,
    layer_widths,
)
from tests.service.conftest import BUILTIN_TASK, INLINE_TASK, job_body


def task(**kw) -> TaskSpec:
    return TaskSpec.model_validate({**BUILTIN_TASK, **kw})


def test_estimate_matches_the_documented_formula_by_hand():
    # digits: 64 features, 10 classes; hidden [32]; batch 32; 100 steps.
    t = task()
    params = (64 + 1) * 32 + (32 + 1) * 10  # 2410
    acts = 32 * (64 + 2 * 32 + 10)  # 4416
    assert estimate_unroll_bytes(t) == 4 * (100 * (3 * params + 2 * acts) + 2 * params)


def test_estimate_grows_linearly_in_steps_and_with_batch_and_width():
    base = estimate_unroll_bytes(task(steps=100))
    assert estimate_unroll_bytes(task(steps=200)) - base == estimate_unroll_bytes(task(steps=300)) - estimate_unroll_bytes(task(steps=200))
    assert estimate_unroll_bytes(task(batch_size=64)) > base
    assert estimate_unroll_bytes(task(model={"kind": "mlp", "hidden": [64]})) > base


def test_layer_widths():
    assert layer_widths(task()) == [64, 32, 10]
    assert layer_widths(task(loss="mse")) == [64, 32, 1]
    inline = TaskSpec.model_validate(INLINE_TASK)
    assert layer_widths(inline) == [2, 4, 3]  # labels 0..2
    reg = TaskSpec.model_validate({**INLINE_TASK, "loss": "mse",
                                   "data": {**INLINE_TASK["data"], "y_train": [[1.0, 2.0]] * 6, "y_val": [[0.0, 0.0]] * 2}})
    assert layer_widths(reg) == [2, 4, 2]


@pytest.mark.parametrize("name", sorted(BUILTIN_DATASETS))
def test_builtin_split_sizes_partition_the_dataset(name):
    n = BUILTIN_DATASETS[name]["n"]
    train, val = builtin_split_sizes(BuiltinData(source="builtin", name=name, val_fraction=0.2))
    assert train + val == n and val == max(1, round(n * 0.2))
    train, val = builtin_split_sizes(BuiltinData(source="builtin", name=name, val_fraction=0.0001))
    assert val == 1


def test_default_job_and_the_issue_example_pass():
    settings = Settings()
    assert check_job(JobCreate.model_validate(job_body()), settings) == []
    digits = job_body(*[{**BUILTIN_TASK, "data": {"source": "builtin", "name": "digits", "seed": s}} for s in range(4)])
    assert check_job(JobCreate.model_validate(digits), settings) == []


def test_limits_come_from_settings():
    job = JobCreate.model_validate(job_body(BUILTIN_TASK, BUILTIN_TASK))
    errors = check_job(job, Settings(max_tasks=1, max_steps=50, max_iterations=2,
                                     max_unroll_bytes=1024))
    assert {tuple(e["loc"]) for e in errors} == {
        ("body", "tasks"),
        ("body", "meta", "iterations"),
        ("body", "tasks", 0, "steps"),
        ("body", "tasks", 1, "steps"),
    }
    assert sum(e["type"] == "unroll_too_large" for e in errors) == 2
    for e in errors:
        assert set(e) == {"loc", "msg", "type"} and e["msg"]


def test_huge_label_is_caught_by_the_memory_estimate():
    # A label of 10^9 means a 10^9-wide output layer.
    body = job_body({**INLINE_TASK, "data": {**INLINE_TASK["data"], "y_train": [0, 1, 0, 1, 0, 10**9]}})
    errors = check_job(JobCreate.model_validate(body), Settings())
    assert [e["type"] for e in errors] == ["unroll_too_large"]
