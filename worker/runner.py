"""The one place where the database meets the engine.

A Celery message asks for one chunk of a job. ``run_chunk`` claims the job, loads
its data and last checkpoint, runs a few meta-iterations with the engine, and
commits history, checkpoint and progress in one transaction before enqueueing
the next chunk. The chunk after the last iteration evaluates and finishes the job.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch

from service import lifecycle
from service.db.session import session_scope
from service.queue import RUN_CHUNK
from service.schemas import BUILTIN_DATASETS, JobCreate, SettingsPublic
from service.settings import get_settings
from worker import engine
from worker.dataset_loader import DatasetUnavailable

log = logging.getLogger("gradtune.worker")

_device: torch.device | None = None
_sweeper: threading.Thread | None = None
_stop = threading.Event()

DTYPE = torch.float32


def configure_process() -> torch.device:
    """Pick this process's device and thread count; called when a worker process starts."""
    global _device
    settings = get_settings()
    torch.set_num_threads(max(1, settings.torch_threads))
    want = settings.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        _device = torch.device("cuda")
    else:
        _device = torch.device("cpu")
    log.info("worker device %s, %d torch threads", _device, torch.get_num_threads())
    return _device


def device() -> torch.device:
    return _device if _device is not None else configure_process()


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


def _exported_task(spec: Any, common: dict) -> Any:
    """A ModuleTask for an ``exported`` model: the uploaded program (worker/model_loader.py, read as
    data) run by worker/engine/exported.ProgramModule, whose parameters carry the program's own
    names; ``init`` "default" re-draws PyTorch-default weights in call order (as an mlp or cnn
    declared the same way starts), "uploaded" starts every draw from the file's weights."""
    from worker.engine.exported import exported_task
    from worker.model_loader import load_program

    program, weights = load_program(spec.model.model, get_settings())
    return exported_task(**common, program=program, weights=weights, init=spec.model.init)


def build_tasks(job: JobCreate, dev: torch.device | None = None) -> list[Any]:
    """Engine tasks from a validated job body (the API has checked shapes and labels): an
    ``engine.Task`` for an ``mlp`` model, a ``ModuleTask`` (worker/engine/modules.py) for a ``cnn``
    or an ``exported`` program."""
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
            xt, yt, xv, yv = load_dataset_task_data(data, get_settings())
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
            tasks.append(_exported_task(spec, common))
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
        method=job.meta.method,
        truncation=job.meta.truncation,
        memory_budget_mb=get_settings().max_unroll_bytes / 2**20,
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
    best = engine.best_settings(state)
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


class _Heartbeat:
    """Refreshes the claim from a thread while a chunk computes."""

    def __init__(self, job_id: str, owner: str, every: float) -> None:
        self.job_id, self.owner, self.every = job_id, owner, every
        self.lost = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def _run(self) -> None:
        while not self._done.wait(self.every):
            try:
                with session_scope() as db:
                    if not lifecycle.heartbeat(db, job_id=self.job_id, owner=self.owner):
                        self.lost = True
                        return
            except Exception:  # a missed beat is not fatal; the next one may work
                log.exception("heartbeat for job %s failed", self.job_id)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


def enqueue(job_id: str, iteration: int) -> None:
    from worker.celery_app import app

    app.send_task(RUN_CHUNK, args=[job_id, iteration], queue=get_settings().queue_name)


def run_chunk(job_id: str, iteration: int | None, *, owner: str) -> str:
    """Run one chunk of a job; returns what happened (for logs and tests)."""
    settings = get_settings()
    with session_scope() as db:
        claim = lifecycle.claim_job(
            db,
            job_id=job_id,
            owner=owner,
            iteration=iteration,
            stale_after_s=settings.stale_after_seconds,
        )
        if claim is not None:
            lifecycle.set_device(db, job_id=job_id, owner=owner, device=str(device()))
    if claim is None:
        log.info("job %s: nothing to do for message at iteration %s", job_id, iteration)
        return "skipped"
    if claim.cancel_requested:
        with session_scope() as db:
            lifecycle.cancel_job(db, job_id=job_id, owner=owner)
        log.info("job %s cancelled at iteration %d", job_id, claim.iteration)
        return "cancelled"
    try:
        with _Heartbeat(job_id, owner, settings.heartbeat_seconds):
            job = JobCreate.model_validate(claim.spec)
            tasks = build_tasks(job)
            config = meta_config(job)
            state = claim.checkpoint or engine.init_state(config, job.hyperparameters.lr, job.hyperparameters.momentum)
            if claim.iteration >= claim.iterations:
                result = evaluate_settings(tasks, job, state)
                with session_scope() as db:
                    lifecycle.finish_job(db, job_id=job_id, owner=owner, result=result)
                log.info("job %s succeeded: lr=%g momentum=%g", job_id, result["lr"], result["momentum"])
                return "succeeded"
            records: list[dict] = []
            n = min(settings.chunk_iterations, claim.iterations - claim.iteration)
            state = engine.run_meta(tasks, config, state, n, on_iteration=records.append)
            if not records:
                raise engine.EngineError("the meta-optimization made no progress in a chunk")
    except (engine.EngineError, DatasetUnavailable) as exc:
        with session_scope() as db:
            lifecycle.fail_job(db, job_id=job_id, owner=owner, error=str(exc))
        log.warning("job %s failed: %s", job_id, exc)
        return "failed"
    except Exception as exc:
        log.exception("job %s: internal error", job_id)
        with session_scope() as db:
            lifecycle.fail_job(
                db,
                job_id=job_id,
                owner=owner,
                error=f"The worker hit an internal error ({type(exc).__name__}); the job cannot continue.",
            )
        return "failed"
    with session_scope() as db:
        ok = lifecycle.commit_chunk(
            db,
            job_id=job_id,
            owner=owner,
            start_iteration=claim.iteration,
            records=records,
            checkpoint=state,
        )
    if not ok:
        log.warning("job %s: claim lost during chunk at iteration %d; work discarded", job_id, claim.iteration)
        return "lost"
    enqueue(job_id, claim.iteration + len(records))
    return "committed"


def sweep_once() -> list[tuple[str, int]]:
    """Re-enqueue jobs whose worker died or whose message was lost."""
    with session_scope() as db:
        pairs = lifecycle.sweep(db, stale_after_s=get_settings().stale_after_seconds)
    for job_id, iteration in pairs:
        log.warning("job %s: re-enqueued at iteration %d (stale or lost)", job_id, iteration)
        enqueue(job_id, iteration)
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
