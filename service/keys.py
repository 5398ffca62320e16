"""API keys and tenants: keyword-only data functions (like service.repository), no FastAPI.

A key reads ``gt_<id>_<secret>``: ``id`` is 16 hex digits, public (``gradtune keys list`` shows it),
``secret`` 43 URL-safe characters (32 random bytes from ``secrets``). The database keeps the id and
the SHA-256 of the whole key, never the key: a copy of the database lets nobody in. A plain SHA-256
suffices because the secret is random (256 bits), not a password to guess; the stored hash is
compared with ``hmac.compare_digest``, in constant time.

``check_key`` says who a key is (``Principal``) or why it is refused (``KeyRefused`` with a sentence).
``last_used_at`` is written at most once a minute per key, so that polling does not turn every read
into a write.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from gradtune.spec import ADMIN_KEY_FILE, DEFAULT_TENANT, TENANT_RE, TENANT_RULE
from service.db.clock import database_now
from service.db.models import ApiKey, Tenant

PREFIX = "gt_"
KEY_RE = re.compile(r"^gt_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
# last_used_at is refreshed when older than this (a write per key per minute at most).
LAST_USED_EVERY = timedelta(seconds=60)
# The quotas a tenant can override (Tenant columns), and the settings that give their defaults.
QUOTAS = {
    "max_active_jobs": "tenant_max_active_jobs",
    "max_stored_bytes": "tenant_max_stored_bytes",
    "max_concurrent_uploads": "tenant_max_concurrent_uploads",
}


@dataclass(frozen=True)
class Principal:
    """Who a request is: the key's id, its tenant, and whether it is an admin key."""

    key_id: str
    tenant: str
    admin: bool

    def scope(self) -> str | None:
        """The tenant whose rows it may see by id: its own, or any (None) for an admin key."""
        return None if self.admin else self.tenant


class KeyRefused(Exception):
    """The key cannot be used: ``reason`` is one of missing, malformed, unknown, revoked."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class BadTenant(ValueError):
    pass


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> tuple[str, str]:
    """A fresh ``(key id, key)``."""
    key_id = uuid.uuid4().hex[:16]
    return key_id, f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def check_tenant_name(name: str) -> str:
    if not TENANT_RE.fullmatch(name or ""):
        raise BadTenant(f"tenant name {name!r} is not valid: {TENANT_RULE}")
    return name


def ensure_tenant(session: Session, *, name: str) -> Tenant:
    """The tenant ``name``, created if new (the caller commits)."""
    check_tenant_name(name)
    tenant = session.get(Tenant, name)
    if tenant is None:
        tenant = Tenant(name=name, created_at=database_now(session))
        session.add(tenant)
        session.flush()
    return tenant


def create_key(session: Session, *, tenant: str, admin: bool = False) -> tuple[ApiKey, str]:
    """A new key for ``tenant`` (created if new): the row and the key, which is never stored."""
    ensure_tenant(session, name=tenant)
    key_id, key = new_key()
    row = ApiKey(id=key_id, tenant=tenant, admin=admin, key_hash=hash_key(key), created_at=database_now(session))
    session.add(row)
    session.flush()
    return row, key


def list_keys(session: Session, *, tenant: str | None = None) -> list[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if tenant is not None:
        query = query.where(ApiKey.tenant == tenant)
    return list(session.scalars(query).all())


def count_keys(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(ApiKey)) or 0


def revoke_key(session: Session, *, key_id: str) -> ApiKey:
    """Revoke the key (again: no change); LookupError for an unknown id."""
    row = session.get(ApiKey, key_id)
    if row is None:
        raise LookupError(f"no API key with id {key_id!r}")
    if row.revoked_at is None:
        row.revoked_at = database_now(session)
        session.flush()
    return row


def parse_bearer(authorization: str | None) -> str:
    """The key in an ``Authorization: Bearer <key>`` header, or ``KeyRefused``."""
    if not authorization:
        raise KeyRefused(
            "missing",
            "this route needs an API key: send the header 'Authorization: Bearer <key>' (an admin "
            "creates keys with: gradtune keys create --tenant NAME)",
        )
    scheme, _, key = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise KeyRefused("malformed", "the Authorization header must read 'Bearer <key>'")
    key = key.strip()
    if not KEY_RE.fullmatch(key):
        raise KeyRefused("malformed", "the API key is malformed: gradtune keys read gt_<16 hex digits>_<43 characters>")
    return key


def check_key(session: Session, key: str) -> tuple[Principal, ApiKey]:
    """Who ``key`` (a well-formed key) is, or ``KeyRefused`` (unknown, revoked)."""
    match = KEY_RE.fullmatch(key)
    if match is None:
        raise KeyRefused("malformed", "the API key is malformed")
    row = session.get(ApiKey, match.group(1))
    # Compared in constant time even for an unknown id (against a hash no key has).
    stored = row.key_hash if row is not None else "0" * 64
    if not hmac.compare_digest(stored, hash_key(key)) or row is None:
        raise KeyRefused("unknown", "the API key is not known to this server")
    if row.revoked_at is not None:
        raise KeyRefused("revoked", f"the API key {row.id} was revoked; ask an admin for a new one")
    return Principal(key_id=row.id, tenant=row.tenant, admin=bool(row.admin)), row


def last_use_is_stale(session: Session, row: ApiKey) -> bool:
    """Whether the key's ``last_used_at`` is unset or older than a minute (by the database's clock)."""
    last = row.last_used_at
    if last is None:
        return True
    now = database_now(session)
    if last.tzinfo is None:
        last = last.replace(tzinfo=now.tzinfo)
    return now - last >= LAST_USED_EVERY


def record_use(session: Session, *, key_id: str) -> None:
    """Set the key's ``last_used_at`` to now unless another request did within the minute (the
    caller commits)."""
    now = database_now(session)
    session.execute(
        update(ApiKey)
        .where(ApiKey.id == key_id)
        .where(or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < now - LAST_USED_EVERY))
        .values(last_used_at=now)
    )


def set_quotas(session: Session, *, tenant: str, **quotas: Any) -> Tenant:
    """Override a tenant's quotas (``QUOTAS``' names; a value None restores the default)."""
    unknown = set(quotas) - set(QUOTAS)
    if unknown:
        raise ValueError(f"unknown quota(s): {', '.join(sorted(unknown))}")
    row = ensure_tenant(session, name=tenant)
    for name, value in quotas.items():
        if value is not None and int(value) < 0:
            raise ValueError(f"{name} must be 0 or more, got {value}")
        setattr(row, name, None if value is None else int(value))
    session.flush()
    return row


def quotas_of(session: Session, *, tenant: str, settings: Any) -> dict[str, int]:
    """The tenant's quotas: its overrides, else the settings' defaults."""
    row = session.get(Tenant, tenant)
    return {
        name: int(value) if (value := getattr(row, name, None)) is not None else int(getattr(settings, setting))
        for name, setting in QUOTAS.items()
    }


def first_admin_key(session: Session, data_dir: Path) -> tuple[Path, str] | None:
    """On a database with no key at all: tenant ``default`` and an admin key, written to
    ``<data_dir>/admin.key`` (mode 0600) and committed; ``(path, key)``, or None when keys exist."""
    if count_keys(session) > 0:
        return None
    _row, key = create_key(session, tenant=DEFAULT_TENANT, admin=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    path = (data_dir / ADMIN_KEY_FILE).resolve()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    os.chmod(path, 0o600)  # also when the file was there with another mode
    session.commit()
    return path, key
