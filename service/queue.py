"""Celery producer: the API names worker tasks by string and never imports the worker."""

from __future__ import annotations

from celery import Celery

from gradtune.spec.devices import job_queue
from service.settings import Settings

RUN_CHUNK = "gradtune.run_chunk"
# After a study's job succeeded: learn the study's settings again (worker/study_runner.py).
STUDY_UPDATE = "gradtune.study_update"


def make_celery(settings: Settings) -> Celery:
    """A Celery app configured for gradtune's broker; the worker builds on the same function."""
    settings.ensure_dirs()
    app = Celery("gradtune", broker=settings.resolved_broker_url())
    app.conf.update(
        broker_transport_options=settings.broker_transport_options(),
        broker_connection_retry_on_startup=True,
        task_default_queue=settings.queue_name,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
    )
    return app


def send_chunk(app: Celery, settings: Settings, job_id: str, iteration: int, device: str | None) -> None:
    """The one way a chunk message is sent (the API's first, the worker's next ones and re-sends)."""
    app.send_task(RUN_CHUNK, args=[job_id, iteration], queue=job_queue(settings.queue_name, device))


class Producer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = make_celery(settings)

    def enqueue_chunk(self, job_id: str, iteration: int = 0, *, device: str | None = None) -> None:
        """Ask a worker to run the job's next chunk, starting at ``iteration``, on the queue of the
        device the job asked for (gradtune/spec/devices.py; None: auto, the base queue).

        A message whose iteration no longer matches the job is dropped by the
        worker, so duplicates (redelivery, the sweep) are harmless.
        """
        send_chunk(self.app, self.settings, job_id, iteration, device)

    def ping(self, timeout: float = 2.0) -> None:
        """Raise if the broker cannot be reached."""
        with self.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout)
