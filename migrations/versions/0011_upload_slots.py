"""Uploads in progress are rows, so a tenant's quota of concurrent uploads holds across API processes.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-14

Mirrors service/db/models.py (``UploadSlot``); tests/migrations checks that head matches the models
and that a populated 0010 database keeps every row.

- ``upload_slots``: one row per upload in progress (service/upload_quota.py): its tenant, when it
  started and when it stops counting (``expires_at``, for a process that died mid-upload); counted
  under the tenant's lock against ``max_concurrent_uploads`` and deleted when the upload ends.

A new, empty table: nothing to carry over. The downgrade drops it, with the slots of uploads then in
progress (an API before 0011 counts a tenant's uploads in each process's memory).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | Sequence[str] | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "upload_slots",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_upload_slots_tenant", "upload_slots", ["tenant"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_upload_slots_tenant", table_name="upload_slots")
    op.drop_table("upload_slots")
