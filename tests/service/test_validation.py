"""check_job and the unroll memory estimate, without HTTP."""

from __future__ import annotations

import re

import pytest

from gradtune.spec import costs
from service.schemas import BUILTIN_DATASETS, BuiltinData, JobCreate, TaskSpec
from service.settings import Settings
from service.validation import (
    builtin_split_sizes,
    check_job,
    estimate_unroll_bytes,
    layer_widths,
    task_io,
)
from service.validation.admission import meta_cost, mlp_cost
from tests.service.conftest import BUILTIN_TASK, INLINE_TASK, job_body


def task(**kw) -> TaskSpec:
    return TaskSpec.model_validate({**BUILTIN_TASK, **kw})


def test_estimate_matches_the_spec_formula_by_hand():
    # digits: 64 features, 10 classes; hidden [32]; batch 32; 100 steps; 2 draws batched; the
    # validation pass aside (the job check counts it).
    t = task()
    params = (64 + 1) * 32 + (32 + 1) * 10  # 2410
    acts = 64 + 2 * 32 + 10  # per example: input, pre- and post-activation, output
    r, s = costs.REVERSE["mlp"], costs.SCREEN["mlp"]
    graph = 100 * (r["P"] * params + r["A"] * 32 * acts)  # every step's graph
    step = s["P"] * params + s["A"] * 32 * acts  # and one step's working memory
    assert estimate_unroll_bytes(t) == int(4 * 2 * (graph + step))


def test_estimate_grows_linearly_in_steps_and_with_batch_and_width():
    base = estimate_unroll_bytes(task(steps=100))
    at200, at300 = estimate_unroll_bytes(task(steps=200)), estimate_unroll_bytes(task(steps=300))
    assert at200 - base == at300 - at200
    assert estimate_unroll_bytes(task(batch_size=64)) > base
    assert estimate_unroll_bytes(task(model={"kind": "mlp", "hidden": [64]})) > base


def test_layer_widths():
    assert layer_widths(task()) == [64, 32, 10]
    assert layer_widths(task(loss="mse")) == [64, 32, 1]
    inline = TaskSpec.model_validate(INLINE_TASK)
    assert layer_widths(inline) == [2, 4, 3]  # labels 0..2
    reg = TaskSpec.model_validate(
        {
            **INLINE_TASK,
            "loss": "mse",
            "data": {**INLINE_TASK["data"], "y_train": [[1.0, 2.0]] * 6, "y_val": [[0.0, 0.0]] * 2},
        }
    )
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
    errors = check_job(job, Settings(max_tasks=1, max_steps=50, max_iterations=2, max_unroll_bytes=1024))
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


# ------------------------------------------------------------------ the whole job


def big_job(n_tasks=4, **task_kw) -> JobCreate:
    tasks = [
        {**BUILTIN_TASK, "data": {"source": "builtin", "name": "digits", "seed": i}, **task_kw} for i in range(n_tasks)
    ]
    # the stencil search: its 45-candidate start sets the peaks these tests reason about
    return JobCreate.model_validate(job_body(*tasks, meta={"iterations": 5, "seed": 0, "search": "stencil"}))


def job_peak(job: JobCreate, settings: Settings) -> int:
    costs_in = [mlp_cost(t, task_io(t)) for t in job.tasks]
    return costs.estimate(costs_in, meta_cost(job, settings)).peak_bytes


def test_the_whole_job_is_admitted_up_to_the_limit_exactly():
    job = big_job(model={"kind": "mlp", "hidden": [256]}, batch_size=128)
    peak = job_peak(job, Settings())
    assert check_job(job, Settings(max_job_memory_bytes=peak)) == []
    (e,) = check_job(job, Settings(max_job_memory_bytes=peak - 1))
    assert e["loc"] == ["body", "tasks"] and e["type"] == "job_too_large"
    assert e["msg"].startswith(f"this job needs about {peak / 2**30:.3g} GiB of memory at its peak")


