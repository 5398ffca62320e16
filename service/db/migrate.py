"""Programmatic Alembic: ``upgrade(url)`` is ``alembic upgrade head`` from any working directory.

The migration scripts live in the top-level ``migrations`` package, installed next to
``service`` (in the repository and in site-packages alike), so they are found relative to
this file rather than to the current directory or an alembic.ini.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


def alembic_config(url: str | None = None) -> Config:
    """An Alembic config pointing at gradtune's migrations; ``url`` overrides the settings."""
    if not (MIGRATIONS_DIR / "env.py").is_file():  # pragma: no cover - broken install
        raise RuntimeError(f"gradtune's migrations are missing: no env.py in {MIGRATIONS_DIR}")
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url:
        # ConfigParser interpolation: a literal % (e.g. in an escaped password) must be doubled.
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` to ``revision`` (default: the newest)."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    """Take the database at ``url`` back to ``revision`` (default: empty)."""
    command.downgrade(alembic_config(url), revision)


def current_heads() -> tuple[str, ...]:
    """The head revision(s) of the migration scripts."""
    from alembic.script import ScriptDirectory

    return tuple(ScriptDirectory.from_config(alembic_config()).get_heads())
