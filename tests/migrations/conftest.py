"""The migration tests' database: an empty one of each backend, migrated by the test itself."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request, tmp_path):
    """An empty SQLite file or a brand-new PostgreSQL database (tests/conftest.py's empty_pg_url)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'empty.db'}"
    return request.getfixturevalue("empty_pg_url")
