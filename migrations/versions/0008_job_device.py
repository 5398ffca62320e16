"""Jobs ask for a device (auto, cpu, cuda): the column their chunks' queue is chosen from.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04

Mirrors service/db/models.py (``Job.requested_device``); tests/migrations checks that head matches
the models and that a populated 0007 database keeps every row. The job's request (``spec``) carries
the same value; the column lets the status read and the sweep know a job's queue without parsing the
spec. Every existing job is ``auto`` (the server default): its queue is the base queue, the one every
worker consumed before devices had queues of their own. The downgrade drops just the column.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("requested_device", sa.String(length=8), nullable=False, server_default="auto"))


def downgrade() -> None:
    op.drop_column("jobs", "requested_device")
