"""The database's clock: the one clock that decides whether a job's worker is alive.

API processes and workers run on different hosts whose clocks drift; the database server is the
one thing they all share. So every time that decides liveness (a lease's heartbeat, the expiry
check of a claim, the stale sweep) is read from or written with the database's clock, never a
host's ``datetime.now()``. Optuna's RDB storage does the same for its trial heartbeats
(``func.now()``, compared against a ``now()`` read from the database).

``db_now()`` is that clock as a SQL expression:

* PostgreSQL: ``now()`` (timestamptz; the time the transaction began).
* SQLite: ``strftime('%Y-%m-%d %H:%M:%f000', 'now')``: UTC with millisecond resolution, in the
  very text form SQLAlchemy stores a DateTime in on SQLite (``YYYY-MM-DD HH:MM:SS.ffffff``), so
  values written by it and by Python compare and read back alike. (SQLite's CURRENT_TIMESTAMP
  would have whole seconds only and a different text form.)
* elsewhere: ``CURRENT_TIMESTAMP``.

``database_now(session)`` reads it once (aware, UTC); a transaction uses that one value for the
times it writes and for cutoffs such as "heartbeat older than N seconds", so the comparison is
portable SQL with a bound parameter and needs no dialect's interval arithmetic.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.functions import FunctionElement


class db_now(FunctionElement[datetime]):
    """The database server's current time, as a SQL expression (see the module docstring)."""

    type = DateTime(timezone=True)
    name = "db_now"
    inherit_cache = True


@compiles(db_now)
def _now_default(element: db_now, compiler: Any, **kw: Any) -> str:
    return "CURRENT_TIMESTAMP"


@compiles(db_now, "postgresql")
def _now_postgresql(element: db_now, compiler: Any, **kw: Any) -> str:
    return "now()"


@compiles(db_now, "sqlite")
def _now_sqlite(element: db_now, compiler: Any, **kw: Any) -> str:
    return "strftime('%Y-%m-%d %H:%M:%f000', 'now')"


def as_utc(value: datetime) -> datetime:
    """An aware UTC datetime: SQLite hands back naive ones (stored in UTC), PostgreSQL aware ones
    in the session's time zone."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def database_now(session: Session) -> datetime:
    """The database's current time (one ``SELECT``), aware and in UTC."""
    value = session.scalar(select(db_now()))
    if value is None:  # pragma: no cover - every database answers
        raise RuntimeError("the database did not report its time")
    return as_utc(value)
