"""The runner's study half (issue 14): where the database meets the engine for studies.

- ``job_view``: a study's job trains on its tasks that are not held out, warm (no population, a
  smaller first step: worker/engine/study.py warm_config) once the study has learned settings.
- ``update_study`` (the Celery task ``gradtune.study_update``, sent when a study's job succeeds,
  ``enqueue_update``, and again by the workers' sweep while no update is recorded after it):
  learn the study's settings again over the pool's training tasks (worker/engine/study.py relearn),
  evaluate them on its held-out tasks, and record the update once (service/studies.py
  record_update: a retried message finds it recorded; when another job's update came first, learn
  again from the new settings). Bounded by ``GRADTUNE_CHUNK_SECONDS``: the search stops between two
  evaluations at that point and the rounds finished count.

Held-out tasks are built for the evaluation only: ``_learn`` passes ``inputs.training`` to relearn
and nothing else (tests/worker/test_studies.py checks it across jobs).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

from service import studies
from service.db.session import session_scope
from service.queue import STUDY_UPDATE
from service.schemas import Hyperparameters, JobCreate
from service.settings import get_settings
from service.study_schemas import StudyCreate
from worker import engine
from worker.dataset_loader import DatasetUnavailable
from worker.engine.study import PoolConfig, relearn, warm_config

log = logging.getLogger("gradtune.worker.studies")

STALE_RETRIES = 3

# worker.runner.build_tasks: a job body -> its engine tasks
BuildTasks = Callable[..., list[Any]]


def job_view(
    job_id: str, tasks: list[Any], config: engine.MetaConfig
) -> tuple[list[Any], engine.MetaConfig, dict | None]:
    """The tasks a study's job trains on (its held-out ones left out), its search's config (warm
    when the study had learned settings when the job joined) and the table its richer values start
    from (the study's learned per-layer or scheduled values; None otherwise: engine.init_state's
    ``table``). A job of no study: as given, no table."""
    with session_scope() as db:
        member = studies.membership(db, job_id=job_id)
    if member is None:
        return tasks, config, None
    held = set(member.held_out)
    train = [t for i, t in enumerate(tasks) if i not in held]
    table = member.start if member.warm and "param_groups" in member.start else None
    return train, warm_config(config) if member.warm else config, table


def send_update(study_id: str, job_id: str) -> None:
    """Send the Celery message that asks a worker to update the study after ``job_id``."""
    from worker.celery_app import app

    app.send_task(STUDY_UPDATE, args=[study_id, job_id], queue=get_settings().queue_name)


def send_marked_update(study_id: str, job_id: str) -> bool:
    """Send the update message the database already marks as sent (studies.mark_update_sent or
    studies.sweep_updates); when that fails, withdraw the mark so that the sweep sends one soon."""
    try:
        send_update(study_id, job_id)
        return True
    except Exception as exc:
        log.warning("study %s: update after job %s not sent (%s); the sweep will", study_id, job_id, exc)
        try:
            with session_scope() as db:
                studies.withdraw_update(db, job_id=job_id)
        except Exception:
            log.exception("study %s: could not withdraw the update message after job %s", study_id, job_id)
        return False


def enqueue_update(study_id: str, job_id: str) -> None:
    """Ask a worker to update the study after ``job_id``. The message is marked as sent first (one
    small transaction), then sent: a failed send withdraws the mark, and a lost message (or a worker
    that died between the two) is re-sent by the workers' sweep (worker.runner.sweep_once) once the
    mark is older than the visibility timeout, until the update is recorded or ``max_attempts``
    messages were sent. A duplicate finds the update recorded and does nothing."""
    try:
        with session_scope() as db:
            if not studies.mark_update_sent(db, job_id=job_id):
                return  # recorded already (or no such job of a study): nothing to ask for
    except Exception as exc:  # sent anyway: unmarked, the sweep may send a duplicate, which is harmless
        log.warning("study %s: update after job %s not marked as sent (%s)", study_id, job_id, exc)
    send_marked_update(study_id, job_id)


def study_config(hp: Hyperparameters) -> engine.MetaConfig:
    settings = get_settings()
    return engine.MetaConfig(
        lr_bounds=tuple(hp.lr_bounds),
        momentum_bounds=tuple(hp.momentum_bounds),
        per_layer=hp.per_layer,
        schedule_segments=hp.schedule_segments,
        rich_holdout=0,  # relearn keeps a round's answer only if it holds on other pool tasks already
        memory_budget_mb=settings.max_unroll_bytes / 2**20,
        job_memory_mb=settings.max_job_memory_bytes / 2**20,
    )


def _tasks(
    inputs: studies.UpdateInputs, entries: list[studies.PoolEntry], build_tasks: BuildTasks
) -> tuple[list[Any], list[Any]]:
    """Engine tasks of the pool ``entries`` (the entries whose data could not be loaded left out),
    and those entries."""
    built: dict[str, list[Any] | None] = {}
    tasks, kept = [], []
    for entry in entries:
        if entry.job_id not in built:
            try:
                job = JobCreate.model_validate(inputs.specs[entry.job_id])
                built[entry.job_id] = build_tasks(job, tenant=inputs.tenant)
            except DatasetUnavailable as exc:
                log.warning("study %s: job %s's tasks left out (%s)", inputs.study_id, entry.job_id, exc)
                built[entry.job_id] = None
        job_tasks = built[entry.job_id]
        if job_tasks is not None:
            tasks.append(job_tasks[entry.task_index])
            kept.append(entry)
    return tasks, kept


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite and len(finite) == len(values) else None


def _val_losses(tasks: list[Any], settings: dict) -> list[float]:
    draws = list(engine.EVAL_DRAWS)
    if "param_groups" in settings:
        out = engine.evaluate_groups(tasks, settings["param_groups"], settings["boundaries"], draws)
    else:
        out = engine.evaluate(tasks, settings["lr"], settings["momentum"], draws)
    return [float(t["val_loss"]) for t in out["tasks"]]


def held_out_evaluation(tasks: list[Any], entries: list[studies.PoolEntry], settings: dict, start: dict) -> dict | None:
    """The settings and the study's starting values on its held-out tasks (None: none yet)."""
    if not tasks:
        return None
    learned, initial = _val_losses(tasks, settings), _val_losses(tasks, start)
    rows = [
        {
            "job_id": e.job_id,
            "task_index": e.task_index,
            "name": t.name,
            "val_loss": v if math.isfinite(v) else None,
            "start_val_loss": s if math.isfinite(s) else None,
        }
        for e, t, v, s in zip(entries, tasks, learned, initial, strict=True)
    ]
    return {
        "tasks": rows,
        "mean_val_loss": _mean(learned),
        "mean_start_val_loss": _mean(initial),
        "draws": list(engine.EVAL_DRAWS),
    }


