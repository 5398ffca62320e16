"""Migration 0007 (tenants and API keys), on SQLite and PostgreSQL: a populated 0006 database upgrades
with every job, dataset and model given to tenant ``default`` and no row lost; the same bytes may then
belong to two tenants (not twice to one); keys work; and the downgrade, refused while two tenants
share bytes, goes back to 0006 with every row as it was."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import keys
from service.db.migrate import downgrade, upgrade
from tests.migrations.test_job_status_check import TS, _populate_0003, _snapshot
from tests.migrations.test_migrations import HEAD, TABLES, TABLES_0006, diff, tables, version


def _query(url: str, sql: str) -> list[tuple]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql))]
    finally:
        engine.dispose()


def _insert_dataset(url: str, row_id: str, tenant: str, sha256: str) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO datasets (id, tenant, filename, format, sha256, size, items, created_at) "
                    f"VALUES (:id, :tenant, 'a.npz', 'npz', :sha, 3, '[]', {TS})"
                ),
                {"id": row_id, "tenant": tenant, "sha": sha256},
            )
    finally:
        engine.dispose()


def test_upgrade_from_0006_gives_every_row_to_default_and_keeps_it(empty_url):
    upgrade(empty_url, "0003")
    _populate_0003(empty_url)
    upgrade(empty_url, "0006")
    before = _snapshot(empty_url)
    assert tables(empty_url) == TABLES_0006

    upgrade(empty_url)
    assert version(empty_url) == HEAD
    assert tables(empty_url) == TABLES and diff(empty_url) == []
    assert _snapshot(empty_url) == before
    for table in ("jobs", "datasets", "models"):
        owners = _query(empty_url, f"SELECT DISTINCT tenant FROM {table}")
        assert owners == [("default",)], (table, owners)
    assert _query(empty_url, "SELECT name, max_active_jobs FROM tenants") == [("default", None)]
    engine = create_engine(empty_url)
    try:
        uniques = {
            ix["name"]: (ix["column_names"], bool(ix["unique"])) for ix in inspect(engine).get_indexes("datasets")
        }
        assert uniques["ix_datasets_tenant_sha256"] == (["tenant", "sha256"], True)
        assert uniques["ix_datasets_sha256"] == (["sha256"], False)
        with Session(engine) as s:  # keys are created and checked against the new tables
            row, key = keys.create_key(s, tenant="team-a", admin=True)
            s.commit()
            principal, _ = keys.check_key(s, key)
        assert (principal.tenant, principal.admin, principal.key_id) == ("team-a", True, row.id)
    finally:
        engine.dispose()

    # The bytes 'ab' (dataset d1, tenant default) may belong to a second tenant, not twice to one.
    _insert_dataset(empty_url, "d2", "team-a", "ab")
    with pytest.raises(IntegrityError):
        _insert_dataset(empty_url, "d3", "team-a", "ab")

    with pytest.raises(RuntimeError, match="same bytes for several tenants"):
        downgrade(empty_url, "0006")
    # 0007's downgrade refused; 0008's (studies) may have gone down before it (SQLite)
    assert version(empty_url) in (HEAD, "0007")
    engine = create_engine(empty_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM datasets WHERE id = 'd2'"))
    finally:
        engine.dispose()
    downgrade(empty_url, "0006")
    assert version(empty_url) == "0006" and tables(empty_url) == TABLES_0006
    assert _snapshot(empty_url) == before
    assert "tenant" not in {c[0] for c in _columns(empty_url, "jobs")}
    upgrade(empty_url)
    assert diff(empty_url) == [] and _snapshot(empty_url) == before


def _columns(url: str, table: str) -> list[tuple[str]]:
    engine = create_engine(url)
    try:
        return [(c["name"],) for c in inspect(engine).get_columns(table)]
    finally:
        engine.dispose()
