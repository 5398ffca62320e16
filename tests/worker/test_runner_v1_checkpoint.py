"""A job checkpointed by the engine before the unified search (state version 1, in the database)
finishes with this one, with the history and settings the old engine would have given."""

from __future__ import annotations

import dataclasses

import pytest
from sqlalchemy import select

from service.db.models import Job, JobIteration
from service.db.session import session_scope
from tests.e2e.conftest import small_job
from tests.worker.engine import legacy_meta_v1 as legacy
from tests.worker.test_runner import _drain, env  # noqa: F401  (fixture)
from worker import engine, runner


def _old_engine(monkeypatch):
    """The runner as it was: the frozen pre-refactor meta-loop (tests/worker/engine/legacy_meta_v1.py)."""
    new_config = runner.meta_config

    def meta_config(job):
        cfg = new_config(job)
        known = {f.name for f in dataclasses.fields(legacy.MetaConfig)}  # later fields did not exist then
        return legacy.MetaConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name in known})

    monkeypatch.setattr(runner, "meta_config", meta_config)
    for name in ("run_meta", "best_settings"):
        monkeypatch.setattr(engine, name, getattr(legacy, name))

    def init_state(config, lr, momentum, table=None):  # no study's table then (the runner passes None)
        assert table is None
        return legacy.init_state(config, lr, momentum)

    monkeypatch.setattr(engine, "init_state", init_state)
    monkeypatch.setattr(engine, "check_rich", lambda tasks, config, state: state)  # no check then


def _records(jid):
    """Every stored iteration record, the engine's whole report (extra) included."""
    with session_scope() as db:
        rows = db.scalars(select(JobIteration).where(JobIteration.job_id == jid).order_by(JobIteration.iteration))
        return [(r.iteration, r.meta_loss, r.lr, r.momentum, r.accepted, r.step_size, r.extra) for r in rows]


def _checkpoint(jid):
    with session_scope() as db:
        return db.get(Job, jid).checkpoint


@pytest.mark.parametrize("hyper", [{}, {"per_layer": True, "schedule_segments": 2}])
def test_a_job_checkpointed_by_the_old_engine_finishes_with_the_new_one(env, monkeypatch, hyper):  # noqa: F811
    client, sent = env  # chunks of 2 iterations
    spec = small_job(iterations=5, tasks=2)
    spec["meta"]["search"] = "stencil"  # the old engine's search (the line search's table moves changed since)
    spec["hyperparameters"].update(hyper)
    old_job = client.post("/v1/jobs", json=spec).json()["id"]
    mixed_job = client.post("/v1/jobs", json=spec).json()["id"]
    with monkeypatch.context() as m:
        _old_engine(m)
        sent.append((old_job, 0))
        assert _drain(sent) == ["committed"] * 3 + ["succeeded"]
        assert runner.run_chunk(mixed_job, 0, owner="old") == "committed"
        sent.clear()
    assert _checkpoint(mixed_job)["version"] == 1 and _checkpoint(mixed_job)["iteration"] == 2
    assert runner.run_chunk(mixed_job, 2, owner="new") == "committed"
    assert _checkpoint(mixed_job)["version"] == 2
    sent.clear()
    sent.append((mixed_job, 4))
    assert _drain(sent) == ["committed", "succeeded"]
    old_records, records = _records(old_job), _records(mixed_job)
    assert [r[0] for r in records] == [1, 2, 3, 4, 5] and all(r[6] for r in records)
    assert records == old_records
    old, mixed = (client.get(f"/v1/jobs/{j}/settings").json() for j in (old_job, mixed_job))
    assert mixed == old
    assert ("param_groups" in mixed) == bool(hyper)
