"""Alembic environment for gradtune.

The database URL is taken, in order, from
  1. ``alembic -x url=...`` on the command line,
  2. the config's ``sqlalchemy.url`` main option when code set it (service.db.migrate does),
  3. ``Settings().resolved_database_url()`` (GRADTUNE_DATABASE_URL, else SQLite in GRADTUNE_DATA_DIR).
A caller may also hand over an open connection as ``config.attributes["connection"]``.

On SQLite the migrations run with foreign keys off: batch mode rebuilds a table by copying it and
dropping the old one, and with foreign keys on that DROP would delete, by ON DELETE CASCADE, every
row that refers to it (a rebuilt ``jobs`` would lose its history). ``PRAGMA foreign_key_check``
then confirms, inside the same transaction, that the result still holds together.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection

from service.db.models import Base
from service.db.session import make_engine
from service.settings import Settings

config = context.config

# Configure logging only when run from the alembic command line with an ini file; programmatic
# callers keep their own logging (fileConfig would disable every existing logger).
if config.config_file_name is not None and not config.attributes.get("skip_logging_config"):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _database_url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url")
    if url:
        return url
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    settings = Settings()
    settings.ensure_dirs()
    return settings.resolved_database_url()


def _configure(connection: Connection | None = None, url: str | None = None) -> None:
    dialect = connection.dialect.name if connection is not None else url.split(":", 1)[0]
    context.configure(
        connection=connection,
        url=None if connection is not None else url,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things: later migrations recreate tables in batches.
        render_as_batch=dialect.startswith("sqlite"),
        compare_type=True,
        literal_binds=connection is None,
        dialect_opts={"paramstyle": "named"} if connection is None else {},
    )


@contextmanager
def _sqlite_foreign_keys_off(connection: Connection) -> Iterator[None]:
    """Foreign keys off while migrating a SQLite database (see the module docstring).

    The pragma does nothing inside a transaction, so it goes to the driver's connection before
    the migration's transaction begins (the engines of service.db.session run the driver in
    autocommit mode and issue BEGIN themselves); afterwards the setting is put back.
    """
    if connection.dialect.name != "sqlite" or connection.in_transaction():
        yield
        return
    driver = connection.connection.driver_connection
    assert driver is not None, "an open SQLite connection has its driver's connection"
    was_on = driver.execute("PRAGMA foreign_keys").fetchone()[0]
    driver.execute("PRAGMA foreign_keys=OFF")
    try:
        yield
    finally:
        driver.execute(f"PRAGMA foreign_keys={'ON' if was_on else 'OFF'}")


def _check_foreign_keys(connection: Connection) -> None:
    if connection.dialect.name == "sqlite":
        broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
        if broken:
            raise RuntimeError(f"the migration left rows whose foreign keys point nowhere: {broken[:5]}")


def _run(connection: Connection) -> None:
    _configure(connection=connection)
    with _sqlite_foreign_keys_off(connection):
        with context.begin_transaction():
            context.run_migrations()
            _check_foreign_keys(connection)


def run_migrations_offline() -> None:
    """``alembic upgrade head --sql``: print the SQL instead of running it."""
    _configure(url=_database_url())
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(_database_url())
    try:
        with engine.connect() as connection:
            _run(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
