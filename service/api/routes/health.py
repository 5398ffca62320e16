"""Liveness and readiness probes."""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import text

from service.db.migrate import current_heads

logger = logging.getLogger("service.api.health")

router = APIRouter(tags=["health"])


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
        return f"unreachable ({_short(exc)})"
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
        return f"unreachable ({_short(exc)})"
    return None


@router.get("/healthz", response_model=Health, summary="The process is alive")
def healthz() -> Health:
    return Health()


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="The database and the broker are reachable",
    responses={
        503: {
            "model": Readiness,
            "description": "A dependency is not reachable; `checks` says which.",
            "content": {
                "application/json": {
                    "example": {
                        "status": "unavailable",
                        "detail": "not ready: broker unreachable (OperationalError: Error 111 "
                        "connecting to 127.0.0.1:6379. Connection refused.)",
                        "checks": {"database": "ok", "broker": "unreachable (...)"},
                    }
                }
            },
        }
    },
)
def readyz(request: Request):
    problems = {"database": _check_database(request), "broker": _check_broker(request)}
    checks = {name: problem or "ok" for name, problem in problems.items()}
    failed = [f"{name} {problem}" for name, problem in problems.items() if problem]
    if failed:
        detail = "not ready: " + "; ".join(failed)
        logger.warning(detail)
        return JSONResponse(
            status_code=503,
            content=Readiness(status="unavailable", detail=detail, checks=checks).model_dump(),
        )
    return Readiness(status="ok", checks=checks)
