"""A tenant's uploads in progress, counted in the database (table ``upload_slots``), so that its quota
(``max_concurrent_uploads``: ``gradtune keys quota``, default GRADTUNE_TENANT_MAX_CONCURRENT_UPLOADS)
holds across the API processes that share the database (``uvicorn --workers N``, several replicas).

An upload takes a slot before its body is read (``take``) and gives it back however it ends
(``release``). Taking one is a short transaction under the tenant's lock (``repository.lock_tenant``:
its ``tenants`` row ``FOR UPDATE`` on PostgreSQL; on SQLite every write transaction begins with
``BEGIN IMMEDIATE`` and so excludes the others): the quota read, the tenant's expired slots deleted,
its live ones counted and, under the quota, one more inserted. Two processes cannot both take the
last slot.

A slot expires ``GRADTUNE_UPLOAD_SLOT_SECONDS`` after it was taken (the database's clock,
service/db/clock.py): the slot of a process that died mid-upload stops counting then. (The machine-
wide GRADTUNE_MAX_CONCURRENT_UPLOADS stays per process: it bounds that process's memory and disk.)
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from service import keys, repository
from service.db.clock import database_now
from service.db.models import UploadSlot

logger = logging.getLogger("service.upload_quota")


@dataclass(frozen=True)
class Taken:
    """What ``take`` found: the tenant's quota, its uploads in progress before this one, and the
    slot taken (its id), or None when the quota was already reached."""

    limit: int
    in_progress: int
    slot: str | None


def take(session: Session, *, tenant: str, settings: Any) -> Taken:
    """Take one of ``tenant``'s upload slots if it has fewer live ones than its quota; committed."""
    try:
        repository.lock_tenant(session, tenant=tenant)
        limit = keys.quotas_of(session, tenant=tenant, settings=settings)["max_concurrent_uploads"]
        now = database_now(session)
        session.execute(delete(UploadSlot).where(UploadSlot.tenant == tenant, UploadSlot.expires_at <= now))
        live = session.scalar(select(func.count()).select_from(UploadSlot).where(UploadSlot.tenant == tenant)) or 0
        slot = None
        if live < limit:
            slot = str(uuid.uuid4())
            expires = now + timedelta(seconds=settings.upload_slot_seconds)
            session.add(UploadSlot(id=slot, tenant=tenant, started_at=now, expires_at=expires))
        session.commit()
    except BaseException:
        session.rollback()
        raise
    return Taken(limit=limit, in_progress=live, slot=slot)


def release(factory: sessionmaker[Session], slot: str) -> None:
    """Delete the slot. A database error is logged, not raised: the upload's answer stands, and the
    slot stops counting when it expires."""
    try:
        with factory() as session:
            session.execute(delete(UploadSlot).where(UploadSlot.id == slot))
            session.commit()
    except SQLAlchemyError as exc:
        logger.warning("could not give back the upload slot %s (it counts until it expires): %s", slot, exc)
