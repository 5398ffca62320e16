"""The one place where the database meets the engine.

A Celery message asks for one chunk of a job. ``run_chunk`` claims the job, loads
its data and last checkpoint, runs a few meta-iterations with the engine, and
commits history, checkpoint and progress in one transaction before enqueueing
the next chunk. The chunk after the last iteration evaluates and finishes the job.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from datetime import datetime
from typing import Any

import torch

from gradtune.spec import JobStatus
from gradtune.spec.hyper import constant_fraction
from service import lifecycle, placement, studies
from service.db.session import session_scope
from service.logs import job_context
from service.queue import send_chunk
from service.redaction import redact
from service.schemas import BUILTIN_DATASETS, JobCreate, SettingsPublic
from service.settings import get_settings
from service.workers import record_current_job
from worker import engine
from worker.chunk_metrics import observe_chunk
from worker.dataset_loader import DatasetUnavailable
from worker.device import device

log = logging.getLogger("gradtune.worker")

_sweeper: threading.Thread | None = None
_stop = threading.Event()

DTYPE = torch.float32


def task_seed(meta_seed: int, index: int) -> int:
    """Seed of task ``index``'s random draws (initialization, batch order)."""
    return (meta_seed * 1_000_003 + index * 7_919) % (2**31)


def _targets(y: Any, loss: str, dev: torch.device) -> tuple[torch.Tensor, int | None]:
    if loss == "cross_entropy":
        t = torch.as_tensor(y, dtype=torch.float64).round().to(torch.int64)
        return t.to(dev), None
    t = torch.as_tensor(y, dtype=DTYPE)
    if t.ndim == 1:
        t = t.unsqueeze(1)
    return t.to(dev), int(t.shape[1])


def _cnn_task(spec: Any, common: dict, out: int) -> Any:
    """A ModuleTask (worker/engine/modules.py) for a ``cnn`` model: images (N, C, H, W)."""
    from worker.engine.cnn import cnn_task

    return cnn_task(**common, layers=[layer.model_dump() for layer in spec.model.layers], out_features=out)


def _exported_task(spec: Any, common: dict, tenant: str | None) -> Any:
    """A ModuleTask for an ``exported`` model: the uploaded program (worker/model_loader.py, read as
    data) run by worker/engine/exported.ProgramModule, whose parameters carry the program's own
    names; ``init`` "default" re-draws PyTorch-default weights in call order (as an mlp or cnn
    declared the same way starts), "uploaded" starts every draw from the file's weights."""
    from worker.engine.exported import exported_task
    from worker.model_loader import load_program

    program, weights = load_program(spec.model.model, get_settings(), tenant=tenant)
    return exported_task(**common, program=program, weights=weights, init=spec.model.init)


def build_tasks(job: JobCreate, dev: torch.device | None = None, *, tenant: str | None = None) -> list[Any]:
    """Engine tasks from a validated job body (the API has checked shapes and labels): an
    ``engine.Task`` for an ``mlp`` model, a ``ModuleTask`` (worker/engine/modules.py) for a ``cnn``
    or an ``exported`` program. With ``tenant``, every dataset and model the job names must be that
    tenant's (else DatasetUnavailable: the job fails naming it)."""
    from worker.dataset_loader import load_dataset_task_data
    from worker.datasets import load_builtin

    dev = dev or device()
    tasks = []
    for i, spec in enumerate(job.tasks):
        data = spec.data
        if data.source == "inline":
            xt, yt, xv, yv = data.x_train, data.y_train, data.x_val, data.y_val
        elif data.source == "builtin":
            xt, yt, xv, yv = load_builtin(data.name, val_fraction=data.val_fraction, seed=data.seed)
        else:
            xt, yt, xv, yv = load_dataset_task_data(data, get_settings(), tenant=tenant)
        y_train, width = _targets(yt, spec.loss, dev)
        y_val, _ = _targets(yv, spec.loss, dev)
        if spec.loss == "cross_entropy":
            if data.source == "builtin":
                out = int(BUILTIN_DATASETS[data.name]["classes"])
            else:
                out = int(max(y_train.max().item(), y_val.max().item())) + 1
        else:
            out = int(width)
        # What every kind of task takes; seeds derive from meta.seed and the task's index.
        common = dict(
            name=spec.name or f"task{i}",
            x_train=torch.as_tensor(xt, dtype=DTYPE).to(dev),
            y_train=y_train,
            x_val=torch.as_tensor(xv, dtype=DTYPE).to(dev),
            y_val=y_val,
            loss=spec.loss,
            steps=spec.steps,
            batch_size=spec.batch_size,
            seed=task_seed(job.meta.seed, i),
        )
        if spec.model.kind == "cnn":
            tasks.append(_cnn_task(spec, common, out))
        elif spec.model.kind == "exported":
            tasks.append(_exported_task(spec, common, tenant))
        else:
            tasks.append(
                engine.Task(
                    **common, hidden=tuple(spec.model.hidden), activation=spec.model.activation, out_features=out
                )
            )
    return tasks


