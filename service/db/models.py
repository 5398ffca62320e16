"""Database models. The schema itself exists only through Alembic migrations.

The ``utcnow`` defaults below are for rows built by hand (tests); service.repository and
service.lifecycle write every time themselves, from the database's clock (service.db.clock).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from gradtune.spec import DEFAULT_TENANT, STATUSES, JobStatus


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


# Every job, dataset and model belongs to the tenant of the API key that created it (migration 0007
# gave existing rows to "default"). No foreign key: a tenant is a name, ``tenants`` holds its quotas.


def _tenant_column() -> Mapped[str]:
    return mapped_column(String(64), default=DEFAULT_TENANT, server_default=DEFAULT_TENANT)


# A job's status is one of gradtune.spec's JobStatus values, enforced by the database too
# (migration 0004 added the constraint; it lists the same values).
JOB_STATUS_CHECK = "status IN (" + ", ".join(f"'{s}'" for s in STATUSES) + ")"


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant: Mapped[str] = _tenant_column()
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED.value)
    # The validated job body (service.schemas.JobCreate, JSON mode).
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[str | None] = mapped_column(Text)

    # Progress: completed meta-iterations and the latest values.
    iteration: Mapped[int] = mapped_column(Integer, default=0)
    iterations: Mapped[int] = mapped_column(Integer)
    meta_loss: Mapped[float | None] = mapped_column(Float)
    lr: Mapped[float | None] = mapped_column(Float)
    momentum: Mapped[float | None] = mapped_column(Float)

    # Engine state after the last committed chunk (JSON-serializable dict).
    checkpoint: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # The settings body, once succeeded.
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    # The lease: a fresh random token per claim (service.lifecycle) and when its holder last said so.
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # Claims of the current iteration since the last commit; at the limit the job fails (migration 0005).
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # When the chunk message now outstanding was sent (None: none is); the sweep sends no second one.
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The deadline (seconds of chunk wall time), the time spent so far, and why the search stopped
    # early ("deadline"), if it did.
    max_seconds: Mapped[float | None] = mapped_column(Float)
    elapsed_seconds: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    stopped: Mapped[str | None] = mapped_column(String(16))
    # Chunks started (claims that began work) and chunks committed: their difference is redone work.
    chunks_started: Mapped[int] = mapped_column(Integer, default=0)
    chunks_committed: Mapped[int] = mapped_column(Integer, default=0)
    # Where the engine ran (e.g. "cpu", "cuda:0"), for the record.
    device: Mapped[str | None] = mapped_column(String(32))
    # The device the job asked for (auto, cpu, cuda): its chunks' queue (gradtune/spec/devices.py).
    # A column of its own, beside the spec, so the status read and the sweep need not parse the spec.
    requested_device: Mapped[str] = mapped_column(String(8), default="auto", server_default="auto")

    history: Mapped[list[JobIteration]] = relationship(
        back_populates="job", cascade="all, delete-orphan", order_by="JobIteration.iteration"
    )
    # The job's row in study_jobs when it joined a study (service/studies.py): read-only here; a
    # listing loads it in its own select (an outer join), else it loads when first read.
    study_link: Mapped[StudyJob | None] = relationship(viewonly=True, uselist=False)

    @property
    def study(self) -> str | None:
        """The id of the study the job joined, or None (the ``study`` of its public view)."""
        return self.study_link.study_id if self.study_link is not None else None

    __table_args__ = (
        Index("ix_jobs_status_created_at", "status", "created_at"),
        Index("ix_jobs_tenant_created_at", "tenant", "created_at"),
        CheckConstraint(JOB_STATUS_CHECK, name="ck_jobs_status"),
    )


class JobIteration(Base):
    """One meta-iteration of one job; (job_id, iteration) is unique, so a redone chunk cannot duplicate."""

    __tablename__ = "job_iterations"

    job_id: Mapped[str] = mapped_column(String(36), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    iteration: Mapped[int] = mapped_column(Integer, primary_key=True)
    meta_loss: Mapped[float | None] = mapped_column(Float)
    lr: Mapped[float] = mapped_column(Float)
    momentum: Mapped[float] = mapped_column(Float)
    accepted: Mapped[bool] = mapped_column(Boolean)
    step_size: Mapped[float | None] = mapped_column(Float)
    # Everything else the engine reported (hypergradient, candidate loss, ...).
    extra: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    job: Mapped[Job] = relationship(back_populates="history")


class Dataset(Base):
    """An uploaded dataset file: its stored object (key = ``sha256``) and what it holds.

    ``(tenant, sha256)`` is unique: the same bytes uploaded twice by one tenant are one dataset; two
    tenants get a dataset each, sharing one stored object (never said in an answer).
    """

    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant: Mapped[str] = _tenant_column()
    filename: Mapped[str] = mapped_column(String(255))
    format: Mapped[str] = mapped_column(String(16))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    # Rows of a csv/parquet file (None for tensor formats).
    rows: Mapped[int | None] = mapped_column(BigInteger)
    # One entry per tensor or column: name, shape, dtype, min, max, integer.
    items: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (
        Index("ix_datasets_tenant_sha256", "tenant", "sha256", unique=True),
        Index("ix_datasets_sha256", "sha256"),
        Index("ix_datasets_created_at", "created_at"),
        Index("ix_datasets_tenant_created_at", "tenant", "created_at"),
    )


class JobDataset(Base):
    """A job uses a dataset (its spec names it); a dataset cannot be deleted while a queued or
    running job uses it. No foreign key to datasets: a finished job may outlive its data."""

    __tablename__ = "job_datasets"

    job_id: Mapped[str] = mapped_column(String(36), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    dataset_id: Mapped[str] = mapped_column(String(36), primary_key=True)

    __table_args__ = (Index("ix_job_datasets_dataset_id", "dataset_id"),)


class ExportedModel(Base):
    """An uploaded ``torch.export`` program (``.pt2``): its stored object (key = ``sha256``) and
    what the reader found in it (service.exported_files.describe_program).

    ``(tenant, sha256)`` is unique, as for datasets.
    """

    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant: Mapped[str] = _tenant_column()
    filename: Mapped[str] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    # describe_program's summary: input_shape, output_width, nodes, parameters, ...
    program: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (
        Index("ix_models_tenant_sha256", "tenant", "sha256", unique=True),
        Index("ix_models_sha256", "sha256"),
        Index("ix_models_created_at", "created_at"),
        Index("ix_models_tenant_created_at", "tenant", "created_at"),
    )


class JobModel(Base):
    """A job uses an uploaded model (a task's ``model`` names it); like JobDataset, no foreign key
    to models: a finished job may outlive its model."""

    __tablename__ = "job_models"

    job_id: Mapped[str] = mapped_column(String(36), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    model_id: Mapped[str] = mapped_column(String(36), primary_key=True)

    __table_args__ = (Index("ix_job_models_model_id", "model_id"),)


class Worker(Base):
    """A worker process that said it is alive: written when it starts, ``last_seen`` refreshed by its
    heartbeat (the database's clock), ``current_job`` while it runs a chunk (service/workers.py).
    One not seen for ``GRADTUNE_WORKER_STALE_SECONDS`` is not live; its row stays (for the record)
    until a worker starting later prunes rows not seen for a day."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    # Where its chunks run, e.g. "cpu" or "cuda".
    device: Mapped[str] = mapped_column(String(64))
    # The broker queues it consumes.
    queues: Mapped[list[str]] = mapped_column(JSON)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # The job whose chunk it runs now (no foreign key: a record, not a claim; the job holds the lease).
    current_job: Mapped[str | None] = mapped_column(String(36))

    __table_args__ = (Index("ix_workers_last_seen", "last_seen"),)


class Tenant(Base):
    """A tenant: a name its keys, jobs, datasets and models share, and its quota overrides (None:
    the settings' default, GRADTUNE_TENANT_MAX_*)."""

    __tablename__ = "tenants"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    max_active_jobs: Mapped[int | None] = mapped_column(Integer)
    max_stored_bytes: Mapped[int | None] = mapped_column(BigInteger)
    max_concurrent_uploads: Mapped[int | None] = mapped_column(Integer)


class UploadSlot(Base):
    """An upload in progress (service/upload_quota.py): a tenant's quota of concurrent uploads counts
    its rows, so the quota holds across the API processes that share the database. The upload deletes
    its row when it ends; a row past ``expires_at`` (its process died) no longer counts."""

    __tablename__ = "upload_slots"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_upload_slots_tenant", "tenant"),)


class ApiKey(Base):
    """An API key (service/keys.py): ``id`` is the public part of the key, ``key_hash`` the SHA-256 of
    the whole key (the key itself is shown once and never stored). A revoked key stays, for the record."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), ForeignKey("tenants.name"))
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    key_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_api_keys_tenant", "tenant"),)


class Study(Base):
    """A study (service/studies.py): settings learned across the jobs that name it.

    ``spec`` is the validated body (service.study_schemas.StudyCreate, JSON mode); ``kind`` what its
    tasks must share, fixed by its first job (None until then); ``settings`` the current settings
    and ``evaluation`` theirs on the held-out tasks (None until the first update); ``version`` counts
    updates; ``pool_size`` the tasks that joined (the next one's position); ``rounds`` the meta-batch
    rounds run so far (each update draws fresh ones)."""

    __tablename__ = "studies"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant: Mapped[str] = _tenant_column()
    name: Mapped[str] = mapped_column(String(200))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    holdout_every: Mapped[int] = mapped_column(Integer)
    kind: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    settings: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    evaluation: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    version: Mapped[int] = mapped_column(Integer, default=0)
    pool_size: Mapped[int] = mapped_column(Integer, default=0)
    rounds: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (Index("ix_studies_tenant_created_at", "tenant", "created_at"),)


class StudyJob(Base):
    """A job of a study: where it started (``start``: the study's settings then; ``warm`` when the
    study had learned some) and, once the study was updated after it, that update (``version``,
    ``update``: settings before and after, rounds, pool counts). ``job_id`` is the primary key, so a
    job joins once and its update is recorded once. Until then ``update_sent_at`` says when the
    update message was last sent (NULL: none outstanding) and ``update_attempts`` how many were
    sent: the workers' sweep re-sends a lost one (service/studies.py sweep_updates)."""

    __tablename__ = "study_jobs"

    job_id: Mapped[str] = mapped_column(String(36), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    study_id: Mapped[str] = mapped_column(String(36), ForeignKey("studies.id", ondelete="CASCADE"))
    warm: Mapped[bool] = mapped_column(Boolean)
    start: Mapped[dict[str, Any]] = mapped_column(JSON)
    version: Mapped[int | None] = mapped_column(Integer)
    update: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    update_sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    update_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    __table_args__ = (
        Index("ix_study_jobs_study_id", "study_id"),
        Index("ix_study_jobs_study_version", "study_id", "version", unique=True),
    )


class StudyTask(Base):
    """A task in a study's pool: task ``task_index`` of job ``job_id``, at ``position`` (the order
    tasks joined; (study_id, position) is the key, so two jobs joining at once cannot share one).
    ``held_out``: every ``holdout_every``-th position; such a task is never trained on."""

    __tablename__ = "study_tasks"

    study_id: Mapped[str] = mapped_column(String(36), ForeignKey("studies.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(String(36), ForeignKey("jobs.id", ondelete="CASCADE"))
    task_index: Mapped[int] = mapped_column(Integer)
    held_out: Mapped[bool] = mapped_column(Boolean)

    __table_args__ = (Index("ix_study_tasks_job_task", "job_id", "task_index", unique=True),)
