"""The Celery app of the worker: gradtune's long-job profile on top of the shared broker config.

Importing this module touches neither torch nor CUDA; the device is chosen when a
worker process starts (see worker.runner.configure_process).
"""

from __future__ import annotations

from service.queue import make_celery
from service.settings import get_settings

settings = get_settings()
app = make_celery(settings)
app.conf.update(
    # A chunk is acknowledged only after it ran, and a worker takes one message at a time.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    # Chunks are short; a chunk that runs this long is stuck.
    task_soft_time_limit=1800,
    task_time_limit=1900,
    broker_transport_options={
        **settings.broker_transport_options(),
        # Redis redelivers an unacknowledged message after this: longer than the longest chunk (see
        # Settings.visibility_timeout_seconds); a redelivered message cannot take a live lease anyway.
        **(
            {"visibility_timeout": settings.visibility_timeout_seconds()}
            if settings.resolved_broker_url().startswith("redis")
            else {}
        ),
    },
    worker_hijack_root_logger=False,
    # Remote control needs fanout, which the server-less filesystem broker lacks.
    worker_enable_remote_control=settings.resolved_broker_url().startswith(("redis", "amqp")),
    include=["worker.tasks"],
)
