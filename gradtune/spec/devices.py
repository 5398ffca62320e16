"""Where a job's chunks run: the device a job asks for, and the broker queue that follows from it.

One base queue name (``GRADTUNE_QUEUE_NAME``, default ``gradtune``) gives three queues:

* ``<base>``: the shared queue of ``auto`` jobs. Every worker consumes it, whatever its device, so
  an ``auto`` chunk goes to whichever live worker is free first and a job is never stranded for
  want of a GPU.
* ``<base>.cpu``: ``cpu`` jobs; only CPU workers consume it.
* ``<base>.cuda``: ``cuda`` jobs; only GPU workers (``gradtune worker --device cuda``) consume it.
  With no live GPU worker such a job stays queued, and GET /v1/jobs/{id} says so (``waiting``).

A worker on device ``d`` (``cpu`` or ``cuda``) consumes ``<base>`` and ``<base>.d``. Every chunk
message of a job (the first, each next one, the sweep's re-sends) goes to the job's queue.
"""

from __future__ import annotations

# What a job may ask for (JobCreate.device) and what a worker may be started with (GRADTUNE_DEVICE).
JOB_DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
# What a running worker is on (``auto`` resolved to one of these when it starts).
WORKER_DEVICES: tuple[str, ...] = ("cpu", "cuda")
DEFAULT_DEVICE = "auto"


def job_queue(base: str, device: str | None) -> str:
    """The queue of a job asking for ``device`` (None, from a job stored before devices: auto)."""
    device = device or DEFAULT_DEVICE
    if device not in JOB_DEVICES:
        raise ValueError(f"device must be one of {', '.join(JOB_DEVICES)}, not {device!r}")
    return base if device == DEFAULT_DEVICE else f"{base}.{device}"


def worker_queues(base: str, device: str) -> list[str]:
    """The queues a worker on ``device`` (cpu or cuda) consumes: the shared one and its device's."""
    if device not in WORKER_DEVICES:
        raise ValueError(f"a worker's device must be one of {', '.join(WORKER_DEVICES)}, not {device!r}")
    return [base, job_queue(base, device)]


def waiting_message(device: str | None, queue: str) -> str:
    """What a job says while no live worker consumes its queue."""
    device = device or DEFAULT_DEVICE
    if device == "cuda":
        return (
            f"waiting for a GPU worker: no live worker takes cuda jobs (queue {queue}); "
            "start one with `gradtune worker --device cuda` on a machine with CUDA"
        )
    if device == "cpu":
        return (
            f"waiting for a CPU worker: no live worker takes cpu jobs (queue {queue}); "
            "start one with `gradtune worker --device cpu`"
        )
    return f"waiting for a worker: none is live (queue {queue}); start one with `gradtune worker` or `gradtune serve`"
