"""Request dependencies as type aliases, so route handlers stay a few lines.

Everything comes from ``request.app.state`` (set by ``service.main.create_app``), so two apps
with different settings can live in one process (tests do this).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from service.db.session import read_sessionmaker
from service.queue import Producer
from service.settings import Settings
from service.storage import ArtifactStore

# The most rows a list may skip (?offset=): past it the answer is 422 naming the parameter, not a
# database error (SQLite and PostgreSQL take a 64-bit offset at most).
MAX_OFFSET = 1_000_000_000


def get_db(request: Request) -> Iterator[Session]:
    """One session per request; whatever the handler did not commit is rolled back."""
    session: Session = request.app.state.sessionmaker()
    try:
        yield session
    finally:
        session.close()


def read_sessionmaker_of(state: Any) -> sessionmaker[Session]:
    """``state.sessionmaker``'s read twin (``service.db.session.read_sessionmaker``), made once."""
    factory = getattr(state, "read_sessionmaker", None)
    if factory is None or getattr(state, "read_sessionmaker_of", None) is not state.sessionmaker:
        factory = read_sessionmaker(state.sessionmaker)
        state.read_sessionmaker, state.read_sessionmaker_of = factory, state.sessionmaker
    return factory


async def get_reader(request: Request) -> Engine:
    """The read engine (see ``get_read_db``) for a hot handler that opens its own connection: as an
    async dependency it costs no thread-pool hop, so a sync handler runs in one hop like a bare one,
    and a Core connection skips the ORM session's bookkeeping."""
    return read_sessionmaker_of(request.app.state).kw["bind"]


def get_read_db(request: Request) -> Iterator[Session]:
    """A session for handlers that only read: on SQLite it begins deferred, so it takes no write
    lock and neither waits for a worker's commit nor delays one (WAL readers see the last commit)."""
    session: Session = read_sessionmaker_of(request.app.state)()
    try:
        yield session
    finally:
        session.close()


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_producer(request: Request) -> Producer:
    return request.app.state.producer


def get_store(request: Request) -> ArtifactStore:
    return request.app.state.store


def require_json(request: Request) -> None:
    """Refuse bodies not declared as JSON with 415 and a sentence saying how to send them.

    FastAPI parses a body as JSON only under a JSON Content-Type (accepting others would let
    any web page post jobs to a local server with a plain HTML form).
    """
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
        return
    got = f"Content-Type {content_type!r}" if content_type else "no Content-Type"
    raise HTTPException(
        status_code=415,
        detail=(
            f"the request body must be JSON sent with Content-Type: application/json, got {got} "
            "(with curl: --json @job.json, or -H 'Content-Type: application/json' -d @job.json)"
        ),
    )


SessionDep = Annotated[Session, Depends(get_db)]
ReadSessionDep = Annotated[Session, Depends(get_read_db)]
ReaderDep = Annotated[Engine, Depends(get_reader)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
ProducerDep = Annotated[Producer, Depends(get_producer)]
StoreDep = Annotated[ArtifactStore, Depends(get_store)]
