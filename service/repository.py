"""Keyword-only data functions for the API side.

Every function takes an open ``Session`` and leaves committing to the caller, so that a
request does its writes in one transaction and can enqueue work only after that commit.
Nothing here returns a job's ``spec`` to a client: ``to_public`` builds the public view from
the progress columns only (a spec can hold megabytes of inline arrays).

Every time written here comes from the database's clock (service.db.clock), like the worker's
heartbeats: the sweep compares a queued job's ``updated_at`` with that clock.
"""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Row, bindparam, func, literal, select, text
from sqlalchemy.orm import InstrumentedAttribute, Session, contains_eager, defer

from gradtune.spec import ACTIVE_STATUSES, TERMINAL_STATUSES, JobStatus
from service.db.clock import database_now
from service.db.models import (
    DEFAULT_TENANT,
    Dataset,
    ExportedModel,
    Job,
    JobDataset,
    JobIteration,
    JobModel,
    StudyJob,
    Tenant,
)
from service.schemas import DatasetItem, DatasetPublic, JobPublic, ModelPublic, Progress


class NotFound(LookupError):
    """No job with that id."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id} not found")
        self.job_id = job_id


class DatasetNotFound(LookupError):
    """No dataset with that id."""

    def __init__(self, dataset_id: str) -> None:
        super().__init__(f"dataset {dataset_id} not found")
        self.dataset_id = dataset_id


class ModelNotFound(LookupError):
    """No uploaded model with that id."""

    def __init__(self, model_id: str) -> None:
        super().__init__(f"model {model_id} not found")
        self.model_id = model_id


class Conflict(Exception):
    """The request does not fit the job's (or dataset's) current state."""


# Columns a listing never needs: the body (inline arrays), engine state, the result.
_HEAVY = (defer(Job.spec), defer(Job.checkpoint), defer(Job.result))


def create_job(
    session: Session,
    *,
    spec: dict[str, Any],
    name: str,
    iterations: int,
    max_seconds: float | None = None,
    tenant: str = DEFAULT_TENANT,
) -> Job:
    """Insert a queued job of ``tenant``. ``spec`` is the validated body (``JobCreate.model_dump(mode="json")``),
    ``max_seconds`` its deadline (the settings' default already applied).

    Progress starts at iteration 0 with the starting lr and momentum, so a client polling a
    queued job already sees the values the tuning begins from. The job is marked as having its
    first chunk message outstanding (``enqueued_at``): the caller sends it after the commit, or
    calls ``service.lifecycle.clear_enqueued`` when it cannot.
    """
    hyper = spec.get("hyperparameters") or {}
    now = database_now(session)
    job = Job(
        id=str(uuid.uuid4()),
        tenant=tenant,
        name=name,
        status=JobStatus.QUEUED.value,
        spec=spec,
        created_at=now,
        updated_at=now,
        iteration=0,
        iterations=iterations,
        lr=hyper.get("lr"),
        momentum=hyper.get("momentum"),
        requested_device=spec.get("device") or "auto",
        cancel_requested=False,
        chunks_started=0,
        chunks_committed=0,
        attempts=0,
        max_seconds=max_seconds,
        elapsed_seconds=0.0,
        enqueued_at=now,
    )
    session.add(job)
    session.flush()
    for dataset_id in spec_dataset_ids(spec):
        session.add(JobDataset(job_id=job.id, dataset_id=dataset_id))
    for model_id in spec_model_ids(spec):
        session.add(JobModel(job_id=job.id, model_id=model_id))
    session.flush()
    return job


def lock_tenant(session: Session, *, tenant: str) -> None:
    """Take the tenant row's lock until the transaction ends (PostgreSQL; SQLite's write transaction
    already excludes other writers): quota checks that count and then insert cannot both pass."""
    session.execute(select(Tenant.name).where(Tenant.name == tenant).with_for_update())


def lock_object(session: Session, *, sha256: str) -> None:
    """Serialize, per stored object, an upload that records a row of it with a delete that removes
    it once no row holds it: a PostgreSQL advisory lock until the transaction ends; on SQLite the
    write transaction's lock (BEGIN IMMEDIATE, taken by this first statement)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": f"gradtune-object:{sha256}"})
    else:
        session.execute(select(literal(1)))


