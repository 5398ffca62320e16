"""The default search (gradtune.spec.hyper.default_search): meta.search and meta.iterations, when a
job does not give them, follow whether it learns per-layer or scheduled values (the stencil for a
pair, the line search for richer values); the constant pair's share of a line search is at most
LINE_PAIR_ITERATIONS; the worker and the cost model agree."""

import pytest

from gradtune.spec.hyper import LINE_PAIR_ITERATIONS, constant_fraction, default_iterations
from service.schemas import JobCreate
from service.settings import get_settings
from service.validation.admission import meta_cost
from tests.e2e.conftest import small_job


def _job(meta: dict | None = None, **hyper) -> JobCreate:
    spec = small_job()
    spec.pop("meta", None)
    if meta is not None:
        spec["meta"] = meta
    spec["hyperparameters"].update(hyper)
    return JobCreate.model_validate(spec)


@pytest.mark.parametrize(
    "meta, hyper, search, iterations",
    [
        (None, {}, "stencil", 40),
        ({"seed": 3}, {"schedule_segments": 1}, "stencil", 40),
        ({}, {"per_layer": True}, "line", 13),
        ({"seed": 3}, {"schedule_segments": 4}, "line", 13),
        ({"search": "line"}, {}, "line", 5),
        ({"search": "stencil"}, {"per_layer": True}, "stencil", 40),
        ({"iterations": 7}, {"per_layer": True}, "line", 7),  # given: kept
        ({"iterations": 7}, {}, "stencil", 7),
    ],
)
def test_iterations_follow_the_search_and_the_values(meta, hyper, search, iterations):
    job = _job(meta, **hyper)
    assert (job.meta.search, job.meta.iterations) == (search, iterations)


def test_the_pair_gets_at_most_its_iterations_of_a_line_search_and_the_worker_agrees():
    from worker import runner

    for iterations in range(1, 60):
        budget = int(iterations * constant_fraction("line", iterations))
        assert budget == min(LINE_PAIR_ITERATIONS, iterations // 2) or (iterations == 1 and budget == 0)
        assert int(iterations * constant_fraction("stencil", iterations)) == iterations // 2
    job = _job({}, per_layer=True)
    config = runner.meta_config(job)
    assert config.iterations == default_iterations("line", True) == 13
    assert int(config.iterations * config.constant_fraction) == LINE_PAIR_ITERATIONS
    assert meta_cost(job, get_settings()).constant_fraction == config.constant_fraction


def test_loose_values_are_read_as_pydantic_reads_them_and_null_meta_is_refused():
    assert _job(None, per_layer="false").meta.search == "stencil"
    assert _job(None, schedule_segments="1").meta.search == "stencil"
    assert _job(None, schedule_segments="3").meta.search == "line"
    spec = small_job()
    spec["meta"] = None
    with pytest.raises(ValueError, match="meta"):
        JobCreate.model_validate(spec)
