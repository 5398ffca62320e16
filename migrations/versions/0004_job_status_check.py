"""Job status: a CHECK constraint limits jobs.status to the five statuses.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

Mirrors service/db/models.py (``ck_jobs_status``); tests/migrations checks that head matches the
models and that the list below is gradtune.spec's JobStatus. The values are written out here, not
imported: a migration is a snapshot, and a new status needs a new migration.

SQLite cannot add a constraint to a table: batch mode copies ``jobs`` into a new table. env.py runs
SQLite migrations with foreign keys off, so dropping the old table does not cascade into the
tables that refer to it (job_iterations, job_datasets, job_models).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
CHECK = "status IN (" + ", ".join(f"'{s}'" for s in STATUSES) + ")"


def _refuse_unknown_statuses() -> None:
    """Fail with the rows to fix, rather than with the database's constraint error."""
    jobs = sa.table("jobs", sa.column("id", sa.String), sa.column("status", sa.String))
    bad = (
        op.get_bind().execute(sa.select(jobs.c.id, jobs.c.status).where(jobs.c.status.not_in(STATUSES)).limit(5)).all()
    )
    if bad:
        listed = ", ".join(f"{row.id} ({row.status!r})" for row in bad)
        raise RuntimeError(
            f"jobs with a status outside {', '.join(STATUSES)}: {listed}; correct them, then upgrade again"
        )


def _jobs(with_check: bool) -> sa.Table | None:
    """The jobs table as 0001-0003 left it (plus the constraint, ``with_check``), for ``--sql`` on
    SQLite: batch mode cannot reflect a table without a database. Online it reflects the table."""
    if not context.is_offline_mode():
        return None
    constraints: list[sa.SchemaItem] = [sa.PrimaryKeyConstraint("id")]
    if with_check:
        constraints.append(sa.CheckConstraint(CHECK, name="ck_jobs_status"))
    table = sa.Table(
        "jobs",
        sa.MetaData(),
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("iteration", sa.Integer(), nullable=False),
        sa.Column("iterations", sa.Integer(), nullable=False),
        sa.Column("meta_loss", sa.Float(), nullable=True),
        sa.Column("lr", sa.Float(), nullable=True),
        sa.Column("momentum", sa.Float(), nullable=True),
        sa.Column("checkpoint", sa.JSON(), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("lease_owner", sa.String(length=64), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("chunks_started", sa.Integer(), nullable=False),
        sa.Column("chunks_committed", sa.Integer(), nullable=False),
        sa.Column("device", sa.String(length=32), nullable=True),
        *constraints,
    )
    sa.Index("ix_jobs_status_created_at", table.c.status, table.c.created_at)
    return table


def upgrade() -> None:
    if not context.is_offline_mode():
        _refuse_unknown_statuses()
    with op.batch_alter_table("jobs", copy_from=_jobs(with_check=False)) as batch:
        batch.create_check_constraint("ck_jobs_status", CHECK)


def downgrade() -> None:
    with op.batch_alter_table("jobs", copy_from=_jobs(with_check=True)) as batch:
        batch.drop_constraint("ck_jobs_status", type_="check")