def active_jobs(session: Session, *, tenant: str) -> int:
    """The tenant's queued and running jobs, counted under its tenant row's lock (``lock_tenant``)."""
    lock_tenant(session, tenant=tenant)
    query = select(func.count()).select_from(Job).where(Job.tenant == tenant, Job.status.in_(ACTIVE_STATUSES))
    return session.scalar(query) or 0


def spec_model_ids(spec: dict[str, Any]) -> list[str]:
    """Ids of the uploaded models a stored job body names (``kind: exported`` tasks)."""
    ids: list[str] = []
    for task in spec.get("tasks") or []:
        model = task.get("model") or {}
        if model.get("kind") == "exported" and model.get("model") and model["model"] not in ids:
            ids.append(model["model"])
    return ids


def spec_dataset_ids(spec: dict[str, Any]) -> list[str]:
    """Ids of the uploaded datasets a stored job body names (``source: dataset`` tasks)."""
    ids: list[str] = []
    for task in spec.get("tasks") or []:
        data = task.get("data") or {}
        if data.get("source") != "dataset":
            continue
        for split in ("train", "val"):
            ref = data.get(split)
            if ref and ref.get("dataset") and ref["dataset"] not in ids:
                ids.append(ref["dataset"])
    return ids


def _owned(table: Any, tenant: str | None) -> list[Any]:
    """The where-clause that keeps ``tenant``'s rows (none for None: an admin key sees every row)."""
    return [] if tenant is None else [table.tenant == tenant]


def get_job(session: Session, *, job_id: str, tenant: str | None = None) -> Job | None:
    """The job, or None (also when it belongs to a tenant other than ``tenant``, unless None).
    Its spec and checkpoint load only if accessed."""
    return session.scalar(
        select(Job).where(Job.id == job_id, *_owned(Job, tenant)).options(defer(Job.spec), defer(Job.checkpoint))
    )


# What ``to_public`` reads: a status poll selects these columns only (no ORM object is built).
_PUBLIC_COLUMNS = (
    Job.id,
    Job.tenant,
    Job.name,
    Job.status,
    Job.iteration,
    Job.iterations,
    Job.meta_loss,
    Job.lr,
    Job.momentum,
    Job.created_at,
    Job.started_at,
    Job.finished_at,
    Job.error,
    Job.cancel_requested,
    Job.stopped,
    Job.max_seconds,
    Job.elapsed_seconds,
    Job.requested_device,
    Job.lease_owner,  # not shown: a job under a lease is being run (service/placement.py)
    StudyJob.study_id.label("study"),  # the study it joined: an outer join to study_jobs, still one query
)


# Built once: polls are hot. Any tenant's job (an admin key), or one tenant's.
_STATUS_QUERY = select(*_PUBLIC_COLUMNS).outerjoin(Job.study_link).where(Job.id == bindparam("job_id"))
_OWN_STATUS_QUERY = _STATUS_QUERY.where(Job.tenant == bindparam("tenant"))


def get_job_status(session: Session | Connection, *, job_id: str, tenant: str | None = None) -> Any:
    """What ``to_public`` needs of the job (a ``Row`` with those attributes), or None (also when
    the job belongs to a tenant other than ``tenant``, unless None)."""
    if tenant is None:
        return session.execute(_STATUS_QUERY, {"job_id": job_id}).one_or_none()
    return session.execute(_OWN_STATUS_QUERY, {"job_id": job_id, "tenant": tenant}).one_or_none()


def list_jobs(
    session: Session,
    *,
    tenant: str | None,
    status: str | None = None,
    study: str | None = None,
    limit: int = 20,
    offset: int = 0,
) -> tuple[list[Job], int]:
    """A page of ``tenant``'s jobs (every tenant's for None), of ``study`` only unless None, newest
    first, and the total count matching the filters. Each job's study comes in the same select."""
    where = [Job.status == status] if status else []
    where += _owned(Job, tenant)
    where += [StudyJob.study_id == study] if study is not None else []
    total = session.scalar(select(func.count()).select_from(Job).outerjoin(Job.study_link).where(*where)) or 0
    items = session.scalars(
        select(Job)
        .outerjoin(Job.study_link)
        .where(*where)
        .options(*_HEAVY, contains_eager(Job.study_link))
        .order_by(Job.created_at.desc(), Job.id.desc())
        .limit(limit)
        .offset(offset)
    ).all()
    return list(items), total


