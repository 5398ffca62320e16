"""Studies: settings that keep learning as jobs of the same kind arrive (issue 14).

Data functions (keyword-only, the caller commits, every lookup takes the tenant: None = admin),
used by the API (service/api/routes/studies.py, the job route) and the worker (worker/study_runner.py).

- A job naming a study joins it when it is created, under the study's row lock (``join``): its tasks
  take the next positions of the pool, every ``holdout_every``-th position (3, 7, ... for k = 4) is
  held out, and the job starts from the study's current settings (``warm`` once the study has
  learned some). The pool's key (study, position) keeps two jobs joining at once from sharing a
  position, whatever the lock.
- A held-out task is never trained on: the job itself trains on its other tasks only, and the
  study's updates are given the training tasks only (``update_inputs``); held-out tasks are only
  evaluated.
- After each succeeded job the worker learns the settings again over the pool's training tasks
  and records the update once (``record_update``: the job's row holds its version; a retried
  update finds it recorded; an update computed from settings that changed meanwhile is "stale").
- Its message is re-sent until the update is recorded: ``update_sent_at`` says when one was last
  sent (``mark_update_sent``, just before sending; ``withdraw_update`` when the send failed), and
  the workers' sweep (``sweep_updates``) sends another when none is outstanding or the last is
  older than the visibility timeout (presumed lost), ``max_attempts`` times in all.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, case, func, or_, select
from sqlalchemy import update as update_rows
from sqlalchemy.orm import Session

from gradtune.spec import JobStatus
from gradtune.spec.hyper import default_iterations, default_search, warm_meta
from service.db.clock import database_now, db_now
from service.db.models import Job, Study, StudyJob, StudyTask
from service.schemas import Hyperparameters, JobCreate, TaskSpec
from service.study_schemas import (
    PoolCounts,
    StudyCreate,
    StudyHistoryPublic,
    StudyMeta,
    StudyPublic,
    StudySettings,
    StudySettingsPublic,
    StudyUpdatePublic,
)

log = logging.getLogger("gradtune.studies")

# The hyperparameters a job of a study shares with it (a job that gives other values gets a 422).
SHARED = ("lr_bounds", "momentum_bounds", "per_layer", "schedule_segments")


def _owned(tenant: str | None) -> list[Any]:
    return [] if tenant is None else [Study.tenant == tenant]


def create_study(session: Session, *, body: StudyCreate, tenant: str) -> Study:
    now = database_now(session)
    study = Study(
        id=str(uuid.uuid4()),
        tenant=tenant,
        name=body.name,
        spec=body.model_dump(mode="json"),
        holdout_every=body.holdout_every,
        kind=None,
        settings=None,
        evaluation=None,
        version=0,
        pool_size=0,
        rounds=0,
        created_at=now,
        updated_at=now,
    )
    session.add(study)
    session.flush()
    return study


def get_study(session: Session, *, study_id: str, tenant: str | None, lock: bool = False) -> Study | None:
    """The study, or None (also another tenant's, unless ``tenant`` is None). ``lock``: its row lock
    until the transaction ends (on SQLite the write transaction's)."""
    query = select(Study).where(Study.id == study_id, *_owned(tenant))
    return session.scalar(query.with_for_update() if lock else query)


def list_studies(session: Session, *, tenant: str | None, limit: int = 20, offset: int = 0) -> tuple[list[Study], int]:
    where = _owned(tenant)
    total = session.scalar(select(func.count()).select_from(Study).where(*where)) or 0
    rows = session.scalars(
        select(Study).where(*where).order_by(Study.created_at.desc(), Study.id.desc()).limit(limit).offset(offset)
    ).all()
    return list(rows), total


def current_settings(study: Study) -> dict[str, Any]:
    """The study's settings: the last update's, else its starting lr and momentum."""
    if study.settings:
        return dict(study.settings)
    hp = study.spec["hyperparameters"]
    return {"lr": float(hp["lr"]), "momentum": float(hp["momentum"])}


# ---------------------------------------------------------------- jobs joining


def task_kind(task: TaskSpec, hp: Hyperparameters) -> dict[str, Any]:
    """What a task must share with the study's other tasks: the model's kind and the loss; with
    per_layer its layers (an mlp's count, a cnn's layer types, the uploaded model); with a schedule
    its steps."""
    model = task.model
    kind: dict[str, Any] = {"model": model.kind, "loss": task.loss}
    if hp.per_layer:
        if model.kind == "mlp":
            kind["layers"] = len(model.hidden) + 1
        elif model.kind == "cnn":
            kind["layers"] = [layer.type for layer in model.layers]
        else:
            kind["layers"] = model.model
    if hp.schedule_segments > 1:
        kind["steps"] = task.steps
    return kind


_FIELD = {"model": ["model", "kind"], "loss": ["loss"], "layers": ["model"], "steps": ["steps"]}


def fit_errors(study: Study, job: JobCreate) -> list[dict[str, Any]]:
    """422 entries (service/api/errors.py's shape) naming what of the job does not fit the study."""
    hp = Hyperparameters.model_validate(study.spec["hyperparameters"])
    errors: list[dict[str, Any]] = []
    if "hyperparameters" in job.model_fields_set:
        for field in SHARED:
            mine, theirs = getattr(job.hyperparameters, field), getattr(hp, field)
            if (list(mine) if isinstance(mine, tuple) else mine) != (
                list(theirs) if isinstance(theirs, tuple) else theirs
            ):
                errors.append(
                    {
                        "loc": ["body", "hyperparameters", field],
                        "msg": f"study {study.id} has {field} {_text(theirs)}, this job {_text(mine)}; a job of a "
                        "study uses the study's (leave hyperparameters out to take them)",
                        "type": "study_mismatch",
                    }
                )
    expected = study.kind or task_kind(job.tasks[0], hp)
    for i, task in enumerate(job.tasks):
        got = task_kind(task, hp)
        for key, want in expected.items():
            if got.get(key) != want:
                whose = f"study {study.id} takes" if study.kind else "the job's first task has"
                errors.append(
                    {
                        "loc": ["body", "tasks", i, *_FIELD[key]],
                        "msg": f"{whose} tasks with {key} {_text(want)}; this task's {key} is {_text(got.get(key))}",
                        "type": "study_mismatch",
                    }
                )
    return errors


def _text(value: Any) -> str:
    return f"{value!r}" if isinstance(value, str) else str(list(value) if isinstance(value, tuple) else value)


def held_out(position: int, every: int) -> bool:
    """Every ``every``-th task to join the pool is held out (positions every-1, 2*every-1, ...)."""
    return position % every == every - 1


def _rich(hp: dict[str, Any]) -> bool:
    return bool(hp.get("per_layer")) or int(hp.get("schedule_segments") or 1) > 1


def prepare_spec(
    study: Study, spec: dict[str, Any], *, given: frozenset[str]
) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """The job's stored body with the study's hyperparameters, starting at its current settings;
    those settings; and whether they were learned (a warm start: then it runs
    gradtune.spec.hyper.warm_meta's search). ``given``: which of meta.search and meta.iterations the
    body gave (JobCreate.meta_given); the others follow the study's values, not the job's own."""
    start, warm = current_settings(study), bool(study.settings)
    hp = dict(study.spec["hyperparameters"])
    hp["lr"], hp["momentum"] = start["lr"], start["momentum"]
    meta = dict(spec["meta"])
    study_rich = _rich(hp)
    if "search" not in given:
        meta["search"] = default_search(study_rich)
    if "iterations" not in given:
        meta["iterations"] = default_iterations(meta["search"], study_rich)
    if warm:  # it starts near the answer: a short line search (or half its own), no population
        meta["search"], meta["iterations"] = warm_meta(
            meta["search"], int(meta["iterations"]), rich=study_rich, defaulted=not given
        )
    return {**spec, "hyperparameters": hp, "meta": meta}, start, warm


def join(session: Session, *, study: Study, job: Job, tasks: list[TaskSpec], start: dict, warm: bool) -> list[bool]:
    """Add the job and its tasks to the study (``study`` locked by the caller): the next positions
    of the pool, every k-th held out. Returns each task's held_out."""
    hp = Hyperparameters.model_validate(study.spec["hyperparameters"])
    if study.kind is None:
        study.kind = task_kind(tasks[0], hp)
    session.add(StudyJob(job_id=job.id, study_id=study.id, warm=warm, start=start, created_at=database_now(session)))
    flags = []
    for index in range(len(tasks)):
        position = study.pool_size + index
        flags.append(held_out(position, study.holdout_every))
        session.add(
            StudyTask(study_id=study.id, position=position, job_id=job.id, task_index=index, held_out=flags[-1])
        )
    study.pool_size += len(tasks)
    study.updated_at = database_now(session)
    session.flush()
    return flags


# ---------------------------------------------------------------- the worker's side


@dataclass
class Membership:
    """A job of a study, as its runner needs it."""

    study_id: str
    warm: bool
    held_out: list[int]
    # the study's settings when the job joined (with "param_groups" and "boundaries" for richer ones)
    start: dict[str, Any]


def membership(session: Session, *, job_id: str) -> Membership | None:
    row = session.get(StudyJob, job_id)
    if row is None:
        return None
    held = session.scalars(
        select(StudyTask.task_index)
        .where(StudyTask.job_id == job_id, StudyTask.held_out.is_(True))
        .order_by(StudyTask.task_index)
    ).all()
    return Membership(study_id=row.study_id, warm=bool(row.warm), held_out=list(held), start=dict(row.start or {}))


@dataclass
class PoolEntry:
    position: int
    job_id: str
    task_index: int


@dataclass
class UpdateInputs:
    """What an update after job ``job_id`` learns from: the study as it is now (``version``), and
    the pool's tasks of succeeded jobs, training and held out apart."""

    study_id: str
    tenant: str
    spec: dict[str, Any]
    version: int
    rounds: int
    settings: dict[str, Any]
    job_settings: dict[str, Any] | None
    training: list[PoolEntry]
    held_out: list[PoolEntry]
    specs: dict[str, dict[str, Any]]


def update_inputs(session: Session, *, study_id: str, job_id: str) -> UpdateInputs | None:
    """None when there is nothing to do: no such study or job of it, the job has not succeeded, or
    the update after it is already recorded."""
    study = session.get(Study, study_id)
    link = session.get(StudyJob, job_id)
    if study is None or link is None or link.study_id != study_id or link.version is not None:
        return None
    job = session.get(Job, job_id)
    if job is None or job.status != JobStatus.SUCCEEDED.value:
        return None
    rows = session.execute(
        select(StudyTask.position, StudyTask.job_id, StudyTask.task_index, StudyTask.held_out)
        .join(Job, Job.id == StudyTask.job_id)
        .where(StudyTask.study_id == study_id, Job.status == JobStatus.SUCCEEDED.value)
        .order_by(StudyTask.position)
    ).all()
    training = [PoolEntry(r[0], r[1], r[2]) for r in rows if not r[3]]
    held = [PoolEntry(r[0], r[1], r[2]) for r in rows if r[3]]
    job_ids = sorted({e.job_id for e in training + held})
    specs: dict[str, dict[str, Any]] = {
        row[0]: row[1] for row in session.execute(select(Job.id, Job.spec).where(Job.id.in_(job_ids)))
    }
    result = job.result or {}
    mine: dict[str, Any] = {k: result[k] for k in ("lr", "momentum", "param_groups", "boundaries") if k in result}
    return UpdateInputs(
        study_id=study.id,
        tenant=study.tenant,
        spec=study.spec,
        version=study.version,
        rounds=study.rounds,
        settings=current_settings(study),
        job_settings=mine or None,
        training=training,
        held_out=held,
        specs=specs,
    )


def record_update(
    session: Session,
    *,
    study_id: str,
    job_id: str,
    expected_version: int,
    settings: dict[str, Any],
    evaluation: dict[str, Any] | None,
    update: dict[str, Any],
    rounds: int,
) -> str:
    """Record the update after ``job_id`` under the study's row lock: "recorded"; "done" when it
    already was (a retried message); "stale" when the study changed since ``expected_version``
    (another job's update came first: learn again from the new settings); "gone" without the study."""
    study = session.scalar(select(Study).where(Study.id == study_id).with_for_update())
    link = session.get(StudyJob, job_id)
    if study is None or link is None:
        return "gone"
    if link.version is not None:
        return "done"
    if study.version != expected_version:
        return "stale"
    now = database_now(session)
    study.version += 1
    study.rounds += rounds
    study.settings = settings
    study.evaluation = evaluation
    study.updated_at = now
    link.version = study.version
    link.update = update
    link.updated_at = now
    session.flush()
    return "recorded"


# ---------------------------------------------------------------- update messages


def _rowcount(result: Any) -> int:
    return int(cast("CursorResult[Any]", result).rowcount or 0)


def mark_update_sent(session: Session, *, job_id: str) -> bool:
    """The update message after ``job_id`` is about to be sent: note when (the database's clock)
    and count it. Marked before sending, so a worker that dies before the send leaves a mark the
    sweep presumes lost after the visibility timeout. False: nothing to send (no such job of a
    study, or its update is recorded already)."""
    res = session.execute(
        update_rows(StudyJob)
        .where(StudyJob.job_id == job_id, StudyJob.version.is_(None))
        .values(update_sent_at=db_now(), update_attempts=StudyJob.update_attempts + 1)
        .execution_options(synchronize_session=False)
    )
    return _rowcount(res) == 1


def withdraw_update(session: Session, *, job_id: str) -> None:
    """The update message just marked could not be sent: it does not count, and none is
    outstanding, so the sweep sends one (once the job finished ``stale_after_s`` ago) rather than
    wait for the visibility timeout."""
    session.execute(
        update_rows(StudyJob)
        .where(
            StudyJob.job_id == job_id,
            StudyJob.version.is_(None),
            StudyJob.update_sent_at.is_not(None),
            StudyJob.update_attempts > 0,
        )
        .values(update_sent_at=None, update_attempts=StudyJob.update_attempts - 1)
        .execution_options(synchronize_session=False)
    )


def forget_update_messages(session: Session) -> int:
    """The broker connection was lost and is back (worker/celery_app.py BrokerReconnected): forget the
    outstanding update messages of updates not yet recorded, as service.lifecycle.forget_messages
    does for the jobs' chunk messages, so the next sweep sends them instead of waiting for the
    visibility timeout. The forgotten message does not count as an attempt (a broker restarting is
    not an update failing). Returns how many were forgotten."""
    res = session.execute(
        update_rows(StudyJob)
        .where(StudyJob.version.is_(None), StudyJob.update_sent_at.is_not(None))
        .values(
            update_sent_at=None,
            update_attempts=case((StudyJob.update_attempts > 0, StudyJob.update_attempts - 1), else_=0),
        )
        .execution_options(synchronize_session=False)
    )
    return _rowcount(res)


def sweep_updates(
    session: Session,
    *,
    stale_after_s: float,
    visibility_timeout_s: float = 3600.0,
    max_attempts: int = 3,
    now: datetime | None = None,
) -> list[tuple[str, str]]:
    """Updates to send again: (study_id, job_id) of each job of a study that succeeded more than
    ``stale_after_s`` ago and whose update is not recorded, with no update message outstanding (none
    sent, or the last one older than ``visibility_timeout_s``: presumed lost). Each is marked as
    sent now and counted, so no other sweep sends it too; send them once this transaction commits.

    After ``max_attempts`` messages none is sent again: the row's ``update`` says why (its
    ``version`` stays NULL, so the history shows no update for it) and the mark is cleared. ``now``
    defaults to the database's clock (tests simulate the passing of time with it); the cutoffs are
    computed from it and compared in SQL, as service.lifecycle.sweep does.
    """
    now = now or database_now(session)
    cutoff = now - timedelta(seconds=stale_after_s)
    presumed_lost = now - timedelta(seconds=visibility_timeout_s)
    stmt = (
        select(StudyJob)
        .join(Job, Job.id == StudyJob.job_id)
        .where(
            StudyJob.version.is_(None),
            Job.status == JobStatus.SUCCEEDED.value,
            Job.finished_at < cutoff,
            or_(
                StudyJob.update_sent_at.is_(None) & (StudyJob.update_attempts < max_attempts),
                StudyJob.update_sent_at < presumed_lost,
            ),
        )
        .order_by(Job.finished_at)
        .limit(100)
        .with_for_update(skip_locked=True, of=StudyJob)
    )
    out = []
    for row in session.execute(stmt).scalars():
        if row.update_attempts >= max_attempts:
            row.update = {
                "not_updated": f"{row.update_attempts} update messages were sent after this job and none recorded "
                "an update (lost, or the update failed each time); no more are sent"
            }
            row.update_sent_at = None
            log.warning(
                "study %s: update after job %s given up after %d messages",
                row.study_id,
                row.job_id,
                row.update_attempts,
            )
            continue
        row.update_sent_at = now
        row.update_attempts += 1
        out.append((row.study_id, row.job_id))
    session.flush()
    return out


# ---------------------------------------------------------------- public views


def _aware(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def pool_counts(session: Session, *, study: Study) -> PoolCounts:
    held = session.scalar(
        select(func.count()).select_from(StudyTask).where(StudyTask.study_id == study.id, StudyTask.held_out.is_(True))
    )
    return PoolCounts(tasks=study.pool_size, training=study.pool_size - (held or 0), held_out=held or 0)


def to_public(session: Session, study: Study) -> StudyPublic:
    jobs = session.scalar(select(func.count()).select_from(StudyJob).where(StudyJob.study_id == study.id)) or 0
    return StudyPublic(
        id=study.id,
        tenant=study.tenant,
        name=study.name,
        hyperparameters=Hyperparameters.model_validate(study.spec["hyperparameters"]),
        holdout_every=study.holdout_every,
        meta=StudyMeta.model_validate(study.spec.get("meta") or {}),
        kind=study.kind,
        version=study.version,
        jobs=jobs,
        pool=pool_counts(session, study=study),
        settings=StudySettings.model_validate(current_settings(study)),
        created_at=_aware(study.created_at) or study.created_at,
        updated_at=_aware(study.updated_at) or study.updated_at,
    )


def settings_public(study: Study) -> StudySettingsPublic:
    evaluation = study.evaluation
    if evaluation is not None and "evaluated" not in evaluation:  # recorded before the counts: every held-out task
        evaluation = {"held_out": len(evaluation["tasks"]), "evaluated": len(evaluation["tasks"]), **evaluation}
    return StudySettingsPublic.model_validate(
        {**current_settings(study), "study_id": study.id, "version": study.version, "evaluation": evaluation}
    )


def history_public(session: Session, *, study: Study) -> StudyHistoryPublic:
    rows = session.scalars(
        select(StudyJob).where(StudyJob.study_id == study.id, StudyJob.version.is_not(None)).order_by(StudyJob.version)
    ).all()
    items = [
        StudyUpdatePublic.model_validate(
            {**(row.update or {}), "version": row.version, "job_id": row.job_id, "created_at": _aware(row.updated_at)}
        )
        for row in rows
    ]
    return StudyHistoryPublic(study_id=study.id, items=items)
