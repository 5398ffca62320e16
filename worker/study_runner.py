"""The runner's study half (issue 14): where the database meets the engine for studies.

- ``job_view``: a study's job trains on its tasks that are not held out, warm (no population, a
  smaller first step: worker/engine/study.py warm_config) once the study has learned settings.
- ``update_study`` (the Celery task ``gradtune.study_update``, sent when a study's job succeeds,
  ``enqueue_update``, and again by the workers' sweep while no update is recorded after it):
  learn the study's settings again over the pool's training tasks (worker/engine/study.py relearn),
  evaluate them on its first ``meta.eval_tasks`` held-out tasks, and record the update once (service/studies.py
  record_update: a retried message finds it recorded; when another job's update came first, learn
  again from the new settings). Bounded by ``GRADTUNE_CHUNK_SECONDS``: the search stops between two
  evaluations at that point and the rounds finished count.

Held-out tasks are built for the evaluation only: ``_learn`` passes ``inputs.training`` to relearn
and nothing else (tests/worker/test_studies.py checks it across jobs).

An update's cost does not grow with the pool: relearn gets the training tasks as ``PoolTasks``, a
sequence that builds a job's tasks (loads its data) only when a round's meta-batch or check, or the
first meta-batch with alternatives, needs one of them; the evaluation covers the first
``meta.eval_tasks`` held-out tasks by pool position (the same ones every update); each job is built
at most once per update. A job whose data cannot be loaded is found when first needed: its tasks
are left out (relearn runs again over the others) and the update names it (``unavailable``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, overload

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


class TaskUnavailable(Exception):
    """A pool task whose job's data could not be loaded (DatasetUnavailable), met by relearn."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id


class PoolTasks(Sequence[Any]):
    """The engine tasks of pool ``entries``, built only when relearn or the evaluation asks for one:
    ``self[i]`` builds entry i's job's tasks (``build_tasks``) on first use and caches them per job
    id in ``built`` (shared between an update's training and held-out tasks, so that a job is built
    once per update). A job whose data cannot be loaded is cached as None and its entries raise
    TaskUnavailable (``_relearn`` leaves them out and learns again)."""

    def __init__(
        self,
        inputs: studies.UpdateInputs,
        entries: list[studies.PoolEntry],
        build_tasks: BuildTasks,
        built: dict[str, list[Any] | None],
    ) -> None:
        self.inputs, self.entries, self.build_tasks, self.built = inputs, entries, build_tasks, built

    def __len__(self) -> int:
        return len(self.entries)

    @overload
    def __getitem__(self, i: int) -> Any: ...
    @overload
    def __getitem__(self, i: slice) -> list[Any]: ...
    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        entry = self.entries[i]
        tasks = self.job_tasks(entry.job_id)
        if tasks is None:
            raise TaskUnavailable(entry.job_id)
        return tasks[entry.task_index]

    def job_tasks(self, job_id: str) -> list[Any] | None:
        """``job_id``'s engine tasks (None: its data could not be loaded), built once."""
        if job_id not in self.built:
            try:
                job = JobCreate.model_validate(self.inputs.specs[job_id])
                self.built[job_id] = self.build_tasks(job, tenant=self.inputs.tenant)
            except DatasetUnavailable as exc:
                log.warning("study %s: job %s's tasks left out (%s)", self.inputs.study_id, job_id, exc)
                self.built[job_id] = None
        return self.built[job_id]

    def unavailable(self) -> list[str]:
        """The jobs found so far whose data could not be loaded, sorted."""
        return sorted(job_id for job_id, tasks in self.built.items() if tasks is None)


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite and len(finite) == len(values) else None


def _val_losses(tasks: list[Any], settings: dict) -> list[float]:
    out = engine.evaluate_learned(tasks, settings, list(engine.EVAL_DRAWS))
    return [float(t["val_loss"]) for t in out["tasks"]]


