"""Migration 0006 (the workers table), on SQLite and PostgreSQL: a populated 0005 database upgrades
without losing a row, gets the table the models describe (a worker registers in it), and goes back
down to 0005 with only that table gone."""

from __future__ import annotations

from sqlalchemy import create_engine, inspect, text
from sqlalchemy.orm import Session

from service import workers
from service.db.migrate import downgrade, upgrade
from tests.migrations.test_job_status_check import _populate_0003, _snapshot
from tests.migrations.test_migrations import TABLES_0004, TABLES_0006, diff, tables, version


def test_upgrade_from_0005_adds_the_workers_table_and_keeps_every_row(empty_url):
    upgrade(empty_url, "0003")
    _populate_0003(empty_url)
    upgrade(empty_url, "0005")
    before = _snapshot(empty_url)
    assert tables(empty_url) == TABLES_0004

    upgrade(empty_url, "0006")
    assert version(empty_url) == "0006"
    assert tables(empty_url) == TABLES_0006
    assert _snapshot(empty_url) == before
    engine = create_engine(empty_url)
    try:
        indexes = {ix["name"]: ix["column_names"] for ix in inspect(engine).get_indexes("workers")}
        assert indexes == {"ix_workers_last_seen": ["last_seen"]}
        with Session(engine) as s:  # the registry writes and reads it
            workers.register(s, worker_id="w1", host="h", pid=1, device="cpu", queues=["gradtune"])
            s.commit()
            items, total, live = workers.list_workers(s, stale_after_s=60)
        assert total == live == 1 and items[0][0].queues == ["gradtune"]
    finally:
        engine.dispose()

    downgrade(empty_url, "0005")
    assert version(empty_url) == "0005" and tables(empty_url) == TABLES_0004
    assert _snapshot(empty_url) == before
    upgrade(empty_url)
    assert diff(empty_url) == []
    engine = create_engine(empty_url)
    try:
        with engine.connect() as conn:  # a fresh, empty table
            assert conn.execute(text("SELECT count(*) FROM workers")).scalar() == 0
    finally:
        engine.dispose()
