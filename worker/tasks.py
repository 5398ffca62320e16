"""Celery tasks: thin wrappers; the work happens in worker.runner."""

from __future__ import annotations

from celery import signals

from service.queue import RUN_CHUNK, STUDY_UPDATE
from worker import runner, study_runner
from worker.celery_app import app
from worker.device import configure_or_exit, configure_process


@app.task(name=RUN_CHUNK, bind=True)
def run_chunk(self, job_id: str, iteration: int | None = None) -> None:
    # The task id only names the delivery in logs: the lease is a fresh token per claim.
    runner.run_chunk(job_id, iteration, owner=self.request.id or f"local-{job_id}-{iteration}")


@app.task(name=STUDY_UPDATE)
def study_update(study_id: str, job_id: str) -> None:
    study_runner.update_study(study_id, job_id, runner.build_tasks)


@signals.worker_process_init.connect
def _child_start(**_kwargs) -> None:
    # A prefork child (or the solo pool's one process): choose its own device (CUDA never crosses a
    # fork); one it cannot have stops it with the reason.
    configure_or_exit()


@signals.worker_ready.connect
def _start(sender=None, **_kwargs) -> None:
    configure_process()
    runner.start_sweeper()


@signals.worker_shutdown.connect
def _stop(sender=None, **_kwargs) -> None:
    runner.stop_sweeper()
