"""Datasets: uploaded files (content-addressed by sha256) and which jobs use them.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28

Mirrors service/db/models.py; tests/migrations checks that head matches the models.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "datasets",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("filename", sa.String(length=255), nullable=False),
        sa.Column("format", sa.String(length=16), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("rows", sa.BigInteger(), nullable=True),
        sa.Column("items", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_datasets_sha256", "datasets", ["sha256"], unique=True)
    op.create_index("ix_datasets_created_at", "datasets", ["created_at"], unique=False)

    op.create_table(
        "job_datasets",
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("dataset_id", sa.String(length=36), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", "dataset_id"),
    )
    op.create_index("ix_job_datasets_dataset_id", "job_datasets", ["dataset_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_job_datasets_dataset_id", table_name="job_datasets")
    op.drop_table("job_datasets")
    op.drop_index("ix_datasets_created_at", table_name="datasets")
    op.drop_index("ix_datasets_sha256", table_name="datasets")
    op.drop_table("datasets")
