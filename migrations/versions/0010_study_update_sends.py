"""Study updates are re-sent when their message is lost: when one was last sent, and how many times.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-12

Mirrors service/db/models.py (``StudyJob.update_sent_at``, ``StudyJob.update_attempts``);
tests/migrations checks that head matches the models and that a populated 0009 database keeps
every row.

- ``update_sent_at``: when the update message after the job was last sent (NULL: none outstanding);
  the workers' sweep (service/studies.py sweep_updates) sends another once it is older than the
  visibility timeout (presumed lost).
- ``update_attempts``: how many update messages were sent; the sweep stops at ``max_attempts``.

Existing rows get NULL and 0: a succeeded job of a study whose update is not recorded yet gets its
update message from the sweep (a message still in flight then makes a duplicate, which finds the
update recorded and does nothing). The downgrade drops just the two columns.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("study_jobs", sa.Column("update_sent_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("study_jobs", sa.Column("update_attempts", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    op.drop_column("study_jobs", "update_attempts")
    op.drop_column("study_jobs", "update_sent_at")