def meta_config(job: JobCreate) -> engine.MetaConfig:
    hp = job.hyperparameters
    search = engine.LINE_SEARCH if job.meta.search == "line" else {}
    return engine.MetaConfig(
        **search,
        iterations=job.meta.iterations,
        lr_bounds=tuple(hp.lr_bounds),
        momentum_bounds=tuple(hp.momentum_bounds),
        per_layer=hp.per_layer,
        schedule_segments=hp.schedule_segments,
        constant_fraction=constant_fraction(job.meta.search, job.meta.iterations),
        method=job.meta.method,
        truncation=job.meta.truncation,
        memory_budget_mb=get_settings().max_unroll_bytes / 2**20,
        job_memory_mb=get_settings().max_job_memory_bytes / 2**20,
    )


def _finite(x: float) -> float | None:
    x = float(x)
    return x if x == x and abs(x) != float("inf") else None


_NO_GROUPS = object()


def _worse(a: float | None, b: float | None) -> bool:
    """Mean validation loss `a` is worse than `b` (None: not finite, worse than any number)."""
    if a is None:
        return b is not None
    return b is not None and a > b


def choose_fallback(initial: float | None, learned: float | None, groups: Any = _NO_GROUPS) -> str | None:
    """What the job returns, from the evaluations' mean validation losses (None: not finite; groups
    left out: no per-layer / scheduled values): None (the learned values), "constant" (the learned
    per-layer / scheduled values evaluated worse than the learned constant pair, itself not worse
    than the start) or "start" (the values that would be returned evaluated worse than the starting
    ones). Ties keep the learned values."""
    constant_ok = not _worse(learned, initial)
    if groups is _NO_GROUPS:
        return None if constant_ok else "start"
    if not _worse(groups, learned if constant_ok else initial):
        return None
    return "constant" if constant_ok else "start"


def evaluate_settings(tasks: list, job: JobCreate, state: dict) -> dict:
    """The settings body: learned values, and the proof with plain torch.optim.SGD. Never worse than
    the start on the evaluation draws: the values returned are the better of what the search found
    and the starting values (choose_fallback; SettingsPublic says how)."""
    from worker.engine import evaluate, evaluate_groups  # MLP, cnn and exported tasks alike

    hp = job.hyperparameters
    state = engine.check_rich(tasks, meta_config(job), state)  # a job stopped early has not run it yet
    best = engine.best_settings(state)
    check = best.get("rich_check")
    draws = list(engine.EVAL_DRAWS)
    before = evaluate(tasks, hp.lr, hp.momentum, draws)
    after = evaluate(tasks, best["lr"], best["momentum"], draws)
    groups = None
    if "param_groups" in best:
        groups = evaluate_groups(tasks, best["param_groups"], best["boundaries"], draws)
    rows = []
    for i, (b, a) in enumerate(zip(before["tasks"], after["tasks"], strict=True)):
        row = {
            "name": b["name"],
            "initial_val_loss": _finite(b["val_loss"]),
            "learned_val_loss": _finite(a["val_loss"]),
            "seed": tasks[i].seed,
        }
        if groups is not None:
            row["learned_groups_val_loss"] = _finite(groups["tasks"][i]["val_loss"])
        rows.append(row)
    learned = {"lr": float(best["lr"]), "momentum": float(best["momentum"])}
    evaluation = {
        "tasks": rows,
        "mean_initial_val_loss": _finite(before["mean_val_loss"]),
        "mean_learned_val_loss": _finite(after["mean_val_loss"]),
        "initial": {"lr": hp.lr, "momentum": hp.momentum},
        "learned": learned,
        "draws": draws,
        "training_draws": list(meta_config(job).draws),
    }
    scores: tuple = (evaluation["mean_initial_val_loss"], evaluation["mean_learned_val_loss"])
    if groups is not None:
        learned["param_groups"] = best["param_groups"]
        learned["boundaries"] = best["boundaries"]
        evaluation["mean_learned_groups_val_loss"] = _finite(groups["mean_val_loss"])
        scores += (evaluation["mean_learned_groups_val_loss"],)
    fallback = choose_fallback(*scores)
    if groups is not None and fallback is None and check is not None and check["kept"] == "constant":
        fallback = "constant"  # the richer values did not beat the pair on tasks the search never saw
        evaluation["rich_check"] = check
    elif check is not None:
        evaluation["rich_check"] = check
    returned = {"lr": hp.lr, "momentum": hp.momentum} if fallback == "start" else learned
    body = {
        "optimizer": "SGD",
        "lr": float(returned["lr"]),
        "momentum": float(returned["momentum"]),
        "method": state.get("method"),
        "method_reason": state.get("method_reason"),
        "search": job.meta.search,
        "fallback": fallback,
        "evaluation": evaluation,
    }
    if groups is not None and fallback is None:
        body["param_groups"] = best["param_groups"]
        body["boundaries"] = best["boundaries"]
    if fallback is not None:
        log.info("settings fall back to the %s values: %s", fallback, scores)
    return SettingsPublic.model_validate(body).model_dump(mode="json", exclude_unset=True)


