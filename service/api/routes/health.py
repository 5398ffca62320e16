"""Liveness and readiness probes."""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import text

from service import workers
from service.db.migrate import current_heads

logger = logging.getLogger("service.api.health")

router = APIRouter(tags=["health"])

NO_LIVE_WORKER = "no live worker"


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ok", "unavailable"]
    detail: str | None = None
    checks: dict[str, str]


@lru_cache
def _heads() -> frozenset[str]:
    return frozenset(current_heads())


def _short(exc: BaseException) -> str:
    """The exception's type and first line: for the log only, never for the response."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:200]}" if first else type(exc).__name__


def _check_database(request: Request) -> str | None:
    """None when the database answers and its schema is at the migrations' head."""
    try:
        with request.app.state.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            try:
                versions = set(conn.execute(text("SELECT version_num FROM alembic_version")).scalars())
            except Exception:
                return "reachable but not migrated (run the migrations: alembic upgrade head)"
    except Exception as exc:
        logger.warning("readiness: database unreachable: %s", _short(exc))
        return "unreachable"
    if versions != set(_heads()):
        return (
            f"schema at revision {', '.join(sorted(versions)) or 'none'}, expected "
            f"{', '.join(sorted(_heads()))} (run the migrations: alembic upgrade head)"
        )
    return None


def _check_broker(request: Request) -> str | None:
    try:
        request.app.state.producer.ping(timeout=2.0)
    except Exception as exc:
        logger.warning("readiness: broker unreachable: %s", _short(exc))
        return "unreachable"
    return None


def _check_workers(request: Request) -> str | None:
    """None when a worker was seen within the stale time (a registered, heartbeating process)."""
    stale = request.app.state.settings.worker_stale_seconds
    try:
        with request.app.state.sessionmaker() as session:
            if workers.any_live(session, stale_after_s=stale):
                return None
    except Exception as exc:
        logger.warning("readiness: cannot read the workers: %s", _short(exc))
        return "unknown"
    return NO_LIVE_WORKER


@router.get("/healthz", response_model=Health, summary="The process is alive")
def healthz() -> Health:
    return Health()


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="The database, the broker and a worker are there",
    description="200 when the database answers at the migrations' head, the broker answers and a worker "
    "was seen within GRADTUNE_WORKER_STALE_SECONDS (the worker check is skipped, and absent from "
    "`checks`, with GRADTUNE_READY_NEEDS_WORKER=false: an API-only deployment). Otherwise 503, and "
    "`checks` names what is down (`unreachable`, `no live worker`) without the error's text, which "
    "is logged on the server.",
    responses={
        503: {
            "model": Readiness,
            "description": "Something the service needs is down; `checks` says what.",
            "content": {
                "application/json": {
                    "example": {
                        "status": "unavailable",
                        "detail": "not ready: broker unreachable; no live worker",
                        "checks": {"database": "ok", "broker": "unreachable", "workers": "no live worker"},
                    }
                }
            },
        }
    },
)
def readyz(request: Request):
    problems = {"database": _check_database(request), "broker": _check_broker(request)}
    if request.app.state.settings.ready_needs_worker:
        # The workers table lives in the database: without it, whether one is live is unknown.
        problems["workers"] = _check_workers(request) if problems["database"] is None else "unknown"
    checks = {name: problem or "ok" for name, problem in problems.items()}
    failed = [p if p == NO_LIVE_WORKER else f"{name} {p}" for name, p in problems.items() if p]
    if failed:
        detail = "not ready: " + "; ".join(failed)
        logger.warning(detail)
        return JSONResponse(
            status_code=503,
            content=Readiness(status="unavailable", detail=detail, checks=checks).model_dump(),
        )
    return Readiness(status="ok", checks=checks)