def request_cancel(session: Session, *, job_id: str, tenant: str | None = None) -> Job:
    """Cancel a job, under its row lock (on SQLite the write lock of BEGIN IMMEDIATE).

    queued -> cancelled at once (finished_at set); running -> ``cancel_requested``, shown at once
    in the job body, and the job stays running until its worker notices (at its next heartbeat it
    stops between two evaluations, keeps the iterations it finished and ends ``cancelled``; see
    service.lifecycle); a finished job raises ``Conflict``. Requesting again for a running job is
    harmless.
    """
    job = session.scalar(select(Job).where(Job.id == job_id, *_owned(Job, tenant)).options(*_HEAVY).with_for_update())
    if job is None:
        raise NotFound(job_id)
    now = database_now(session)
    if job.status == JobStatus.QUEUED:
        job.status = JobStatus.CANCELLED.value
        job.finished_at = now
        job.updated_at = now
    elif job.status == JobStatus.RUNNING:
        job.cancel_requested = True
        job.updated_at = now
    elif job.status in TERMINAL_STATUSES:
        raise Conflict(f"job {job_id} is already {job.status}; only queued or running jobs can be cancelled")
    else:  # pragma: no cover - the ck_jobs_status constraint admits no other status
        raise Conflict(f"job {job_id} has status {job.status!r} and cannot be cancelled")
    session.flush()
    return job


def history_after(conn: Session | Connection, *, job_id: str, after: int) -> list[Any]:
    """The job's iterations after ``after`` in order, as rows (for the events stream)."""
    query = (
        select(
            JobIteration.iteration,
            JobIteration.meta_loss,
            JobIteration.lr,
            JobIteration.momentum,
            JobIteration.accepted,
            JobIteration.step_size,
        )
        .where(JobIteration.job_id == job_id, JobIteration.iteration > after)
        .order_by(JobIteration.iteration)
    )
    return list(conn.execute(query).all())


def list_history(session: Session, *, job_id: str) -> list[JobIteration]:
    """The job's meta-iterations in order (empty for an unknown job: check with get_job)."""
    return list(
        session.scalars(
            select(JobIteration).where(JobIteration.job_id == job_id).order_by(JobIteration.iteration)
        ).all()
    )


def _aware(value: datetime | None) -> datetime | None:
    """SQLite hands datetimes back without a zone; every stored time is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def finite_or_none(value: float | None) -> float | None:
    """JSON has no NaN or Infinity: a diverged value reads as null."""
    if value is None or not math.isfinite(value):
        return None
    return value


def to_public(job: Job | Row[Any]) -> JobPublic:
    """The public view of a job, from a ``Job`` or a ``get_job_status`` row."""
    return JobPublic(
        id=job.id,
        tenant=job.tenant,
        name=job.name,
        status=job.status,
        progress=Progress(
            iteration=job.iteration or 0,
            iterations=job.iterations,
            meta_loss=finite_or_none(job.meta_loss),
            lr=finite_or_none(job.lr),
            momentum=finite_or_none(job.momentum),
        ),
        created_at=_aware(job.created_at),
        started_at=_aware(job.started_at),
        finished_at=_aware(job.finished_at),
        error=job.error,
        cancel_requested=bool(job.cancel_requested),
        stopped=job.stopped,
        max_seconds=job.max_seconds,
        elapsed_seconds=float(job.elapsed_seconds or 0.0),
        device=job.requested_device or "auto",
        study=job.study,
    )


# ---------------------------------------------------------------- uploaded files, datasets and models alike
# ``table`` is the mapped class (Dataset, ExportedModel), with ``id``, ``sha256`` and ``created_at``;
# ``link`` the job's link table to it (JobDataset, JobModel) and ``column`` that table's id column.
# A queued or running job (gradtune.spec's ACTIVE_STATUSES) keeps the files it names.


def _get(session: Session, table: Any, row_id: str, tenant: str | None, lock: bool) -> Any:
    query = select(table).where(table.id == row_id, *_owned(table, tenant))
    return session.scalar(query.with_for_update() if lock else query)


def _get_by_sha256(session: Session, table: Any, sha256: str, tenant: str) -> Any:
    return session.scalar(select(table).where(table.sha256 == sha256, table.tenant == tenant))


def _by_id(session: Session, table: Any, ids: list[str], tenant: str | None, lock: bool) -> dict[str, Any]:
    if not ids:
        return {}
    query = select(table).where(table.id.in_(ids), *_owned(table, tenant)).order_by(table.id)
    rows = session.scalars(query.with_for_update() if lock else query).all()
    return {r.id: r for r in rows}


def _list(session: Session, table: Any, tenant: str | None, limit: int, offset: int) -> tuple[list[Any], int]:
    where = _owned(table, tenant)
    total = session.scalar(select(func.count()).select_from(table).where(*where)) or 0
    items = session.scalars(
        select(table).where(*where).order_by(table.created_at.desc(), table.id.desc()).limit(limit).offset(offset)
    ).all()
    return list(items), total


def stored_bytes(session: Session, *, tenant: str) -> int:
    """The bytes of the tenant's datasets and models (each row counts, shared objects too)."""
    total = 0
    for table in (Dataset, ExportedModel):
        total += session.scalar(select(func.coalesce(func.sum(table.size), 0)).where(table.tenant == tenant)) or 0
    return int(total)


