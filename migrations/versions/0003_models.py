"""Models: uploaded torch.export programs (content-addressed by sha256) and which jobs use them.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28

Mirrors service/db/models.py; tests/migrations checks that head matches the models.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("filename", sa.String(length=255), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("program", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_models_sha256", "models", ["sha256"], unique=True)
    op.create_index("ix_models_created_at", "models", ["created_at"], unique=False)

    op.create_table(
        "job_models",
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("model_id", sa.String(length=36), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", "model_id"),
    )
    op.create_index("ix_job_models_model_id", "job_models", ["model_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_job_models_model_id", table_name="job_models")
    op.drop_table("job_models")
    op.drop_index("ix_models_created_at", table_name="models")
    op.drop_index("ix_models_sha256", table_name="models")
    op.drop_table("models")
