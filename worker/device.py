"""This worker process's device and torch threads, chosen once when the process starts (never at
import: no CUDA is touched before a worker asks).

``GRADTUNE_DEVICE`` (``gradtune worker --device``): ``cuda`` (refused, with the reason, on a machine
without CUDA), ``cpu``, or ``auto`` (CUDA when available). The device decides the worker's queue beside
the shared one (gradtune/spec/devices.py; worker/celery_app.py adds it when the worker starts).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from gradtune.spec.devices import JOB_DEVICES
from service.settings import get_settings

log = logging.getLogger("gradtune.worker")

_device: torch.device | None = None


class DeviceUnavailable(RuntimeError):
    """The device asked for cannot be used on this machine (the message says why and what to do)."""


def resolve(want: str, cuda_available: Callable[[], bool] | None = None) -> str:
    """``cpu`` or ``cuda`` for a worker started with device ``want`` (auto, cpu or cuda)."""
    if want not in JOB_DEVICES:
        raise DeviceUnavailable(f"device must be one of {', '.join(JOB_DEVICES)}, not {want!r}")
    available = (cuda_available or torch.cuda.is_available)()
    if want == "cuda" and not available:
        raise DeviceUnavailable(
            f"device cuda: CUDA is not available on this machine (torch {torch.__version__}"
            f"{'' if torch.version.cuda else ', a build without CUDA'}: torch.cuda.is_available() is false). "
            "Start a CPU worker instead (gradtune worker --device cpu), or run this one on a machine with an "
            "NVIDIA GPU and a CUDA build of torch."
        )
    if want == "auto":
        return "cuda" if available else "cpu"
    return want


def configure_process() -> torch.device:
    """Pick this process's device and thread count; called when a worker process starts. Raises
    DeviceUnavailable for GRADTUNE_DEVICE=cuda on a machine without CUDA."""
    global _device
    settings = get_settings()
    torch.set_num_threads(max(1, settings.torch_threads))
    _device = torch.device(resolve(settings.device))
    log.info("worker device %s, %d torch threads", _device, torch.get_num_threads())
    return _device


def configure_or_exit() -> torch.device:
    """``configure_process`` for a starting worker: a device it cannot have stops it (exit 1) with the
    reason in one log line, before it takes a job."""
    try:
        return configure_process()
    except DeviceUnavailable as exc:
        log.critical("cannot start: %s", exc)
        raise SystemExit(1) from None


def device() -> torch.device:
    return _device if _device is not None else configure_process()
