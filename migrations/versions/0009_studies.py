"""Studies: settings learned across the jobs that name one (issue 14).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-10

Mirrors service/db/models.py (``Study``, ``StudyJob``, ``StudyTask``); tests/migrations checks that
head matches the models and that a populated 0008 database keeps every row.

- ``studies``: one row per study (tenant-scoped like jobs), its current settings and counters.
- ``study_jobs``: a job of a study (primary key ``job_id``: a job joins once), where it started and
  the study update recorded after it (unique ``(study_id, version)``: one update per version).
- ``study_tasks``: the pool, keyed ``(study_id, position)`` (two jobs joining at once cannot take
  one position), ``(job_id, task_index)`` unique, ``held_out`` for every k-th position.

New tables only: no existing row changes. Downgrade drops the three tables (and the studies with them).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "studies",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False, server_default="default"),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("holdout_every", sa.Integer(), nullable=False),
        sa.Column("kind", sa.JSON(), nullable=True),
        sa.Column("settings", sa.JSON(), nullable=True),
        sa.Column("evaluation", sa.JSON(), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("pool_size", sa.Integer(), nullable=False),
        sa.Column("rounds", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_studies_tenant_created_at", "studies", ["tenant", "created_at"], unique=False)
    op.create_table(
        "study_jobs",
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("study_id", sa.String(length=36), nullable=False),
        sa.Column("warm", sa.Boolean(), nullable=False),
        sa.Column("start", sa.JSON(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=True),
        sa.Column("update", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id"),
    )
    op.create_index("ix_study_jobs_study_id", "study_jobs", ["study_id"], unique=False)
    op.create_index("ix_study_jobs_study_version", "study_jobs", ["study_id", "version"], unique=True)
    op.create_table(
        "study_tasks",
        sa.Column("study_id", sa.String(length=36), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("task_index", sa.Integer(), nullable=False),
        sa.Column("held_out", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("study_id", "position"),
    )
    op.create_index("ix_study_tasks_job_task", "study_tasks", ["job_id", "task_index"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_study_tasks_job_task", table_name="study_tasks")
    op.drop_table("study_tasks")
    op.drop_index("ix_study_jobs_study_version", table_name="study_jobs")
    op.drop_index("ix_study_jobs_study_id", table_name="study_jobs")
    op.drop_table("study_jobs")
    op.drop_index("ix_studies_tenant_created_at", table_name="studies")
    op.drop_table("studies")
