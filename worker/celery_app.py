"""The Celery app of the worker: gradtune's long-job profile on top of the shared broker config.

Importing this module touches neither torch nor CUDA; the device is chosen when a
worker process starts (see worker.device.configure_process). A ready worker registers itself in the
workers table and keeps its row fresh from a thread (service/workers.py), which GET /v1/workers and
/readyz read.
"""

from __future__ import annotations

import gc
from typing import Any

from celery import bootsteps, signals

from service.queue import make_celery
from service.settings import get_settings
from worker import chunk_metrics

settings = get_settings()
# Before anything imports prometheus_client: this process's chunk histogram goes to files the API reads.
chunk_metrics.prepare(settings)
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


# ---------------------------------------------------------------- broker reconnection


class BrokerReconnected(bootsteps.StartStopStep):
    """A consumer step Celery starts again each time the broker connection comes back: after the
    first start, the broker may have restarted and lost the chunk messages it held (Redis without
    persistence), so the jobs' outstanding messages are forgotten and the sweep resends them
    (service.lifecycle.forget_messages; the studies' update messages too:
    service.studies.forget_update_messages) instead of waiting for the visibility timeout."""

    requires = {"celery.worker.consumer.connection:Connection"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.starts = 0

    def start(self, parent: Any) -> None:
        self.starts += 1
        if self.starts == 1:
            return
        import logging

        from service import lifecycle, studies
        from service.db.session import session_scope

        log = logging.getLogger("gradtune.worker")
        try:
            with session_scope() as db:
                n = lifecycle.forget_messages(db)
                u = studies.forget_update_messages(db)
            log.warning(
                "broker connection back: %d outstanding chunk message(s) and %d study update message(s) "
                "will be resent by the sweep",
                n,
                u,
            )
        except Exception:  # the database may be down too; the visibility timeout still applies
            log.exception("broker connection back, but the outstanding messages could not be forgotten")


app.steps["consumer"].add(BrokerReconnected)


# ---------------------------------------------------------------- log lines


@signals.setup_logging.connect
def _setup_logging(loglevel: Any = None, **_kwargs: Any) -> None:
    """Celery's lines and ours in GRADTUNE_LOG_FORMAT (service/logs.py), at the worker's --loglevel;
    a receiver here makes Celery add no handler of its own."""
    from service.logs import configure_logging

    configure_logging(settings, level=loglevel or None)


# ---------------------------------------------------------------- registration (GET /v1/workers)


def _device_label() -> str:
    """This worker's device, e.g. "cpu" or "cuda:0 (NVIDIA H200)" (chosen by worker.device)."""
    from worker.device import device

    dev = device()
    if dev.type != "cuda":
        return str(dev)
    import torch

    index = dev.index if dev.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"[:64]


def _queues(consumer: Any) -> list[str]:
    try:
        names = sorted(consumer.app.amqp.queues.consume_from)
    except Exception:
        names = []
    return names or [settings.queue_name]


@signals.celeryd_after_setup.connect
def _device_queue(sender: Any = None, instance: Any = None, **_kwargs: Any) -> None:
    """Choose this worker's device now (worker.device: GRADTUNE_DEVICE, ``gradtune worker --device``)
    and consume its device's queue beside the shared one the command line names (gradtune/spec/
    devices.py): a GPU worker takes ``cuda`` and ``auto`` jobs, a CPU worker ``cpu`` and ``auto`` ones.
    A worker asked for CUDA on a machine without it stops here with the reason, before taking a job."""
    from gradtune.spec.devices import job_queue
    from worker.device import configure_or_exit

    dev = configure_or_exit()
    instance.app.amqp.queues.select_add(job_queue(settings.queue_name, dev.type))


@signals.worker_ready.connect
def _register(sender: Any = None, **_kwargs: Any) -> None:
    from service import workers

    workers.start_registration(device=_device_label(), queues=_queues(sender), every=settings.heartbeat_seconds)


@signals.task_postrun.connect
def _chunk_done(**_kwargs: Any) -> None:
    from service import workers

    workers.record_current_job(None)


@signals.worker_shutdown.connect
def _deregister(**_kwargs: Any) -> None:
    from service import workers

    workers.stop_registration()
    # Nothing is left to do but exit: skip the interpreter's final collection of every object still
    # alive (torch's among them), which took seconds of a stop's budget (gradtune serve SIGKILLs a
    # worker 5 s after SIGTERM). Measured: SIGTERM to exit of an idle worker after a job, 5.5-7 s -> 3.8 s.
    gc.freeze()
