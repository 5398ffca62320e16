"""Tenants and API keys: jobs, datasets and models belong to a tenant; existing rows go to "default".

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03

Mirrors service/db/models.py (``Tenant``, ``ApiKey``, the ``tenant`` columns); tests/migrations checks
that head matches the models and that a populated 0006 database keeps every row.

- ``tenants`` (with the row ``default``) and ``api_keys``: new tables.
- ``tenant`` on jobs, datasets and models: NOT NULL with the server default ``default``, so every
  existing row belongs to it.
- The same bytes were one dataset (unique ``sha256``); now one per tenant: unique ``(tenant, sha256)``,
  and a plain index on ``sha256`` (the store keeps one object while any row holds it).

Downgrade: refused while two rows of one table share a sha256 (the old unique index could not hold);
otherwise the columns, indexes and tables go, and the keys with them.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DEFAULT = "default"
FILES = ("datasets", "models")


def upgrade() -> None:
    tenants = op.create_table(
        "tenants",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("max_active_jobs", sa.Integer(), nullable=True),
        sa.Column("max_stored_bytes", sa.BigInteger(), nullable=True),
        sa.Column("max_concurrent_uploads", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("admin", sa.Boolean(), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["tenant"], ["tenants.name"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_api_keys_tenant", "api_keys", ["tenant"], unique=False)
    op.execute(tenants.insert().values(name=DEFAULT, created_at=sa.func.current_timestamp()))

    for table in ("jobs", *FILES):
        op.add_column(table, sa.Column("tenant", sa.String(length=64), nullable=False, server_default=DEFAULT))
        op.create_index(f"ix_{table}_tenant_created_at", table, ["tenant", "created_at"], unique=False)
    for table in FILES:
        op.drop_index(f"ix_{table}_sha256", table_name=table)
        op.create_index(f"ix_{table}_sha256", table, ["sha256"], unique=False)
        op.create_index(f"ix_{table}_tenant_sha256", table, ["tenant", "sha256"], unique=True)


def _refuse_shared_bytes() -> None:
    bind = op.get_bind()
    for table in FILES:
        t = sa.table(table, sa.column("sha256", sa.String))
        shared = bind.execute(sa.select(t.c.sha256).group_by(t.c.sha256).having(sa.func.count() > 1).limit(3)).all()
        if shared:
            listed = ", ".join(row.sha256 for row in shared)
            raise RuntimeError(
                f"{table} holds the same bytes for several tenants (sha256 {listed}); before 0007 the "
                "bytes were unique, so delete all but one of those rows, then downgrade again"
            )


def downgrade() -> None:
    _refuse_shared_bytes()
    for table in FILES:
        op.drop_index(f"ix_{table}_tenant_sha256", table_name=table)
        op.drop_index(f"ix_{table}_sha256", table_name=table)
        op.create_index(f"ix_{table}_sha256", table, ["sha256"], unique=True)
    for table in ("jobs", *FILES):
        op.drop_index(f"ix_{table}_tenant_created_at", table_name=table)
        op.drop_column(table, "tenant")
    op.drop_index("ix_api_keys_tenant", table_name="api_keys")
    op.drop_table("api_keys")
    op.drop_table("tenants")
