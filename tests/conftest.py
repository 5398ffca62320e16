"""Fixtures the whole suite shares: migrated databases, a Redis database, settings.

* ``sqlite_url``: a fresh SQLite file in the test's tmp_path, migrated to head (a copy of a
  database migrated once per session, so it costs a file copy).
* ``pg_url``: a PostgreSQL database ``gradtune_t_<random>`` on 127.0.0.1:5432, created and
  migrated once per session and dropped (WITH FORCE) at the end; each test gets it with every
  table emptied. Override the server with GRADTUNE_TEST_PG_ADMIN_URL (an admin URL to an
  existing database).
* ``empty_pg_url``: a fresh, *unmigrated* PostgreSQL database for this test only (migration tests).
* ``redis_url``: ``redis://127.0.0.1:6379/13`` (GRADTUNE_TEST_REDIS_URL, GRADTUNE_TEST_REDIS_DB; one up per
  pytest-xdist worker: gw1 gets 14),
  flushed before each test and at the end of the session.
* ``db_url``: parametrized over ``sqlite`` and ``postgresql`` (the two fixtures above).
* ``make_settings``: ``make_settings(tmp_path, **overrides) -> Settings`` (see tests/helpers/support.py).

PostgreSQL or Redis unreachable: the tests that need them fail when CI=true, else are skipped.
"""

from __future__ import annotations

import os
import shutil
import uuid
import warnings
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from service.db.migrate import upgrade
from tests.helpers.support import PG_ADMIN_URLS, REDIS_SERVER_URL, REDIS_TEST_DB
from tests.helpers.support import make_settings as _make_settings


def pytest_configure(config):
    # starlette's TestClient warns that it will move from httpx to httpx2; not ours to fix.
    config.addinivalue_line("filterwarnings", "ignore:Using `httpx` with `starlette.testclient`")
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")


@pytest.fixture(autouse=True)
def _testclient_host(monkeypatch):
    """Apps built from the environment (Settings()) answer starlette's TestClient, which sends
    ``Host: testserver``, as well as the loopback names (service.settings.allowed_hosts)."""
    monkeypatch.setenv("GRADTUNE_ALLOWED_HOSTS", "testserver,localhost,127.0.0.1")


def unavailable(what: str) -> None:
    """A service the test needs is down: fail under CI=true, skip elsewhere."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} (CI=true: failing instead of skipping)", pytrace=False)
    pytest.skip(what)


# ---------------------------------------------------------------- SQLite


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture
def sqlite_url(tmp_path, _sqlite_template) -> str:
    """A migrated SQLite database of this test's own."""
    path = tmp_path / "gradtune.db"
    shutil.copyfile(_sqlite_template, path)
    return f"sqlite:///{path}"