# The chunk clock (deadlines, shares); tests replace it with a simulated one.
_clock = time.monotonic


class _Heartbeat:
    """Refreshes the lease from a thread while a chunk computes, and notices a cancel request or a
    lost lease (``stop_reason``) so that the engine stops within one heartbeat."""

    def __init__(self, job_id: str, token: str, every: float) -> None:
        self.job_id, self.token, self.every = job_id, token, every
        self.lost = False
        self.cancel = False
        self._done = threading.Event()
        # run in a copy of the chunk's context, so its log lines carry the job id (service/logs.py)
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._run,), name=f"heartbeat-{job_id}", daemon=True)

    def _run(self) -> None:
        while not self._done.wait(self.every):
            try:
                with session_scope() as db:
                    if not lifecycle.heartbeat(db, job_id=self.job_id, token=self.token):
                        self.lost = True
                        return
                    if lifecycle.cancel_requested(db, job_id=self.job_id):
                        self.cancel = True
            except Exception:  # a missed beat is not fatal; the next one may work
                log.exception("heartbeat for job %s failed", self.job_id)

    def stop_reason(self) -> str | None:
        return "lost" if self.lost else "cancel" if self.cancel else None

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


class _Stop:
    """run_meta's should_stop for one chunk (it is called before each iteration and each evaluation).

    Stops at once (between two evaluations) when the heartbeat saw a cancel or a lost lease, or
    when the job's deadline passed (its earlier chunks' time plus this chunk's); and between two
    iterations when this chunk's share of time is spent, predicted from its longest iteration so
    far, so that no chunk runs longer than its share unless a single iteration does.
    """

    def __init__(self, heartbeat: Any, claim: lifecycle.Claim, settings: Any, clock: Any = None) -> None:
        self.heartbeat, self.clock = heartbeat, clock or _clock
        self.started = self.last = self.clock()
        self.deadline = settings.job_seconds(claim.max_seconds) - claim.elapsed_seconds
        self.share = float(settings.chunk_seconds)
        self.longest = 0.0
        self.share_spent = False
        self.reason: str | None = None

    def elapsed(self) -> float:
        return self.clock() - self.started

    def iteration_done(self) -> None:
        """Called after each iteration: is there time for one more in this chunk's share?"""
        now = self.clock()
        self.longest = max(self.longest, now - self.last)
        self.last = now
        if now - self.started + self.longest > self.share:
            self.share_spent = True

    def __call__(self) -> bool:
        reason = self.heartbeat.stop_reason()
        if reason is None and self.elapsed() >= self.deadline:
            reason = lifecycle.DEADLINE
        if reason is None and self.share_spent:
            reason = "share"
        self.reason = reason
        return reason is not None


def enqueue(job_id: str, iteration: int, device: str | None = None) -> None:
    """Send a chunk message to the queue of the device the job asked for (None: auto)."""
    from worker.celery_app import app

    send_chunk(app, get_settings(), job_id, iteration, device)


