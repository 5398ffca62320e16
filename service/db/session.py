"""Engine and session factory for the configured database.

On SQLite a transaction begins with ``BEGIN IMMEDIATE``, which takes the database's single write
lock up front (SQLite's stand-in for ``SELECT ... FOR UPDATE``), except on a *read* engine
(``read_engine``): its transactions begin with a plain, deferred ``BEGIN``, which in WAL mode takes
no lock at all, so a status poll neither waits for a worker's commit nor holds one up.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from service.settings import get_settings

# Execution option that marks a read-only engine (``read_engine``): deferred BEGIN on SQLite.
READ_ONLY = "gradtune_read_only"


def make_engine(url: str, **pool: Any) -> Engine:
    """An engine with the project's SQLite pragmas (or PostgreSQL's pre-ping); ``pool``: extra
    ``create_engine`` keywords such as ``pool_size``, ``max_overflow``, ``pool_timeout``."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **pool)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # pragma: no cover - trivial
            # Let SQLAlchemy issue BEGIN itself (below) so that a transaction takes
            # the write lock up front: SQLite's stand-in for SELECT ... FOR UPDATE.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            # In WAL mode NORMAL syncs at checkpoints, not at every commit: a crash of the process
            # loses nothing, a power cut at most the last commits; the write lock is held shorter.
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):  # pragma: no cover - trivial
            conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(READ_ONLY) else "BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True, **pool)


def read_engine(engine: Engine) -> Engine:
    """The same engine (same pool) for sessions that only read: on SQLite their transactions begin
    deferred and take no write lock. A write through it would still work but could fail with
    "database is locked" at once instead of waiting, so use it for reads only."""
    return engine.execution_options(**{READ_ONLY: True})


def read_sessionmaker(factory: sessionmaker[Session]) -> sessionmaker[Session]:
    """A sessionmaker like ``factory`` whose sessions read through ``read_engine``."""
    bind = factory.kw["bind"]
    return sessionmaker(bind=read_engine(bind), **{k: v for k, v in factory.kw.items() if k != "bind"})


@lru_cache
def get_engine() -> Engine:
    settings = get_settings()
    settings.ensure_dirs()
    return make_engine(settings.resolved_database_url())


@lru_cache
def get_sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


@contextmanager
def session_scope() -> Iterator[Session]:
    """One transaction: commit on success, roll back on error."""
    session = get_sessionmaker()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


class DatabaseUnavailable(RuntimeError):
    """The database could not be used (unreachable, not migrated, ...): the sentence says why."""


@contextmanager
def scoped_session(url: str) -> Iterator[Session]:
    """One transaction on the database at ``url`` with an engine of its own (a command line's
    single use): commit on success; a database error becomes ``DatabaseUnavailable``."""
    from sqlalchemy.exc import SQLAlchemyError

    engine = make_engine(url)
    try:
        with Session(engine, expire_on_commit=False) as session:
            yield session
            session.commit()
    except SQLAlchemyError as exc:
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise DatabaseUnavailable(
            f"the database could not be used ({type(exc).__name__}: {first}); is it reachable, and "
            "migrated (gradtune migrate)?"
        ) from exc
    finally:
        engine.dispose()
