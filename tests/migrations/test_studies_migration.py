"""Migration 0009 (studies), on SQLite and PostgreSQL: a populated 0008 database upgrades with every
row kept and the three study tables added (matching the models); the pool's keys hold (one task per
position of a study, a job's task joins once); a study's rows go with it; the downgrade drops the
tables and leaves every other row as it was."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import IntegrityError

from service.db.migrate import downgrade, upgrade
from tests.migrations.test_job_status_check import TS, _populate_0003, _snapshot
from tests.migrations.test_migrations import HEAD, TABLES, TABLES_0007, TABLES_0009, diff, tables, version


def _run(url: str, *statements: str) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            for sql in statements:
                conn.execute(text(sql))
    finally:
        engine.dispose()


def _count(url: str, table: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar() or 0)
    finally:
        engine.dispose()


STUDY = (
    "INSERT INTO studies (id, tenant, name, spec, holdout_every, version, pool_size, rounds, created_at, updated_at) "
    f"VALUES ('s1', 'default', 's', '{{}}', 4, 0, 0, 0, {TS}, {TS})"
)


def _task(position: int, job: str, index: int) -> str:
    return (
        "INSERT INTO study_tasks (study_id, position, job_id, task_index, held_out) "
        f"VALUES ('s1', {position}, '{job}', {index}, false)"
    )


def test_upgrade_from_0008_adds_the_study_tables_and_keeps_every_row(empty_url):
    upgrade(empty_url, "0003")
    _populate_0003(empty_url)
    upgrade(empty_url, "0008")
    assert tables(empty_url) == TABLES_0007
    before = _snapshot(empty_url)

    upgrade(empty_url, "0009")
    assert tables(empty_url) == TABLES_0009 and _snapshot(empty_url) == before
    upgrade(empty_url)
    assert version(empty_url) == HEAD
    assert tables(empty_url) == TABLES and diff(empty_url) == []
    assert _snapshot(empty_url) == before

    _run(
        empty_url,
        STUDY,
        "INSERT INTO study_jobs (job_id, study_id, warm, start, created_at) "
        f"VALUES ('j-succeeded', 's1', false, '{{}}', {TS})",
        _task(0, "j-succeeded", 0),
    )
    with pytest.raises(IntegrityError):  # one task per position
        _run(empty_url, _task(0, "j-running", 0))
    with pytest.raises(IntegrityError):  # a job's task joins once
        _run(empty_url, _task(1, "j-succeeded", 0))
    _run(empty_url, _task(1, "j-running", 0))
    assert _count(empty_url, "study_tasks") == 2

    downgrade(empty_url, "0008")
    assert version(empty_url) == "0008" and tables(empty_url) == TABLES_0007
    assert _snapshot(empty_url) == before
    upgrade(empty_url)
    assert diff(empty_url) == [] and _count(empty_url, "studies") == 0
