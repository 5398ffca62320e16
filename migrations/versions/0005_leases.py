"""Leases, deadlines and poison jobs: five columns on jobs.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-15

Mirrors service/db/models.py (service/lifecycle.py says how each is used):

* ``attempts``: claims of the current iteration since the last commit (0 for existing jobs);
* ``enqueued_at``: when the chunk message now outstanding was sent (NULL: none; the sweep then sends
  one once the job is stale, as it always did);
* ``max_seconds``: the job's deadline; NULL for existing jobs, which then get the settings' default;
* ``elapsed_seconds``: chunk wall time spent so far (0 for existing jobs);
* ``stopped``: why the search ended early ("deadline"), NULL when it did not.

Every column is added with ALTER TABLE ADD COLUMN (the two NOT NULL ones with a server default), so
no table is rebuilt, on SQLite either. The downgrade drops them with ALTER TABLE DROP COLUMN, which
SQLite has had since 3.35.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("attempts", "enqueued_at", "max_seconds", "elapsed_seconds", "stopped")


def upgrade() -> None:
    op.add_column("jobs", sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"))
    op.add_column("jobs", sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("jobs", sa.Column("max_seconds", sa.Float(), nullable=True))
    op.add_column("jobs", sa.Column("elapsed_seconds", sa.Float(), nullable=False, server_default="0"))
    op.add_column("jobs", sa.Column("stopped", sa.String(length=16), nullable=True))


def downgrade() -> None:
    for name in reversed(COLUMNS):
        op.drop_column("jobs", name)
