"""The schema exists only through migrations: upgrade empty SQLite and PostgreSQL databases to
head, compare with the models, go down to base and up again. tests/migrations/test_job_status_check.py
upgrades a populated 0003 database to the status CHECK constraint."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from service.db.migrate import MIGRATIONS_DIR, current_heads, downgrade, upgrade
from service.db.models import Base

ROOT = Path(__file__).resolve().parents[2]
HEAD = "0011"
# The tables up to 0005 (0005 added columns only), at 0006 (it added workers), at 0007 (tenants and
# api_keys; 0008 added a column only, jobs.device), at 0009 (the studies; 0010 added two columns of
# study_jobs) and at head (0011 added upload_slots).
TABLES_0004 = {"jobs", "job_iterations", "datasets", "job_datasets", "models", "job_models", "alembic_version"}
TABLES_0006 = TABLES_0004 | {"workers"}
TABLES_0007 = TABLES_0006 | {"tenants", "api_keys"}
TABLES_0009 = TABLES_0007 | {"studies", "study_jobs", "study_tasks"}
TABLES = TABLES_0009 | {"upload_slots"}


def diff(url: str) -> list:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()


def tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def version(url: str) -> str | None:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    finally:
        engine.dispose()


def test_one_head():
    assert current_heads() == (HEAD,)
    assert (MIGRATIONS_DIR / "env.py").is_file()


def test_upgrade_empty_database_matches_the_models_then_down_and_up(empty_url):
    assert tables(empty_url) == set()
    upgrade(empty_url)
    assert tables(empty_url) == TABLES
    assert version(empty_url) == HEAD
    assert diff(empty_url) == []

    downgrade(empty_url, "base")
    assert tables(empty_url) == {"alembic_version"}
    assert version(empty_url) is None

    upgrade(empty_url)
    assert diff(empty_url) == []
    upgrade(empty_url)  # already at head: nothing to do, no error
    assert version(empty_url) == HEAD


def test_upgrade_from_0001_keeps_the_jobs_and_adds_the_dataset_tables(empty_url):
    """A database created at 0001 (before datasets), with a job in it, upgrades to head."""
    upgrade(empty_url, "0001")
    assert tables(empty_url) == {"jobs", "job_iterations", "alembic_version"}
    engine = create_engine(empty_url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO jobs (id, name, status, spec, created_at, updated_at, iteration, iterations, "
                "cancel_requested, chunks_started, chunks_committed) VALUES ('j1', 'old', 'queued', '{}', "
                "'2026-01-01 00:00:00+00:00', '2026-01-01 00:00:00+00:00', 0, 5, false, 0, 0)"
            )
        )
    engine.dispose()
    upgrade(empty_url)
    assert version(empty_url) == HEAD and tables(empty_url) == TABLES
    assert diff(empty_url) == []
    engine = create_engine(empty_url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT name FROM jobs")).scalars().all() == ["old"]
        assert conn.execute(text("SELECT count(*) FROM datasets")).scalar() == 0
    engine.dispose()
    downgrade(empty_url, "0001")  # and back: the dataset tables go, the job stays
    assert tables(empty_url) == {"jobs", "job_iterations", "alembic_version"}
    assert version(empty_url) == "0001"


def test_upgrade_from_0002_keeps_datasets_and_adds_the_model_tables(empty_url):
    """A database at 0002 with a dataset upgrades to head; down to 0002 drops only the model tables."""
    upgrade(empty_url, "0002")
    assert tables(empty_url) == TABLES_0004 - {"models", "job_models"}
    engine = create_engine(empty_url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO datasets (id, filename, format, sha256, size, items, created_at) VALUES "
                "('d1', 'a.npz', 'npz', 'ab', 3, '[]', '2026-01-01 00:00:00+00:00')"
            )
        )
    engine.dispose()
    upgrade(empty_url)
    assert version(empty_url) == HEAD and tables(empty_url) == TABLES and diff(empty_url) == []
    downgrade(empty_url, "0002")
    assert tables(empty_url) == TABLES_0004 - {"models", "job_models"}
    engine = create_engine(empty_url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT filename FROM datasets")).scalars().all() == ["a.npz"]
    engine.dispose()


def test_the_comparison_can_fail(empty_url):
    """compare_metadata does see a missing table, so the test above is not vacuous."""
    upgrade(empty_url)
    engine = create_engine(empty_url)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE job_iterations"))
    engine.dispose()
    kinds = [d[0] for d in diff(empty_url)]
    assert "add_table" in kinds


def test_alembic_command_line_from_another_directory(tmp_path):
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADTUNE_")}
    out = subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(ROOT / "alembic.ini"), "-x", f"url={url}", "upgrade", "head"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "Running upgrade  -> 0001" in out.stderr
    assert "Running upgrade 0001 -> 0002" in out.stderr
    assert "Running upgrade 0002 -> 0003" in out.stderr
    assert "Running upgrade 0003 -> 0004" in out.stderr
    assert "Running upgrade 0004 -> 0005" in out.stderr
    assert "Running upgrade 0005 -> 0006" in out.stderr
    assert version(url) == HEAD


def test_alembic_falls_back_to_the_settings(tmp_path):
    """No -x url: GRADTUNE_DATABASE_URL (here: empty, so SQLite in GRADTUNE_DATA_DIR)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADTUNE_")}
    env["GRADTUNE_DATA_DIR"] = str(tmp_path / "data")
    out = subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(ROOT / "alembic.ini"), "upgrade", "head"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert version(f"sqlite:///{tmp_path / 'data' / 'gradtune.db'}") == HEAD


def test_no_create_all_outside_tests():
    """The schema comes from migrations only."""
    offenders = []
    for top in ("service", "worker", "gradtune", "migrations"):
        for path in (ROOT / top).rglob("*.py") if (ROOT / top).is_dir() else []:
            if re.search(r"\bcreate_all\s*\(", path.read_text(errors="replace")):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