def object_in_use(session: Session, *, sha256: str) -> bool:
    """Whether any row of any tenant, dataset or model, holds the stored object ``sha256``."""
    return any(
        session.scalar(select(table.id).where(table.sha256 == sha256).limit(1)) is not None
        for table in (Dataset, ExportedModel)
    )


def _active_jobs(session: Session, link: Any, column: InstrumentedAttribute, row_id: str) -> list[tuple[str, str]]:
    """``(job id, status)`` of the queued or running jobs whose ``link`` row has ``column == row_id``."""
    rows = session.execute(
        select(Job.id, Job.status)
        .join(link, link.job_id == Job.id)
        .where(column == row_id, Job.status.in_(ACTIVE_STATUSES))
        .order_by(Job.created_at, Job.id)
    ).all()
    return [(r[0], r[1]) for r in rows]


def _delete_unused(
    session: Session,
    table: Any,
    row_id: str,
    *,
    tenant: str | None,
    kind: str,
    not_found: type[LookupError],
    link: Any,
    column: InstrumentedAttribute,
) -> Any:
    """Delete the row under its row lock; ``not_found(row_id)`` if there is none, ``Conflict``
    (naming the ``kind``: "dataset", "model") while a queued or running job uses it."""
    row = _get(session, table, row_id, tenant, lock=True)
    if row is None:
        raise not_found(row_id)
    users = _active_jobs(session, link, column, row_id)
    if users:
        job_id, status = users[0]
        more = f" (and {len(users) - 1} more)" if len(users) > 1 else ""
        raise Conflict(
            f"{kind} {row_id} is used by {status} job {job_id}{more}; cancel the job or wait "
            f"until it has finished, then delete the {kind}"
        )
    session.delete(row)
    session.flush()
    return row


# ---------------------------------------------------------------- datasets


def create_dataset(
    session: Session,
    *,
    filename: str,
    format: str,
    sha256: str,
    size: int,
    facts: dict[str, Any],
    tenant: str = DEFAULT_TENANT,
) -> Dataset:
    """Insert a dataset row of ``tenant``; ``facts`` is what ``service.dataset_files.inspect_file``
    returned. A second row of one tenant with the same sha256 violates a unique index (IntegrityError
    at flush)."""
    dataset = Dataset(
        id=str(uuid.uuid4()),
        tenant=tenant,
        filename=filename,
        format=format,
        sha256=sha256,
        size=size,
        rows=facts.get("rows"),
        items=facts["items"],
        created_at=database_now(session),
    )
    session.add(dataset)
    session.flush()
    return dataset


def get_dataset(session: Session, *, dataset_id: str, tenant: str | None = None, lock: bool = False) -> Dataset | None:
    """The dataset, or None (also when another tenant's, unless ``tenant`` is None); ``lock`` takes
    its row lock until the transaction ends."""
    return _get(session, Dataset, dataset_id, tenant, lock)


def get_dataset_by_sha256(session: Session, *, sha256: str, tenant: str) -> Dataset | None:
    return _get_by_sha256(session, Dataset, sha256, tenant)