def test_what_the_refusal_says_would_fit_does_fit():
    """Without a budget the start screens 45 candidates x 8 runs in one unroll and sets the peak;
    under a third of that peak the screens are sub-batched and the job fits; under an eighth the
    forward-mode hypergradient (auto) sets the peak: a smaller batch fits, fewer tasks fit, and
    fewer steps (where auto takes reverse within the unroll budget)."""

    def job(batch=512, n_tasks=4, steps=1000):
        return big_job(n_tasks, model={"kind": "mlp", "hidden": [1024]}, batch_size=batch, steps=steps)

    unbounded = Settings(max_job_memory_bytes=2**60, max_job_flops=1e30)
    costs_in = [mlp_cost(t, task_io(t)) for t in job().tasks]
    est = costs.estimate(costs_in, meta_cost(job(), unbounded))
    assert est.peak_part.name == "start" and est.part("start").runs == 45 * 8
    peak = est.peak_bytes
    assert check_job(job(), unbounded.model_copy(update={"max_job_memory_bytes": peak // 3})) == []
    limited = unbounded.model_copy(update={"max_job_memory_bytes": peak // 8})
    (e,) = check_job(job(), limited)
    msg = e["msg"]
    assert "one hypergradient (forward) differentiates through 8 (task, draw) runs" in msg
    b = int(re.search(r"batch_size <= (\d+)", msg).group(1))
    k = int(re.search(r"at most (\d+) task", msg).group(1))
    s = int(re.search(r"steps <= (\d+)", msg).group(1))
    assert check_job(job(steps=s), limited) == [] and check_job(job(steps=s + 1), limited) != []
    assert check_job(job(batch=b), limited) == [] and check_job(job(batch=b + 1), limited) != []
    assert check_job(job(n_tasks=k), limited) == [] and check_job(job(n_tasks=k + 1), limited) != []


def test_fewer_steps_are_offered_when_the_graph_sets_the_peak():
    def job(steps):
        body = job_body(
            *[{**BUILTIN_TASK, "steps": steps, "batch_size": 64, "model": {"kind": "mlp", "hidden": [512]}}],
            meta={"method": "reverse", "iterations": 3},
        )
        return JobCreate.model_validate(body)

    roomy = Settings(max_unroll_bytes=2**40)
    limited = roomy.model_copy(update={"max_job_memory_bytes": job_peak(job(4000), roomy) // 2})
    (e,) = check_job(job(4000), limited)
    assert "one hypergradient (reverse) differentiates through 2 (task, draw) runs" in e["msg"]
    s = int(re.search(r"steps <= (\d+)", e["msg"]).group(1))
    assert 1000 < s < 4000
    assert check_job(job(s), limited) == [] and check_job(job(s + 1), limited) != []


def job_flops(job: JobCreate, settings: Settings) -> float:
    costs_in = [mlp_cost(t, task_io(t)) for t in job.tasks]
    return costs.estimate(costs_in, meta_cost(job, settings)).flops


def test_the_jobs_compute_is_admitted_up_to_the_limit_exactly():
    job = big_job(model={"kind": "mlp", "hidden": [256]}, batch_size=128)
    flops = job_flops(job, Settings())
    assert check_job(job, Settings(max_job_flops=flops)) == []
    (e,) = check_job(job, Settings(max_job_flops=flops * (1 - 1e-9)))
    assert e["loc"] == ["body", "tasks"] and e["type"] == "job_too_expensive"
    assert e["msg"].startswith(f"this job needs about {flops:.3g} FLOPs of compute, above the limit of ")


def test_what_the_compute_refusal_offers_fits_and_one_more_does_not():
    """Each offer (batch, steps, tasks, iterations) is admitted at its value and refused one above."""

    def job(batch=256, n_tasks=4, steps=1000, iterations=20):
        body = job_body(
            *[
                {
                    **BUILTIN_TASK,
                    "data": {"source": "builtin", "name": "digits", "seed": i},
                    "model": {"kind": "mlp", "hidden": [256]},
                    "batch_size": batch,
                    "steps": steps,
                }
                for i in range(n_tasks)
            ],
            meta={"iterations": iterations},
        )
        return JobCreate.model_validate(body)

    limited = Settings(max_job_flops=job_flops(job(), Settings()) / 3)
    (e,) = check_job(job(), limited)
    assert e["type"] == "job_too_expensive" and "(GRADTUNE_MAX_JOB_FLOPS)" in e["msg"]
    offers = {
        "batch": int(re.search(r"batch_size <= (\d+)", e["msg"]).group(1)),
        "steps": int(re.search(r"steps <= (\d+)", e["msg"]).group(1)),
        "n_tasks": int(re.search(r"at most (\d+) task", e["msg"]).group(1)),
        "iterations": int(re.search(r"iterations <= (\d+)", e["msg"]).group(1)),
    }
    for name, value in offers.items():
        assert check_job(job(**{name: value}), limited) == [], name
        (up,) = check_job(job(**{name: value + 1}), limited)
        assert up["type"] == "job_too_expensive", name


def test_method_forward_is_offered_when_it_fits_and_it_does():
    def job(method="reverse"):
        body = job_body(
            {**BUILTIN_TASK, "steps": 4000, "batch_size": 64, "model": {"kind": "mlp", "hidden": [512]}},
            meta={"method": method, "iterations": 3},
        )
        return JobCreate.model_validate(body)

    roomy = Settings(max_unroll_bytes=2**40)
    limit = max(job_peak(job("forward"), roomy), job_peak(job("reverse"), roomy) // 2)
    limited = roomy.model_copy(update={"max_job_memory_bytes": limit})
    (e,) = check_job(job(), limited)
    assert e["type"] == "job_too_large" and "method: forward" in e["msg"]
    assert check_job(job("forward"), limited) == []
    # offered exactly when the forward job is admitted (the peaks depend on the budget: screens are
    # sub-batched to fit it)
    for limit in (job_peak(job("forward"), roomy) * f for f in (0.3, 0.6, 0.9, 0.99)):
        s = roomy.model_copy(update={"max_job_memory_bytes": int(limit)})
        (e,) = check_job(job(), s)
        assert ("method: forward" in e["msg"]) == (check_job(job("forward"), s) == []), limit


def test_the_job_check_waits_for_the_tasks_to_pass():
    """A task error is reported alone: the whole job is sized only once every task is valid."""
    job = big_job(model={"kind": "mlp", "hidden": [1024]}, batch_size=5000)
    errors = check_job(job, Settings(max_job_memory_bytes=1))
    assert errors and all(e["type"] == "batch_too_large" for e in errors)


def test_the_schemas_cnn_layer_types_are_the_specs():
    import typing

    from gradtune.spec import CNN_LAYER_TYPES
    from service.schemas import CNNLayer

    union = typing.get_args(typing.get_args(CNNLayer)[0])
    types = [t for cls in union for t in typing.get_args(cls.model_fields["type"].annotation)]
    assert sorted(types) == sorted(CNN_LAYER_TYPES)


def test_the_schemas_literals_are_the_specs_vocabularies():
    import typing

    from gradtune import spec
    from service import schemas

    assert typing.get_args(schemas.Activation) == spec.ACTIVATIONS
    assert typing.get_args(schemas.Loss) == spec.LOSSES
    assert typing.get_args(schemas.Status) == spec.STATUSES
    assert typing.get_args(schemas.BuiltinName) == tuple(spec.BUILTIN_DATASETS)
    assert schemas.BUILTIN_DATASETS is spec.BUILTIN_DATASETS and schemas.ACTIVATIONS is spec.ACTIVATIONS
