"""Migration 0011 (upload_slots), on SQLite and PostgreSQL: a populated 0010 database upgrades with
every row kept and the table added (matching the models); at head a tenant's slots count against its
quota of concurrent uploads; the downgrade drops just the table."""

from __future__ import annotations

from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from service import upload_quota
from service.db.migrate import downgrade, upgrade
from tests.migrations.test_job_status_check import _populate_0003, _snapshot
from tests.migrations.test_migrations import HEAD, TABLES, TABLES_0009, diff, tables, version
from tests.migrations.test_studies_migration import _count
from tests.migrations.test_study_update_sends_migration import STUDY_JOBS, _populate_0009
from tests.migrations.test_tenants_migration import _query


def test_upgrade_from_0010_adds_the_upload_slots_and_keeps_every_row(empty_url, tmp_path, make_settings):
    upgrade(empty_url, "0003")
    _populate_0003(empty_url)
    upgrade(empty_url, "0009")
    _populate_0009(empty_url)
    upgrade(empty_url, "0010")
    assert tables(empty_url) == TABLES_0009
    before, links = _snapshot(empty_url), _query(empty_url, STUDY_JOBS)

    upgrade(empty_url, "0011")
    assert version(empty_url) == "0011" == HEAD
    assert tables(empty_url) == TABLES and diff(empty_url) == []
    assert _snapshot(empty_url) == before and _query(empty_url, STUDY_JOBS) == links
    assert _count(empty_url, "upload_slots") == 0

    settings = make_settings(tmp_path, tenant_max_concurrent_uploads=1)
    engine = create_engine(empty_url)
    try:
        with Session(engine) as s:  # the tenant 0007 made: its one slot, then none
            first = upload_quota.take(s, tenant="default", settings=settings)
            assert first.slot is not None and (first.limit, first.in_progress) == (1, 0)
            second = upload_quota.take(s, tenant="default", settings=settings)
            assert second.slot is None and (second.limit, second.in_progress) == (1, 1)
    finally:
        engine.dispose()
    assert _count(empty_url, "upload_slots") == 1

    downgrade(empty_url, "0010")
    assert version(empty_url) == "0010" and tables(empty_url) == TABLES_0009
    assert _snapshot(empty_url) == before and _query(empty_url, STUDY_JOBS) == links
    upgrade(empty_url)
    assert diff(empty_url) == [] and _count(empty_url, "upload_slots") == 0
