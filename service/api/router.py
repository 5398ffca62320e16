"""All routes of the API, one module per resource."""

from typing import Any

from fastapi import APIRouter, Depends

from service.api.auth import authenticate
from service.api.errors import Message
from service.api.routes import datasets, events, health, jobs, metrics, models, studies, workers

# Every /v1 route needs a key (service/api/auth.py); the probes and /metrics stay open.
_UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    401: {"model": Message, "description": "No key, or a malformed, unknown or revoked one (the detail says which)."}
}

api_router = APIRouter()
for keyed in (jobs.router, events.router, datasets.router, models.router, workers.router, studies.router):
    api_router.include_router(keyed, dependencies=[Depends(authenticate)], responses=_UNAUTHORIZED)
api_router.include_router(health.router)
api_router.include_router(metrics.router)