def _learn(inputs: studies.UpdateInputs, build_tasks: BuildTasks) -> tuple[dict, dict | None, dict, int]:
    """(settings, held-out evaluation, the update's record, rounds run) for one update."""
    spec = StudyCreate.model_validate(inputs.spec)
    started = time.monotonic()
    deadline = started + float(get_settings().chunk_seconds)
    train, train_entries = _tasks(inputs, inputs.training, build_tasks)
    settings, rounds, note = dict(inputs.settings), [], None
    if train:
        pool = PoolConfig(
            meta_batch=spec.meta.meta_batch,
            rounds=spec.meta.rounds,
            iterations=spec.meta.iterations,
            check_tasks=spec.meta.check_tasks,
        )
        try:
            out = relearn(
                train,
                study_config(spec.hyperparameters),
                settings,
                seed=spec.meta.seed,
                first_round=inputs.rounds,
                pool=pool,
                alternatives=[inputs.job_settings] if inputs.job_settings else (),
                should_stop=lambda: time.monotonic() >= deadline,
            )
            settings, rounds = out["settings"], out["rounds"]
        except engine.EngineError as exc:
            note = f"the settings were kept: {exc}"
    else:
        note = "no training task yet: the settings were kept"
    positions = [e.position for e in train_entries]
    for r in rounds:  # indices into the training tasks -> pool positions
        r["batch"] = [positions[i] for i in r["batch"]]
        r["check"] = [positions[i] for i in r["check"]]
    held, held_entries = _tasks(inputs, inputs.held_out, build_tasks)
    hp = spec.hyperparameters
    evaluation = held_out_evaluation(held, held_entries, settings, {"lr": hp.lr, "momentum": hp.momentum})
    update = {
        "before": inputs.settings,
        "after": settings,
        "pool": {"tasks": len(train) + len(held), "training": len(train), "held_out": len(held)},
        "rounds": rounds,
        "held_out_mean_val_loss": evaluation["mean_val_loss"] if evaluation else None,
        "seconds": time.monotonic() - started,
        "note": note,
    }
    return settings, evaluation, update, len(rounds)


def update_study(study_id: str, job_id: str, build_tasks: BuildTasks) -> str:
    """Learn the study's settings again after ``job_id``: "recorded", "skipped" (nothing to do: an
    update already recorded, the job not succeeded, no such study), "gone" or "stale" (the study kept
    changing under STALE_RETRIES tries). ``build_tasks``: worker.runner.build_tasks (passed in, so
    that the runner imports this module and not the other way round)."""
    outcome = "stale"
    for _ in range(STALE_RETRIES):
        with session_scope() as db:
            inputs = studies.update_inputs(db, study_id=study_id, job_id=job_id)
        if inputs is None:
            return "skipped"
        settings, evaluation, update, rounds = _learn(inputs, build_tasks)
        with session_scope() as db:
            outcome = studies.record_update(
                db,
                study_id=study_id,
                job_id=job_id,
                expected_version=inputs.version,
                settings=settings,
                evaluation=evaluation,
                update=update,
                rounds=rounds,
            )
        if outcome != "stale":
            break
    log.info("study %s after job %s: %s", study_id, job_id, outcome)
    return outcome
