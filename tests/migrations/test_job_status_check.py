"""Migration 0004 (jobs.status CHECK constraint), on SQLite and PostgreSQL: a database at 0003 with
rows in every table upgrades without losing one, rejects an unknown status afterwards, matches the
models, and goes back down to 0003 (where an unknown status is accepted again)."""

from __future__ import annotations

import importlib.util
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import CheckConstraint, create_engine, inspect, text
from sqlalchemy.exc import IntegrityError

from gradtune.spec import STATUSES, JobStatus
from service.db.migrate import MIGRATIONS_DIR, downgrade, upgrade
from service.db.models import JOB_STATUS_CHECK, Base
from service.db.session import make_engine
from tests.migrations.test_migrations import HEAD, TABLES, TABLES_0004, diff, tables, version

ROOT = Path(__file__).resolve().parents[2]
TS = "'2026-01-01 00:00:00+00:00'"


def _migration_0004():
    path = MIGRATIONS_DIR / "versions" / "0004_job_status_check.py"
    spec = importlib.util.spec_from_file_location("migration_0004", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _insert_job(conn, job_id: str, status: str, iteration: int = 0) -> None:
    conn.execute(
        text(
            "INSERT INTO jobs (id, name, status, spec, created_at, updated_at, iteration, iterations, "
            "cancel_requested, chunks_started, chunks_committed, lease_owner, heartbeat_at) VALUES "
            f"(:id, :name, :status, '{{\"x\": 1}}', {TS}, {TS}, :it, 5, false, 1, 1, :owner, {TS})"
        ),
        {"id": job_id, "name": f"job-{status}", "status": status, "it": iteration, "owner": f"w-{job_id}"},
    )


def _populate_0003(url: str) -> None:
    """One job per status, the running one with history and a dataset and a model it uses."""
    engine = create_engine(url)
    with engine.begin() as conn:
        for status in STATUSES:
            _insert_job(conn, f"j-{status}", status, iteration=2 if status == "running" else 0)
        for i in (1, 2):
            conn.execute(
                text(
                    "INSERT INTO job_iterations (job_id, iteration, meta_loss, lr, momentum, accepted, created_at) "
                    f"VALUES ('j-running', :i, 0.5, 0.1, 0.9, true, {TS})"
                ),
                {"i": i},
            )
        conn.execute(
            text(
                "INSERT INTO datasets (id, filename, format, sha256, size, items, created_at) VALUES "
                f"('d1', 'a.npz', 'npz', 'ab', 3, '[]', {TS})"
            )
        )
        conn.execute(
            text(
                "INSERT INTO models (id, filename, sha256, size, program, created_at) VALUES "
                f"('m1', 'm.pt2', 'cd', 4, '{{}}', {TS})"
            )
        )
        conn.execute(text("INSERT INTO job_datasets (job_id, dataset_id) VALUES ('j-running', 'd1')"))
        conn.execute(text("INSERT INTO job_models (job_id, model_id) VALUES ('j-running', 'm1')"))
    engine.dispose()


def _snapshot(url: str) -> dict[str, list[tuple]]:
    engine = create_engine(url)
    queries = {
        "jobs": "SELECT id, name, status, iteration, lease_owner FROM jobs ORDER BY id",
        "job_iterations": "SELECT job_id, iteration, lr FROM job_iterations ORDER BY job_id, iteration",
        "job_datasets": "SELECT job_id, dataset_id FROM job_datasets",
        "job_models": "SELECT job_id, model_id FROM job_models",
        "datasets": "SELECT id, sha256 FROM datasets",
        "models": "SELECT id, sha256 FROM models",
    }
    try:
        with engine.connect() as conn:
            return {name: [tuple(r) for r in conn.execute(text(q))] for name, q in queries.items()}
    finally:
        engine.dispose()


def _checks(url: str) -> dict[str, set[str]]:
    """The jobs table's CHECK constraints: name -> the quoted values their SQL lists."""
    engine = create_engine(url)
    try:
        found = inspect(engine).get_check_constraints("jobs")
    finally:
        engine.dispose()
    return {c["name"]: set(re.findall(r"'(\w+)'", c["sqltext"])) for c in found}


def _set_status(url: str, job_id: str, status: str) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE jobs SET status = :s WHERE id = :id"), {"s": status, "id": job_id})
    finally:
        engine.dispose()


def _add_job(url: str, job_id: str, status: str) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            _insert_job(conn, job_id, status)
    finally:
        engine.dispose()


def test_the_migration_lists_the_spec_statuses():
    """The migration writes its list out (a snapshot); today it is gradtune.spec's, and so is the model's."""
    assert _migration_0004().STATUSES == STATUSES == tuple(s.value for s in JobStatus)
    assert _migration_0004().CHECK == JOB_STATUS_CHECK
    checks = [c for c in Base.metadata.tables["jobs"].constraints if isinstance(c, CheckConstraint)]
    assert [(c.name, str(c.sqltext)) for c in checks] == [("ck_jobs_status", JOB_STATUS_CHECK)]


def test_upgrade_from_0003_keeps_every_row_and_then_rejects_an_unknown_status(empty_url):
    upgrade(empty_url, "0003")
    _populate_0003(empty_url)
    before = _snapshot(empty_url)
    assert _checks(empty_url) == {}
    assert len(before["jobs"]) == 5 and len(before["job_iterations"]) == 2

    upgrade(empty_url)
    assert version(empty_url) == HEAD and tables(empty_url) == TABLES
    assert diff(empty_url) == []
    assert _checks(empty_url) == {"ck_jobs_status": set(STATUSES)}
    # Every row survived, the children of the rebuilt jobs table (SQLite) included.
    assert _snapshot(empty_url) == before

    with pytest.raises(IntegrityError):
        _add_job(empty_url, "j-bad", "paused")
    with pytest.raises(IntegrityError):
        _set_status(empty_url, "j-queued", "QUEUED")
    _set_status(empty_url, "j-queued", "running")  # every real status still goes in
    _set_status(empty_url, "j-queued", "queued")
    assert _snapshot(empty_url) == before

    # The foreign keys still point at the jobs table: deleting a job cascades (SQLite: the
    # service's engine, foreign keys on).
    engine = make_engine(empty_url)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM jobs WHERE id = 'j-running'"))
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM job_iterations")).scalar() == 0
        assert conn.execute(text("SELECT count(*) FROM job_datasets")).scalar() == 0
    engine.dispose()


def test_downgrade_to_0003_drops_only_the_constraint(empty_url):
    upgrade(empty_url, "0003")
    _populate_0003(empty_url)
    before = _snapshot(empty_url)
    upgrade(empty_url)
    downgrade(empty_url, "0003")
    assert version(empty_url) == "0003" and tables(empty_url) == TABLES_0004
    assert _checks(empty_url) == {}
    assert _snapshot(empty_url) == before
    _add_job(empty_url, "j-bad", "paused")  # accepted again at 0003

    # ... and the upgrade refuses it, naming the row, and changes nothing.
    with pytest.raises(RuntimeError, match=r"j-bad \('paused'\)"):
        upgrade(empty_url)
    assert version(empty_url) == "0003" and _checks(empty_url) == {}
    _set_status(empty_url, "j-bad", "failed")
    upgrade(empty_url)
    assert version(empty_url) == HEAD and _checks(empty_url) == {"ck_jobs_status": set(STATUSES)}
    assert diff(empty_url) == []


def _offline_sql(url: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADTUNE_")}
    out = subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(ROOT / "alembic.ini"), "-x", f"url={url}", *args, "--sql"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_upgrade_sql_offline_for_postgresql():
    """``alembic upgrade 0003:0004 --sql`` prints the constraint without a database to read."""
    sql = _offline_sql("postgresql+psycopg://nobody@127.0.0.1:1/none", "upgrade", "0003:0004")
    assert "ALTER TABLE jobs ADD CONSTRAINT ck_jobs_status CHECK (status IN ('queued'," in sql
    sql = _offline_sql("postgresql+psycopg://nobody@127.0.0.1:1/none", "downgrade", "0004:0003")
    assert "ALTER TABLE jobs DROP CONSTRAINT ck_jobs_status" in sql


def test_upgrade_sql_offline_for_sqlite_runs_on_a_0003_database(tmp_path):
    """On SQLite the ``--sql`` script rebuilds jobs from the migration's copy of the table; run
    with the sqlite3 shell's defaults (foreign keys off) it keeps every row, and so does the
    downgrade script."""
    url = f"sqlite:///{tmp_path / 'offline.db'}"
    upgrade(url, "0003")
    _populate_0003(url)
    before = _snapshot(url)
    up = _offline_sql(f"sqlite:///{tmp_path / 'unused.db'}", "upgrade", "0003:0004")
    down = _offline_sql(f"sqlite:///{tmp_path / 'unused.db'}", "downgrade", "0004:0003")
    assert not (tmp_path / "unused.db").exists()
    conn = sqlite3.connect(tmp_path / "offline.db")
    try:
        conn.executescript(up)
    finally:
        conn.close()
    assert version(url) == "0004" and _snapshot(url) == before
    assert _checks(url) == {"ck_jobs_status": set(STATUSES)}
    with pytest.raises(IntegrityError):
        _add_job(url, "j-bad", "paused")
    upgrade(url)  # the later migrations on top of the offline script's table: head matches the models
    assert version(url) == HEAD and diff(url) == [] and _snapshot(url) == before
    downgrade(url, "0004")
    conn = sqlite3.connect(tmp_path / "offline.db")
    try:
        conn.executescript(down)
    finally:
        conn.close()
    assert version(url) == "0003" and _checks(url) == {} and _snapshot(url) == before
