"""``gradtune keys``: create, list and revoke API keys, and set tenants' quotas.

Like ``gradtune migrate``, these commands talk to the database directly (GRADTUNE_DATABASE_URL, or
SQLite in GRADTUNE_DATA_DIR): whoever can run them on the server's machine is its operator. A new
key is printed once, as the last line of standard output; the database keeps only its hash.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import typer

from gradtune.extras import fail, require
from gradtune.spec.vocab import TENANT_RE, TENANT_RULE

keys_cli = typer.Typer(no_args_is_help=True, help=__doc__)


def _tenant(name: str | None) -> str | None:
    """--tenant's check, before anything reaches the database."""
    if name is not None and not TENANT_RE.fullmatch(name):
        raise typer.BadParameter(f"{name!r} is not a tenant name: {TENANT_RULE}")
    return name


@contextmanager
def _session() -> Iterator[Any]:
    """A session on the configured database, committed at the end (the schema must be at head)."""
    require("keys", "api")
    from service.db.session import DatabaseUnavailable, scoped_session
    from service.settings import get_settings

    settings = get_settings()
    settings.ensure_dirs()
    try:
        with scoped_session(settings.resolved_database_url()) as session:
            yield session
    except DatabaseUnavailable as exc:
        fail(str(exc))


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else "-"


@keys_cli.command("create")
def create(
    tenant: str = typer.Option(..., "--tenant", callback=_tenant, help="The tenant the key acts for (created if new)."),
    admin: bool = typer.Option(False, "--admin", help="May list every tenant's jobs, datasets and models."),
) -> None:
    """Create a key; the key itself is the last line of standard output, shown this once."""
    require("keys", "api")
    from service import keys

    with _session() as session:
        row, key = keys.create_key(session, tenant=tenant, admin=admin)
    typer.echo(f"created key {row.id} for tenant {tenant}{' (admin)' if admin else ''}; it is shown only now:")
    typer.echo(key)


@keys_cli.command("list")
def list_(
    tenant: str | None = typer.Option(None, "--tenant", callback=_tenant, help="Only this tenant's keys."),
) -> None:
    """Keys: id, tenant, admin, created, last used, revoked (never the keys themselves)."""
    require("keys", "api")
    from service import keys

    with _session() as session:
        rows = keys.list_keys(session, tenant=tenant)
        lines = [
            f"{r.id}  {r.tenant:<16}  {'admin' if r.admin else '-':<5}  {_when(r.created_at)}  "
            f"{_when(r.last_used_at)}  {_when(r.revoked_at)}"
            for r in rows
        ]
    typer.echo(f"{'id':<16}  {'tenant':<16}  admin  {'created':<19}  {'last used':<19}  revoked")
    for line in lines:
        typer.echo(line)


@keys_cli.command("revoke")
def revoke(key_id: str = typer.Argument(..., help="The key's id (gradtune keys list).")) -> None:
    """Revoke a key: requests with it get 401 (within GRADTUNE_KEY_CACHE_SECONDS on a running API)."""
    require("keys", "api")
    from service import keys

    with _session() as session:
        try:
            row = keys.revoke_key(session, key_id=key_id)
        except LookupError as exc:
            fail(str(exc))
        typer.echo(f"revoked key {row.id} of tenant {row.tenant}")


@keys_cli.command("quota")
def quota(
    tenant: str = typer.Option(..., "--tenant", callback=_tenant, help="The tenant (created if new)."),
    active_jobs: int | None = typer.Option(None, "--active-jobs", min=0, help="Queued + running jobs at once."),
    stored_bytes: int | None = typer.Option(None, "--stored-bytes", min=0, help="Bytes of datasets and models."),
    uploads: int | None = typer.Option(None, "--uploads", min=0, help="Uploads in progress at once."),
    reset: bool = typer.Option(False, "--reset", help="Back to the settings' defaults (GRADTUNE_TENANT_MAX_*)."),
) -> None:
    """Set a tenant's quotas (those given), or --reset them; prints the quotas in force."""
    require("keys", "api")
    from service import keys
    from service.settings import get_settings

    given = {"max_active_jobs": active_jobs, "max_stored_bytes": stored_bytes, "max_concurrent_uploads": uploads}
    with _session() as session:
        if reset:
            keys.set_quotas(session, tenant=tenant, **dict.fromkeys(keys.QUOTAS))
        changes = {name: value for name, value in given.items() if value is not None}
        if changes:
            keys.set_quotas(session, tenant=tenant, **changes)
        elif not reset:
            keys.ensure_tenant(session, name=tenant)
        quotas = keys.quotas_of(session, tenant=tenant, settings=get_settings())
    for name, value in quotas.items():
        typer.echo(f"{tenant}  {name}  {value}")