def held_out_evaluation(
    tasks: list[Any], entries: list[studies.PoolEntry], settings: dict, start: dict, *, held_out: int
) -> dict | None:
    """The settings and the study's starting values on the held-out ``tasks`` evaluated (None: none
    yet); ``held_out``: how many the pool holds (the evaluation covers the first ``eval_tasks``)."""
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
        "held_out": held_out,
        "evaluated": len(rows),
    }


def _relearn(
    inputs: studies.UpdateInputs,
    spec: StudyCreate,
    tasks: Callable[[list[studies.PoolEntry]], PoolTasks],
    should_stop: Callable[[], bool],
) -> tuple[dict, list[dict], str | None]:
    """(settings, rounds with pool positions, note) of relearn over the pool's training tasks, each
    job built only when a round's batch or check (or the first batch, with alternatives) needs one
    of its tasks. A job whose data cannot be loaded is found there: its tasks are left out and
    relearn runs again over the others (what it would have done had they never joined: the
    batches are drawn over the tasks it learns from), until the time is up."""
    settings, entries = dict(inputs.settings), list(inputs.training)
    pool = PoolConfig(
        meta_batch=spec.meta.meta_batch,
        rounds=spec.meta.rounds,
        iterations=spec.meta.iterations,
        check_tasks=spec.meta.check_tasks,
    )
    while entries:
        try:
            out = relearn(
                tasks(entries),
                study_config(spec.hyperparameters),
                settings,
                seed=spec.meta.seed,
                first_round=inputs.rounds,
                pool=pool,
                alternatives=[inputs.job_settings] if inputs.job_settings else (),
                should_stop=should_stop,
            )
        except TaskUnavailable as exc:
            entries = [e for e in entries if e.job_id != exc.job_id]
            if entries and should_stop():
                return settings, [], "the settings were kept: the time ran out leaving out unavailable tasks"
            continue
        except engine.EngineError as exc:
            return settings, [], f"the settings were kept: {exc}"
        positions = [e.position for e in entries]
        for r in out["rounds"]:  # indices into the training tasks -> pool positions
            r["batch"] = [positions[i] for i in r["batch"]]
            r["check"] = [positions[i] for i in r["check"]]
        return out["settings"], out["rounds"], None
    if inputs.training:
        return settings, [], "no training task's data could be loaded: the settings were kept"
    return settings, [], "no training task yet: the settings were kept"


def _learn(inputs: studies.UpdateInputs, build_tasks: BuildTasks) -> tuple[dict, dict | None, dict, int]:
    """(settings, held-out evaluation, the update's record, rounds run) for one update. It builds
    the training tasks relearn touches and the first ``meta.eval_tasks`` held-out tasks only
    (each job once), so its cost does not grow with the pool."""
    spec = StudyCreate.model_validate(inputs.spec)
    started = time.monotonic()
    deadline = started + float(get_settings().chunk_seconds)
    built: dict[str, list[Any] | None] = {}

    def tasks(entries: list[studies.PoolEntry]) -> PoolTasks:
        return PoolTasks(inputs, entries, build_tasks, built)

    settings, rounds, note = _relearn(inputs, spec, tasks, lambda: time.monotonic() >= deadline)
    first = tasks(inputs.held_out[: spec.meta.eval_tasks])  # the same ones every update, by position
    held_entries = [e for e in first.entries if first.job_tasks(e.job_id) is not None]
    hp = spec.hyperparameters
    evaluation = held_out_evaluation(
        list(tasks(held_entries)),
        held_entries,
        settings,
        {"lr": hp.lr, "momentum": hp.momentum},
        held_out=len(inputs.held_out),
    )
    training, held = len(inputs.training), len(inputs.held_out)
    update = {
        "before": inputs.settings,
        "after": settings,
        "pool": {"tasks": training + held, "training": training, "held_out": held},
        "rounds": rounds,
        "held_out_mean_val_loss": evaluation["mean_val_loss"] if evaluation else None,
        "held_out_evaluated": len(held_entries),
        "unavailable": first.unavailable(),
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
