"""Migration 0010 (study_jobs.update_sent_at, update_attempts), on SQLite and PostgreSQL: a populated
0009 database with jobs of a study (one update recorded, one not) upgrades with every row kept, no
message marked and none counted; at head the sweep finds the unrecorded update (the one a lost
message left out) and not the recorded one; the downgrade drops just the two columns."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from service import studies
from service.db.migrate import downgrade, upgrade
from tests.migrations.test_job_status_check import TS, _insert_job, _populate_0003, _snapshot
from tests.migrations.test_migrations import TABLES_0009, diff, tables, version
from tests.migrations.test_studies_migration import STUDY, _run
from tests.migrations.test_tenants_migration import _columns, _query

STUDY_JOBS = "SELECT job_id, study_id, version, warm FROM study_jobs ORDER BY job_id"


def _populate_0009(url: str) -> None:
    """Study s1 with two succeeded jobs: j-succeeded's update is not recorded, j-done's is."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            _insert_job(conn, "j-done", "succeeded")
    finally:
        engine.dispose()
    _run(
        url,
        f"UPDATE jobs SET finished_at = {TS} WHERE status = 'succeeded'",
        STUDY,
        "INSERT INTO study_jobs (job_id, study_id, warm, start, created_at) "
        f"VALUES ('j-succeeded', 's1', false, '{{}}', {TS})",
        'INSERT INTO study_jobs (job_id, study_id, warm, start, version, "update", created_at, updated_at) '
        f"VALUES ('j-done', 's1', false, '{{}}', 1, '{{}}', {TS}, {TS})",
    )


def test_upgrade_from_0009_marks_no_update_message_and_keeps_every_row(empty_url):
    upgrade(empty_url, "0003")
    _populate_0003(empty_url)
    upgrade(empty_url, "0009")
    _populate_0009(empty_url)
    before, links = _snapshot(empty_url), _query(empty_url, STUDY_JOBS)
    assert len(links) == 2 and "update_sent_at" not in {c[0] for c in _columns(empty_url, "study_jobs")}

    upgrade(empty_url, "0010")
    assert version(empty_url) == "0010" and tables(empty_url) == TABLES_0009
    assert _snapshot(empty_url) == before and _query(empty_url, STUDY_JOBS) == links
    assert _query(empty_url, "SELECT job_id, update_sent_at, update_attempts FROM study_jobs ORDER BY job_id") == [
        ("j-done", None, 0),
        ("j-succeeded", None, 0),
    ]
    engine = create_engine(empty_url)
    try:
        with Session(engine) as s:  # the job whose update was never recorded gets a message; once
            later = datetime(2026, 1, 1, 1, tzinfo=UTC)
            assert studies.sweep_updates(s, stale_after_s=30, now=later) == [("s1", "j-succeeded")]
            s.commit()
            assert studies.sweep_updates(s, stale_after_s=30, now=later) == []
            s.rollback()
    finally:
        engine.dispose()
    assert _query(empty_url, "SELECT update_attempts FROM study_jobs ORDER BY job_id") == [(0,), (1,)]

    downgrade(empty_url, "0009")
    assert version(empty_url) == "0009" and tables(empty_url) == TABLES_0009
    assert not {"update_sent_at", "update_attempts"} & {c[0] for c in _columns(empty_url, "study_jobs")}
    assert _snapshot(empty_url) == before and _query(empty_url, STUDY_JOBS) == links
    upgrade(empty_url)
    assert diff(empty_url) == [] and _query(empty_url, STUDY_JOBS) == links
