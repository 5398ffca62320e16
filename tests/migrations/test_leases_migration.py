"""Migration 0005 (leases, deadlines, poison jobs), on SQLite and PostgreSQL: a database at 0004
with jobs in every status upgrades without losing a row, the old jobs read as "no attempts, no
time spent, no message outstanding, the default deadline", the worker's code runs on them, and
the downgrade to 0004 drops exactly the five columns."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import create_engine, inspect, text
from sqlalchemy.orm import sessionmaker

from service import lifecycle
from service.db.clock import as_utc, database_now
from service.db.migrate import downgrade, upgrade
from service.db.models import Job
from service.db.session import make_engine
from tests.migrations.test_job_status_check import _offline_sql, _populate_0003, _snapshot
from tests.migrations.test_migrations import HEAD, TABLES, diff, tables, version

NEW = {"attempts", "enqueued_at", "max_seconds", "elapsed_seconds", "stopped"}


def _columns(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return {c["name"] for c in inspect(engine).get_columns("jobs")}
    finally:
        engine.dispose()


def _at_0004(url: str) -> dict:
    upgrade(url, "0003")
    _populate_0003(url)  # one job per status, the running one with history, a dataset and a model
    upgrade(url, "0004")
    return _snapshot(url)


def test_upgrade_from_0004_keeps_every_row_and_fills_the_new_columns(empty_url):
    before = _at_0004(empty_url)
    assert not NEW & _columns(empty_url)
    upgrade(empty_url)
    assert version(empty_url) == HEAD and tables(empty_url) == TABLES and diff(empty_url) == []
    assert NEW <= _columns(empty_url)
    assert _snapshot(empty_url) == before
    engine = create_engine(empty_url)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT attempts, enqueued_at, max_seconds, elapsed_seconds, stopped FROM jobs")).all()
    engine.dispose()
    assert len(rows) == 5 and {tuple(r) for r in rows} == {(0, None, None, 0.0, None)}


def test_the_worker_runs_an_old_job_after_the_upgrade(empty_url):
    """The running job of 0004 (lease "w-j-running", heartbeat long ago) is swept, claimed under a
    fresh token, committed and finished; a job without max_seconds gets the settings' default."""
    _at_0004(empty_url)
    upgrade(empty_url)
    engine = make_engine(empty_url)
    Session = sessionmaker(bind=engine, expire_on_commit=False)
    with Session.begin() as s:
        assert dict(lifecycle.sweep(s, stale_after_s=30)) == {"j-running": 2, "j-queued": 0}
    with Session.begin() as s:
        claim = lifecycle.claim_job(s, job_id="j-running", iteration=2, stale_after_s=30)
    assert claim is not None and claim.token != "w-j-running" and claim.max_seconds is None
    assert claim.attempts == 1 and claim.elapsed_seconds == 0.0
    rec = {"iteration": 3, "meta_loss": 0.5, "lr": 0.1, "momentum": 0.5}
    with Session.begin() as s:
        status = lifecycle.commit_chunk(
            s, job_id="j-running", token=claim.token, start_iteration=2, records=[rec], checkpoint={}, elapsed_seconds=2
        )
    assert status == "running"
    with Session.begin() as s:
        job = s.get(Job, "j-running")
        assert (job.iteration, job.attempts, job.elapsed_seconds) == (3, 0, 2.0)
        assert job.enqueued_at is not None and database_now(s) - as_utc(job.enqueued_at) < timedelta(minutes=1)
    engine.dispose()


def test_downgrade_to_0004_drops_only_the_new_columns(empty_url):
    before = _at_0004(empty_url)
    columns = _columns(empty_url)
    upgrade(empty_url)
    downgrade(empty_url, "0004")
    assert version(empty_url) == "0004" and _columns(empty_url) == columns
    assert _snapshot(empty_url) == before
    upgrade(empty_url)  # and up again
    assert version(empty_url) == HEAD and diff(empty_url) == []


def test_upgrade_sql_offline_adds_the_columns_without_rebuilding_jobs(tmp_path):
    sql = _offline_sql("postgresql+psycopg://nobody@127.0.0.1:1/none", "upgrade", "0004:0005")
    assert "ALTER TABLE jobs ADD COLUMN attempts INTEGER DEFAULT '0' NOT NULL" in sql
    assert "ALTER TABLE jobs ADD COLUMN enqueued_at TIMESTAMP WITH TIME ZONE" in sql
    sql = _offline_sql(f"sqlite:///{tmp_path / 'unused.db'}", "upgrade", "0004:0005")
    assert "ALTER TABLE jobs ADD COLUMN elapsed_seconds FLOAT DEFAULT '0' NOT NULL" in sql
    assert "CREATE TABLE _alembic_tmp_jobs" not in sql and "DROP TABLE jobs" not in sql
