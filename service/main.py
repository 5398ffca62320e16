"""The API application: ``create_app(settings)``.

Run it with ``uvicorn --factory service.main:create_app`` (settings from GRADTUNE_*), or
``uvicorn service.main:app``: ``app`` is built on first access, so importing this module
opens nothing and creates no files. The schema is not created here: run the migrations first
(``service.db.migrate.upgrade(url)`` or ``alembic upgrade head``).

This module, like all of ``service``, never imports torch, numpy or ``worker``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.middleware.trustedhost import TrustedHostMiddleware
from sqlalchemy.orm import sessionmaker

from service.api.auth import KeyMiddleware
from service.api.dashboard import install_dashboard
from service.api.docs import install_docs
from service.api.errors import install_error_handlers
from service.api.middleware import BodySizeLimitMiddleware
from service.api.request_id import RequestIdMiddleware
from service.api.router import api_router
from service.api.routes.datasets import UPLOAD_PATH
from service.api.routes.models import UPLOAD_PATH as MODEL_UPLOAD_PATH
from service.api.status_cache import StatusCache
from service.db.session import make_engine
from service.logs import configure_logging
from service.metrics import HttpMetricsMiddleware
from service.queue import Producer
from service.settings import Settings, get_settings

DESCRIPTION = """
Self-hosted hyperparameter tuning: submit a job (tasks = data + model + loss + steps), and
workers learn SGD's learning rate and momentum by differentiating the validation loss through
the unrolled training. Poll the job, then fetch settings that go straight into
`torch.optim.SGD(params, lr=..., momentum=...)`.

Datasets: upload a file (`POST /v1/datasets`, multipart field `file`) and name its id in a
task's data (`{"source": "dataset", "train": {"dataset": id, "x": ..., "y": ...}}`).

Models: upload a `torch.export` archive (`POST /v1/models`, multipart field `file`, `.pt2`) and
name its id in a task's model (`{"kind": "exported", "model": id}`).

Keys: every /v1 route needs `Authorization: Bearer <key>` (Authorize, above); a key belongs to a
tenant, and a tenant sees only its own jobs, datasets and models (another tenant's id answers 404).

Errors: 400 malformed JSON, 401 missing, malformed, unknown or revoked key,
404 unknown job or dataset, 409 wrong status (or a dataset in use),
413 body or file too large, 415 not JSON (or not multipart for uploads), 422 invalid job or
refused file (`detail` lists `loc`, `field`, `msg`, `type` per problem), 429 over a tenant's
quota of active jobs or uploads (`Retry-After`).
"""

TAGS = [
    {"name": "jobs", "description": "Submit, follow and cancel tuning jobs; fetch the learned settings."},
    {"name": "datasets", "description": "Upload dataset files (safetensors, npz, csv, parquet) that tasks can name."},
    {"name": "models", "description": "Upload exported PyTorch programs (.pt2) that tasks can name (kind exported)."},
    {"name": "workers", "description": "The worker processes that registered, and which are live."},
    {"name": "health", "description": "Liveness and readiness probes."},
]


def create_app(settings: Settings | None = None) -> FastAPI:
    """A FastAPI app with its own engine, sessionmaker and queue producer on ``app.state``."""
    settings = settings or get_settings()
    if settings.log_format:  # GRADTUNE_LOG_FORMAT set: this process's lines, uvicorn's included
        configure_logging(settings)
    settings.ensure_dirs()
    engine = make_engine(settings.resolved_database_url())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.dispose()

    app = FastAPI(
        title="gradtune",
        version="1",
        summary="Hyperparameter tuning by hypergradients, as a service.",
        description=DESCRIPTION,
        openapi_tags=TAGS,
        lifespan=lifespan,
        docs_url=None,  # /docs and /redoc from local assets: install_docs below
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessionmaker = sessionmaker(bind=engine, expire_on_commit=False)
    app.state.producer = Producer(settings)
    app.state.store = settings.artifact_store()  # connects on first use only
    app.state.key_cache = {}  # service/api/auth.py: checked keys, per process
    app.state.status_cache = StatusCache(settings.status_cache_seconds)  # GET /v1/jobs/{id}
    install_error_handlers(app)
    # Dataset uploads stream past the body limit: their route enforces GRADTUNE_MAX_UPLOAD_BYTES.
    app.add_middleware(
        BodySizeLimitMiddleware,
        max_body_bytes=settings.max_body_bytes,
        passthrough=(("POST", UPLOAD_PATH), ("POST", MODEL_UPLOAD_PATH)),
    )
    # A /v1 request without a valid key gets 401 before its body is read (service/api/auth.py).
    app.add_middleware(KeyMiddleware)
    # GET /metrics: latency by route template and status (service/metrics.py), the key check's 401s
    # included (a flood of bad keys shows there)
    app.add_middleware(HttpMetricsMiddleware)
    # Outside the key check: a browser's preflight carries no key. No CORS unless configured.
    if settings.cors_origins:  # no CORS unless configured: a web page cannot read the API's answers
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )
    # Then: a request naming another host (DNS rebinding) gets 400 before anything else runs.
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=settings.resolved_allowed_hosts())
    # Outermost of all: every answer, refusals included, carries X-Request-ID (service/api/request_id.py).
    app.add_middleware(RequestIdMiddleware)
    app.include_router(api_router)
    install_docs(app)
    install_dashboard(app)
    return app


# Declared, not bound: the first ``service.main.app`` reaches __getattr__, which builds and binds it.
app: FastAPI


def __getattr__(name: str) -> FastAPI:
    # ``uvicorn service.main:app`` without building an app (and opening a database) at import.
    if name == "app":
        global app
        app = create_app()
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