def _send(job_id: str, iteration: int, device: str | None = None) -> bool:
    """Send the chunk message the database already announces (``enqueued_at``); when that fails,
    withdraw the announcement so that the sweep sends one once the job is stale."""
    try:
        enqueue(job_id, iteration, device)
        return True
    except Exception as exc:
        log.warning("job %s: message for iteration %d not sent (%s); the sweep will", job_id, iteration, exc)
        try:
            with session_scope() as db:
                lifecycle.clear_enqueued(db, job_id=job_id, iteration=iteration)
        except Exception:
            log.exception("job %s: could not withdraw the announced message", job_id)
        return False


def _claim(job_id: str, iteration: int | None, settings: Any) -> lifecycle.Claim | None:
    with session_scope() as db:
        claim = lifecycle.claim_job(
            db,
            job_id=job_id,
            iteration=iteration,
            stale_after_s=settings.stale_after_seconds,
            max_attempts=settings.max_attempts,
        )
        if claim is not None:
            lifecycle.set_device(db, job_id=job_id, token=claim.token, device=str(device()))
    return claim


def run_chunk(job_id: str, iteration: int | None, *, owner: str | None = None) -> str:
    """Run one chunk of a job; returns what happened (for logs and tests): "skipped", "committed",
    "succeeded", "cancelled", "failed" or "lost". A chunk that ran is timed in the
    ``gradtune_chunk_seconds`` histogram by that outcome (worker/chunk_metrics.py). Its log lines
    carry the job id (service/logs.py).

    ``owner`` names the delivery in logs (the Celery task id); the lease is a fresh token per claim,
    so a redelivered message with the same task id cannot pass for the worker still running it.
    """
    with job_context(job_id):
        started = time.perf_counter()
        outcome = _run_chunk(job_id, iteration, owner)
        observe_chunk(outcome, time.perf_counter() - started)
        return outcome


def _run_chunk(job_id: str, iteration: int | None, owner: str | None) -> str:
    settings = get_settings()
    claim = _claim(job_id, iteration, settings)
    if claim is None:
        log.info("job %s: nothing to do for message %s at iteration %s", job_id, owner, iteration)
        return "skipped"
    token = claim.token
    record_current_job(job_id)  # this worker's row in /v1/workers; celery_app clears it after the task
    if claim.cancel_requested:
        with session_scope() as db:
            lifecycle.cancel_job(db, job_id=job_id, token=token)
        log.info("job %s cancelled at iteration %d", job_id, claim.iteration)
        return "cancelled"
    beat = _Heartbeat(job_id, token, settings.heartbeat_seconds)
    stop = _Stop(beat, claim, settings)
    try:
        with beat:
            job = JobCreate.model_validate(claim.spec)
            tasks = build_tasks(job, tenant=claim.tenant)
            config = meta_config(job)
            table = None
            if job.study is not None:  # its held-out tasks left out, warm from the study's settings
                from worker import study_runner

                tasks, config, table = study_runner.job_view(job_id, tasks, config)
            hp = job.hyperparameters
            state = claim.checkpoint or engine.init_state(config, hp.lr, hp.momentum, table=table)
            if claim.iteration >= claim.iterations or claim.stopped or not tasks:
                return _finish(claim, job, tasks or build_tasks(job, tenant=claim.tenant), state, stop)
            records: list[dict] = []

            def on_iteration(record: dict) -> None:
                records.append(record)
                stop.iteration_done()

            n = min(settings.chunk_iterations, claim.iterations - claim.iteration)
            state = engine.run_meta(tasks, config, state, n, on_iteration=on_iteration, should_stop=stop)
            if not records and stop.reason is None:
                raise engine.EngineError("the meta-optimization made no progress in a chunk")
    except (engine.EngineError, DatasetUnavailable) as exc:
        _fail(claim, redact(str(exc), settings), stop)
        log.warning("job %s failed: %s", job_id, exc)
        return "failed"
    except Exception as exc:
        log.exception("job %s: internal error", job_id)
        _fail(claim, f"The worker hit an internal error ({type(exc).__name__}); the job cannot continue.", stop)
        return "failed"
    return _commit(claim, records, state, stop)


