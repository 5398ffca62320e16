"""/v1/jobs: submit a tuning job, follow it, cancel it, fetch the learned settings."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Body, Depends, HTTPException, Path, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from sqlalchemy import Engine
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from service import keys, lifecycle, placement, repository, studies
from service.api.auth import PrincipalDep, TenantQuery, listing_scope
from service.api.deps import MAX_OFFSET, ProducerDep, ReaderDep, ReadSessionDep, SessionDep, SettingsDep, require_json
from service.api.errors import Message, ValidationErrorBody, retry_later
from service.api.routes.studies import study_for_job
from service.api.status_cache import CachedStatus, StatusCache
from service.schemas import (
    HistoryPublic,
    IterationPublic,
    JobCreate,
    JobPublic,
    JobsPublic,
    SettingsPublic,
    Status,
    Text,
)
from service.settings import Settings
from service.validation import check_job

logger = logging.getLogger("service.api.jobs")

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

JobId = Annotated[Text, Path(description="The job id returned by POST /v1/jobs.")]

_NOT_FOUND = {
    "model": Message,
    "description": "No job with that id.",
    "content": {"application/json": {"example": {"detail": "job 0b6f... not found"}}},
}
_INVALID = {
    "model": ValidationErrorBody,
    "description": "The body (or a query parameter) is invalid: one entry per problem, with its "
    "field path and the reason. The offending values are not echoed.",
    "content": {
        "application/json": {
            "example": {
                "detail": [
                    {
                        "loc": ["body", "tasks", 0, "batch_size"],
                        "field": "tasks[0].batch_size",
                        "msg": "batch_size 64 is larger than the training set (40 rows); the last "
                        "partial batch is dropped, so no step could run",
                        "type": "batch_too_large",
                    }
                ]
            }
        }
    },
}

JOB_EXAMPLES = {
    "digits": {
        "summary": "Builtin digits, four splits",
        "description": "Learn lr and momentum for an MLP on scikit-learn's digits, averaged over "
        "four train/validation splits.",
        "value": {
            "name": "digits-mlp",
            "tasks": [
                {
                    "name": f"split{seed}",
                    "data": {"source": "builtin", "name": "digits", "val_fraction": 0.2, "seed": seed},
                    "model": {"kind": "mlp", "hidden": [32], "activation": "tanh"},
                    "loss": "cross_entropy",
                    "steps": 100,
                    "batch_size": 32,
                }
                for seed in range(4)
            ],
            "hyperparameters": {"lr": 0.01, "momentum": 0.9},
            "meta": {"iterations": 40, "seed": 0},
        },
    },
    "inline": {
        "summary": "Your own arrays",
        "description": "Data inline in the body: rows of features, one integer label per row.",
        "value": {
            "name": "tiny-inline",
            "tasks": [
                {
                    "name": "t0",
                    "data": {
                        "source": "inline",
                        "x_train": [[0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0]],
                        "y_train": [1, 1, 0, 0],
                        "x_val": [[0.9, 0.1], [0.1, 0.1]],
                        "y_val": [1, 0],
                    },
                    "model": {"kind": "mlp", "hidden": [8], "activation": "tanh"},
                    "loss": "cross_entropy",
                    "steps": 20,
                    "batch_size": 2,
                }
            ],
            "hyperparameters": {"lr": 0.05, "momentum": 0.5},
            "meta": {"iterations": 10},
        },
    },
}


def _get_or_404(session, job_id: str, tenant: str | None):
    job = repository.get_job(session, job_id=job_id, tenant=tenant)
    if job is None:
        raise HTTPException(status_code=404, detail=f"job {job_id} not found")
    return job


ACTIVE_RETRY_AFTER = 30  # seconds a tenant at its active-jobs quota is asked to wait


def _check_active_quota(session: Session, tenant: str, settings: Settings) -> None:
    """429 when the tenant already has its quota of queued and running jobs."""
    limit = keys.quotas_of(session, tenant=tenant, settings=settings)["max_active_jobs"]
    if limit == 0:  # waiting would not help
        raise HTTPException(
            status_code=403,
            detail=f"tenant {tenant!r} may not submit jobs: its quota of active jobs is 0 (gradtune keys quota)",
        )
    active = repository.active_jobs(session, tenant=tenant)
    if active >= limit:
        raise retry_later(
            f"tenant {tenant!r} has {active} active jobs (queued or running), its limit is {limit} "
            f"(gradtune keys quota); wait for one to finish or cancel one, then submit again",
            ACTIVE_RETRY_AFTER,
            status_code=429,
        )


def _not_enqueued(session: Session, job_id: str) -> None:
    """No message went out: say so, so that the sweep sends one as soon as the job is stale."""
    try:
        lifecycle.clear_enqueued(session, job_id=job_id, iteration=0)
        session.commit()
    except Exception as exc:  # then the sweep waits for the visibility timeout instead
        session.rollback()
        logger.warning("job %s: could not record that no message was sent (%s)", job_id, type(exc).__name__)


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobPublic,
    summary="Submit a tuning job",
    dependencies=[Depends(require_json)],
    responses={
        202: {
            "description": "Queued. `Location` names the job's URL.",
            "headers": {"Location": {"description": "/v1/jobs/<id>", "schema": {"type": "string"}}},
        },
        400: {"model": Message, "description": "The body is not valid JSON."},
        413: {"model": Message, "description": "The body is larger than the configured limit."},
        415: {"model": Message, "description": "The body is not sent as application/json."},
        422: _INVALID,
        403: {"model": Message, "description": "The tenant's quota of active jobs is 0."},
        429: {"model": Message, "description": "The tenant has its quota of active jobs (`Retry-After`)."},
    },
)
def create_job(
    job: Annotated[JobCreate, Body(openapi_examples=JOB_EXAMPLES)],
    session: SessionDep,
    settings: SettingsDep,
    producer: ProducerDep,
    response: Response,
    principal: PrincipalDep,
) -> JobPublic:
    """Validate the job, store it as `queued` and hand it to the workers.

    The job is committed before it is enqueued; if the broker is down the job stays queued and
    the workers' sweep picks it up later. Nothing is stored when the body is refused.
    """
    # The rows of the datasets the job names stay locked until the commit, so none of them
    # can be deleted between this check and the job being stored.
    # A job names its own tenant's files only (an admin key's included).
    rows = repository.datasets_by_id(session, ids=job.dataset_ids(), tenant=principal.tenant, lock=True)
    datasets = {i: repository.dataset_to_public(d) for i, d in rows.items()}
    model_rows = repository.models_by_id(session, ids=job.model_ids(), tenant=principal.tenant, lock=True)
    models = {i: repository.model_to_public(m) for i, m in model_rows.items()}
    errors = check_job(job, settings, datasets, models)
    study, study_errors = study_for_job(session, job, principal.tenant)
    if errors or study_errors:
        raise RequestValidationError(errors + study_errors)
    _check_active_quota(session, principal.tenant, settings)
    spec, start, warm = job.model_dump(mode="json"), None, False
    if study is not None:  # it starts from the study's settings (service/studies.py)
        spec, start, warm = studies.prepare_spec(study, spec, given=job.meta_given)
        # admitted as it will run: with the study's hyperparameters (per-layer, segments) and search
        errors = check_job(JobCreate.model_validate(spec), settings, datasets, models)
        if errors:
            raise RequestValidationError(errors)
    row = repository.create_job(
        session,
        spec=spec,
        name=job.name,
        iterations=spec["meta"]["iterations"],
        max_seconds=settings.job_seconds(job.meta.max_seconds),
        tenant=principal.tenant,
    )
    if study is not None and start is not None:
        studies.join(session, study=study, job=row, tasks=job.tasks, start=start, warm=warm)
    session.commit()
    try:
        producer.enqueue_chunk(row.id, device=job.device)
    except Exception as exc:  # the sweep re-enqueues queued jobs
        logger.warning("job %s stored but not enqueued (%s: %s); the sweep will retry", row.id, type(exc).__name__, exc)
        _not_enqueued(session, row.id)
    response.headers["Location"] = f"/v1/jobs/{row.id}"
    return placement.public_job(session, row, settings)


@router.get(
    "",
    response_model=JobsPublic,
    summary="List jobs, newest first",
    responses={422: _INVALID},
)
def list_jobs(
    session: ReadSessionDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    tenant: TenantQuery = None,
    status: Annotated[Status | None, Query(description="Only jobs with this status.")] = None,
    study: Annotated[Text | None, Query(max_length=64, description="Only the jobs of this study (its id).")] = None,
    limit: Annotated[int, Query(ge=1, le=100, description="Page size.")] = 20,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET, description="Jobs to skip.")] = 0,
) -> JobsPublic:
    """The key's tenant's jobs (an admin key's: every tenant's, or those of `?tenant=`), newest first.

    `?status=` keeps the jobs with that status; `?study=<id>` the jobs that joined that study (each
    job's `study` says which it joined). Filters combine; an unknown study id, or a study of a tenant
    the key does not list, gives an empty page."""
    scope = listing_scope(principal, tenant)
    items, total = repository.list_jobs(session, tenant=scope, status=status, study=study, limit=limit, offset=offset)
    return JobsPublic(items=placement.public_jobs(session, items, settings), total=total, limit=limit, offset=offset)


@router.get(
    "/{job_id}",
    response_model=JobPublic,
    summary="A job's status and progress",
    responses={404: _NOT_FOUND},
)
async def get_job(job_id: JobId, reader: ReaderDep, principal: PrincipalDep, request: Request) -> Response:
    # The hot path of every client's polling: answered from the status cache (service/api/
    # status_cache.py) when this job was read within GRADTUNE_STATUS_CACHE_SECONDS, with no
    # thread-pool hop; else one hop reads the public columns through a read connection (no write lock
    # on SQLite) and serializes the JobPublic once (returned as a model, FastAPI would validate it again).
    cache: StatusCache = request.app.state.status_cache
    settings = request.app.state.settings
    status = await cache.fetch(job_id, lambda: run_in_threadpool(_read_status, reader, cache, settings, job_id))
    scope = principal.scope()
    if status is None or (scope is not None and status.tenant != scope):
        raise HTTPException(status_code=404, detail=f"job {job_id} not found")
    return Response(status.body, media_type="application/json")


def _read_status(reader: Engine, cache: StatusCache, settings: Settings, job_id: str) -> CachedStatus | None:
    with reader.connect() as conn:
        job = repository.get_job_status(conn, job_id=job_id)
        if job is None:
            return None
        public = placement.public_job(conn, job, settings)  # reads the worker registry only if it may wait
    return cache.put(job_id, job.tenant, public.model_dump_json().encode())


@router.get(
    "/{job_id}/history",
    response_model=HistoryPublic,
    summary="Per-iteration meta-loss, lr and momentum",
    responses={404: _NOT_FOUND},
)
def get_history(job_id: JobId, session: ReadSessionDep, principal: PrincipalDep) -> HistoryPublic:
    _get_or_404(session, job_id, principal.scope())
    items = [
        IterationPublic(
            iteration=it.iteration,
            meta_loss=repository.finite_or_none(it.meta_loss),
            lr=it.lr,
            momentum=it.momentum,
            accepted=it.accepted,
            step_size=repository.finite_or_none(it.step_size),
        )
        for it in repository.list_history(session, job_id=job_id)
    ]
    return HistoryPublic(job_id=job_id, items=items)


@router.get(
    "/{job_id}/settings",
    response_model=SettingsPublic,
    # The stored body as the worker wrote it: fields a job does not have (param_groups for a
    # constant pair, ...) are left out rather than sent as null.
    response_model_exclude_unset=True,
    summary="The learned optimizer settings",
    responses={
        404: _NOT_FOUND,
        409: {
            "model": Message,
            "description": "The job has not succeeded (yet); the detail says its status.",
            "content": {
                "application/json": {
                    "example": {
                        "detail": "job 0b6f... is running (iteration 12 of 40); its settings are "
                        "available once it has succeeded"
                    }
                }
            },
        },
    },
)
def get_job_settings(job_id: JobId, session: ReadSessionDep, principal: PrincipalDep) -> SettingsPublic:
    """`lr` and `momentum` go straight into `torch.optim.SGD(params, lr=..., momentum=...)`;
    `evaluation` compares validation losses with the initial and the learned settings."""
    job = _get_or_404(session, job_id, principal.scope())
    if job.status == "succeeded" and job.result is not None:
        return SettingsPublic.model_validate(job.result)
    if job.status == "failed":
        detail = f"job {job_id} failed: {job.error or 'no reason was recorded'}"
    elif job.status == "cancelled":
        detail = f"job {job_id} was cancelled; it has no settings"
    elif job.status == "running":
        detail = (
            f"job {job_id} is running (iteration {job.iteration} of {job.iterations}); "
            "its settings are available once it has succeeded"
        )
    elif job.status == "succeeded":
        detail = f"job {job_id} succeeded but recorded no settings"
    else:
        detail = f"job {job_id} is {job.status}; its settings are available once it has succeeded"
    raise HTTPException(status_code=409, detail=detail)


@router.post(
    "/{job_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobPublic,
    summary="Cancel a job",
    responses={
        404: _NOT_FOUND,
        409: {"model": Message, "description": "The job has already finished."},
    },
)
def cancel_job(
    job_id: JobId, session: SessionDep, settings: SettingsDep, principal: PrincipalDep, request: Request
) -> JobPublic:
    """A queued job reads `cancelled` at once. A running one shows `cancel_requested: true` at once;
    its worker notices within one heartbeat, stops between two evaluations, keeps the iterations it
    finished, and the job ends `cancelled` (never `succeeded`, even when the cancel comes during its
    last chunk)."""
    try:
        job = repository.request_cancel(session, job_id=job_id, tenant=principal.scope())
    except repository.NotFound as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from None
    except repository.Conflict as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from None
    session.commit()
    request.app.state.status_cache.drop(job_id)  # cancel_requested shows at once
    return placement.public_job(session, job, settings)