def datasets_by_id(session: Session, *, ids: list[str], tenant: str | None, lock: bool = False) -> dict[str, Dataset]:
    """The datasets among ``ids`` that exist (and are ``tenant``'s, unless None), by id. With
    ``lock``, their rows stay locked until the transaction ends, so that a dataset a new job names
    cannot be deleted meanwhile."""
    return _by_id(session, Dataset, ids, tenant, lock)


def list_datasets(
    session: Session, *, tenant: str | None, limit: int = 20, offset: int = 0
) -> tuple[list[Dataset], int]:
    """A page of ``tenant``'s datasets (every tenant's for None), newest first, and the total count."""
    return _list(session, Dataset, tenant, limit, offset)


def delete_dataset(session: Session, *, dataset_id: str, tenant: str | None = None) -> Dataset:
    """Delete the dataset's row under its row lock; the caller removes the stored object after
    the commit. ``DatasetNotFound``, or ``Conflict`` while a queued or running job uses it."""
    return _delete_unused(
        session,
        Dataset,
        dataset_id,
        tenant=tenant,
        kind="dataset",
        not_found=DatasetNotFound,
        link=JobDataset,
        column=JobDataset.dataset_id,
    )


def dataset_to_public(dataset: Dataset) -> DatasetPublic:
    items = [DatasetItem.model_validate(item) for item in dataset.items or []]
    tabular = dataset.format in ("csv", "parquet")
    return DatasetPublic(
        id=dataset.id,
        tenant=dataset.tenant,
        filename=dataset.filename,
        format=dataset.format,
        sha256=dataset.sha256,
        size=dataset.size,
        rows=dataset.rows,
        created_at=_aware(dataset.created_at),
        tensors=[] if tabular else items,
        columns=items if tabular else [],
    )


# ---------------------------------------------------------------- models (uploaded torch.export programs)


def create_model(
    session: Session,
    *,
    filename: str,
    sha256: str,
    size: int,
    program: dict[str, Any],
    tenant: str = DEFAULT_TENANT,
) -> ExportedModel:
    """Insert a model row of ``tenant``; ``program`` is service.exported_files.describe_program's
    summary. A second row of one tenant with the same sha256 violates a unique index (IntegrityError)."""
    model = ExportedModel(
        id=str(uuid.uuid4()),
        tenant=tenant,
        filename=filename,
        sha256=sha256,
        size=size,
        program=program,
        created_at=database_now(session),
    )
    session.add(model)
    session.flush()
    return model


def get_model(
    session: Session, *, model_id: str, tenant: str | None = None, lock: bool = False
) -> ExportedModel | None:
    return _get(session, ExportedModel, model_id, tenant, lock)


def get_model_by_sha256(session: Session, *, sha256: str, tenant: str) -> ExportedModel | None:
    return _get_by_sha256(session, ExportedModel, sha256, tenant)


def models_by_id(
    session: Session, *, ids: list[str], tenant: str | None, lock: bool = False
) -> dict[str, ExportedModel]:
    """The models among ``ids`` that exist (and are ``tenant``'s, unless None), by id (rows locked
    until the transaction ends with ``lock``)."""
    return _by_id(session, ExportedModel, ids, tenant, lock)


def list_models(
    session: Session, *, tenant: str | None, limit: int = 20, offset: int = 0
) -> tuple[list[ExportedModel], int]:
    """A page of ``tenant``'s models (every tenant's for None), newest first, and the total count."""
    return _list(session, ExportedModel, tenant, limit, offset)


def delete_model(session: Session, *, model_id: str, tenant: str | None = None) -> ExportedModel:
    """Delete the model's row under its row lock (the caller removes the stored object after the
    commit). ``ModelNotFound``, or ``Conflict`` while a queued or running job uses it."""
    return _delete_unused(
        session,
        ExportedModel,
        model_id,
        tenant=tenant,
        kind="model",
        not_found=ModelNotFound,
        link=JobModel,
        column=JobModel.model_id,
    )


def model_to_public(model: ExportedModel) -> ModelPublic:
    p = model.program or {}
    return ModelPublic(
        id=model.id,
        tenant=model.tenant,
        filename=model.filename,
        sha256=model.sha256,
        size=model.size,
        created_at=_aware(model.created_at),
        input_shape=p["input_shape"],
        output_width=p["output_width"],
        operators=p["operators"],
        nodes=p["nodes"],
        parameters=p["parameters"],
        parameter_count=p["parameter_count"],
        default_init=p["default_init"],
    )
