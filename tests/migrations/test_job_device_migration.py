"""Migration 0008 (jobs.requested_device), on SQLite and PostgreSQL: a populated 0007 database
upgrades with every job asking for ``auto`` (the base queue, which every worker consumed before
devices had queues) and no row lost; a job created at head keeps the device it asked for; the
downgrade drops just the column."""

from __future__ import annotations

from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

from service import repository
from service.db.migrate import downgrade, upgrade
from tests.migrations.test_job_status_check import _populate_0003, _snapshot
from tests.migrations.test_migrations import HEAD, TABLES, TABLES_0007, diff, tables, version
from tests.migrations.test_tenants_migration import _columns, _query


def test_upgrade_from_0007_makes_every_job_auto_and_keeps_every_row(empty_url):
    upgrade(empty_url, "0003")
    _populate_0003(empty_url)
    upgrade(empty_url, "0007")
    before = _snapshot(empty_url)
    assert "requested_device" not in {c[0] for c in _columns(empty_url, "jobs")}

    upgrade(empty_url, "0008")
    assert version(empty_url) == "0008" and tables(empty_url) == TABLES_0007
    assert _snapshot(empty_url) == before
    upgrade(empty_url)  # to head (0009: studies, 0010: two of their columns), where the models are compared
    assert version(empty_url) == HEAD and tables(empty_url) == TABLES and diff(empty_url) == []
    assert _snapshot(empty_url) == before
    assert _query(empty_url, "SELECT DISTINCT requested_device FROM jobs") == [("auto",)]
    engine = create_engine(empty_url)
    try:
        with Session(engine) as s:  # a new job stores the device its spec asks for
            job = repository.create_job(s, spec={"device": "cuda"}, name="g", iterations=1)
            s.commit()
            assert s.get(type(job), job.id).requested_device == "cuda"
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM jobs WHERE name = 'g'"))
    finally:
        engine.dispose()

    downgrade(empty_url, "0007")
    assert version(empty_url) == "0007" and tables(empty_url) == TABLES_0007
    assert "requested_device" not in {c[0] for c in _columns(empty_url, "jobs")}
    assert _snapshot(empty_url) == before
    upgrade(empty_url)
    assert diff(empty_url) == [] and _snapshot(empty_url) == before