# ---------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="session")
def _pg_admin():
    """An AUTOCOMMIT engine on the server's existing ``test`` database, for CREATE/DROP DATABASE."""
    errors = []
    for url in PG_ADMIN_URLS:
        engine = create_engine(url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:
            errors.append(
                f"{make_url(url).render_as_string(hide_password=True)}: "
                f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
            )
            engine.dispose()
            continue
        yield engine
        engine.dispose()
        return
    unavailable("PostgreSQL unreachable: " + "; ".join(errors))


def _create_pg_database(admin) -> str:
    name = f"gradtune_t_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    return admin.url.set(database=name).render_as_string(hide_password=False)


def _drop_pg_database(admin, url: str) -> None:
    name = make_url(url).database
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def empty_pg_url(_pg_admin):
    """A brand-new PostgreSQL database with no tables, dropped after the test."""
    url = _create_pg_database(_pg_admin)
    yield url
    _drop_pg_database(_pg_admin, url)


@pytest.fixture(scope="session")
def _pg_session_url(_pg_admin):
    url = _create_pg_database(_pg_admin)
    try:
        upgrade(url)
        yield url
    finally:
        _drop_pg_database(_pg_admin, url)


@pytest.fixture
def pg_url(_pg_session_url) -> str:
    """The session's migrated PostgreSQL database, with its tables emptied for this test."""
    engine = create_engine(_pg_session_url)
    try:
        with engine.begin() as conn:
            # DELETE rather than TRUNCATE: it does not wait for idle sessions that merely read.
            conn.execute(text("SET LOCAL lock_timeout = '15s'"))
            conn.execute(text("DELETE FROM study_tasks"))
            conn.execute(text("DELETE FROM study_jobs"))
            conn.execute(text("DELETE FROM studies"))
            conn.execute(text("DELETE FROM job_iterations"))
            conn.execute(text("DELETE FROM job_datasets"))
            conn.execute(text("DELETE FROM job_models"))
            conn.execute(text("DELETE FROM models"))
            conn.execute(text("DELETE FROM jobs"))
            conn.execute(text("DELETE FROM datasets"))
            conn.execute(text("DELETE FROM workers"))
            conn.execute(text("DELETE FROM upload_slots"))
            conn.execute(text("DELETE FROM api_keys"))
            conn.execute(text("DELETE FROM tenants WHERE name <> 'default'"))
            conn.execute(
                text(
                    "UPDATE tenants SET max_active_jobs = NULL, max_stored_bytes = NULL, max_concurrent_uploads = NULL"
                )
            )
    finally:
        engine.dispose()
    return _pg_session_url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request) -> str:
    """A migrated database: each test using it runs once on SQLite and once on PostgreSQL."""
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")


# ---------------------------------------------------------------- Redis


@pytest.fixture(scope="session")
def _redis_session_url():
    import redis

    url = f"{REDIS_SERVER_URL.rstrip('/')}/{REDIS_TEST_DB}"
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
    try:
        client.ping()
    except Exception as exc:
        client.close()
        unavailable(f"Redis unreachable at {url}: {type(exc).__name__}: {exc}")
    yield url
    try:
        client.flushdb()
    finally:
        client.close()


@pytest.fixture
def redis_url(_redis_session_url) -> str:
    """``redis://127.0.0.1:6379/<n>``: a numbered database the suite owns, empty at the start."""
    import redis

    client = redis.Redis.from_url(_redis_session_url, socket_connect_timeout=2, socket_timeout=5)
    try:
        client.flushdb()
    finally:
        client.close()
    return _redis_session_url


# ---------------------------------------------------------------- settings


@pytest.fixture
def make_settings():
    """The ``make_settings(tmp_path, **overrides)`` helper: Settings isolated from GRADTUNE_* env."""
    return _make_settings


# ---------------------------------------------------------------- the API and the runner in-process


@pytest.fixture
def runner_env(db_url, tmp_path, monkeypatch):
    """``start(**settings)`` -> (app, client): an API app and the worker's settings (GRADTUNE_* from
    the environment, as a real worker reads them) on one database; the runner's messages land in
    ``sent`` instead of the broker."""
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from service.db import session as db_session
    from service.main import create_app
    from service.settings import get_settings
    from tests.helpers.support import keyed_client
    from worker import runner  # imported here: torch, only for the tests that take this fixture

    def start(**settings):
        monkeypatch.setenv("GRADTUNE_DATABASE_URL", db_url)
        monkeypatch.setenv("GRADTUNE_DATA_DIR", str(tmp_path / "data"))
        for k, v in settings.items():
            monkeypatch.setenv(f"GRADTUNE_{k.upper()}", str(v))
        for f in (get_settings, db_session.get_engine, db_session.get_sessionmaker):
            f.cache_clear()
        app = create_app(get_settings())
        client = keyed_client(app)
        client.__enter__()
        started.append(client)
        return app, client

    started: list[TestClient] = []
    sent: list[tuple[str, int]] = []
    monkeypatch.setattr(runner, "enqueue", lambda job_id, it, device=None: sent.append((job_id, it)))
    yield SimpleNamespace(start=start, sent=sent)
    for client in started:
        client.__exit__(None, None, None)
    db_session.get_engine().dispose()
    for f in (get_settings, db_session.get_engine, db_session.get_sessionmaker):
        f.cache_clear()