def _finish(claim: lifecycle.Claim, job: JobCreate, tasks: list, state: dict, stop: _Stop) -> str:
    """Evaluate and end the job; a study's job that succeeded asks for the study's update. A study's
    job whose every task is held out trains on none: it evaluates the study's settings on them."""
    result = evaluate_settings(tasks, job, state)
    with session_scope() as db:
        status = lifecycle.finish_job(
            db, job_id=claim.job_id, token=claim.token, result=result, elapsed_seconds=stop.elapsed()
        )
    log.info("job %s %s: lr=%g momentum=%g", claim.job_id, status or "lost", result["lr"], result["momentum"])
    if job.study is not None and status == JobStatus.SUCCEEDED.value:
        from worker import study_runner

        study_runner.enqueue_update(job.study, claim.job_id)
    return status or "lost"


def _fail(claim: lifecycle.Claim, error: str, stop: _Stop) -> None:
    with session_scope() as db:
        lifecycle.fail_job(db, job_id=claim.job_id, token=claim.token, error=error, elapsed_seconds=stop.elapsed())


def _commit(claim: lifecycle.Claim, records: list[dict], state: dict, stop: _Stop) -> str:
    """Commit the chunk and send the next message (unless the job ended)."""
    job_id = claim.job_id
    stopped = lifecycle.DEADLINE if stop.reason == lifecycle.DEADLINE else None
    with session_scope() as db:
        status = lifecycle.commit_chunk(
            db,
            job_id=job_id,
            token=claim.token,
            start_iteration=claim.iteration,
            records=records,
            checkpoint=state,
            elapsed_seconds=stop.elapsed(),
            stopped=stopped,
        )
    if status is None:
        log.warning("job %s: lease lost during chunk at iteration %d; work discarded", job_id, claim.iteration)
        return "lost"
    if status == JobStatus.CANCELLED.value:
        log.info("job %s cancelled at iteration %d", job_id, claim.iteration + len(records))
        return "cancelled"
    if stopped:
        log.info("job %s: deadline reached at iteration %d; evaluating the best point", job_id, claim.iteration)
    _send(job_id, claim.iteration + len(records), claim.spec.get("device"))  # the job's queue, as its first
    return "committed"


def _sweep_limits() -> dict[str, Any]:
    """The settings both sweeps judge by: stale after, presumed lost after, at most so many tries."""
    settings = get_settings()
    return {
        "stale_after_s": settings.stale_after_seconds,
        "visibility_timeout_s": settings.visibility_timeout_seconds(),
        "max_attempts": settings.max_attempts,
    }


def sweep_once(now: datetime | None = None) -> list[tuple[str, int]]:
    """Send a chunk message for each job whose worker died or which waits with no message
    outstanding (service.lifecycle.sweep; ``now`` simulates the database's clock in tests), and a
    study's lost update messages again (sweep_study_updates). Returns the jobs' (job_id, iteration)."""
    with session_scope() as db:
        pairs = lifecycle.sweep(db, **_sweep_limits(), now=now)
        devices = placement.requested_devices(db, [job_id for job_id, _ in pairs])
    for job_id, iteration in pairs:
        log.warning("job %s: re-enqueued at iteration %d (worker lost or no message outstanding)", job_id, iteration)
        _send(job_id, iteration, devices.get(job_id))
    sweep_study_updates(now)
    return pairs


def sweep_study_updates(now: datetime | None = None) -> list[tuple[str, str]]:
    """Send again the update message of each succeeded job of a study whose update is not recorded
    and has no message outstanding (service.studies.sweep_updates); returns (study_id, job_id)."""
    from worker import study_runner

    with session_scope() as db:
        pairs = studies.sweep_updates(db, **_sweep_limits(), now=now)
    for study_id, job_id in pairs:
        log.warning("study %s: update after job %s re-sent (none sent, or the last presumed lost)", study_id, job_id)
        study_runner.send_marked_update(study_id, job_id)
    return pairs


def _sweep_loop() -> None:
    every = get_settings().sweep_seconds
    while not _stop.is_set():
        try:
            sweep_once()
        except Exception:
            log.exception("sweep failed")
        _stop.wait(every)


def start_sweeper() -> None:
    global _sweeper
    if _sweeper is None or not _sweeper.is_alive():
        _stop.clear()
        _sweeper = threading.Thread(target=_sweep_loop, name="gradtune-sweeper", daemon=True)
        _sweeper.start()


def stop_sweeper() -> None:
    _stop.set()
