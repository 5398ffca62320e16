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


def upgrade() -> None:
    if not context.is_offline_mode():
        _refuse_unknown_statuses()
    with op.batch_alter_table("jobs") as batch:
        batch.create_check_constraint("ck_jobs_status", CHECK)


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint("ck_jobs_status", type_="check")
