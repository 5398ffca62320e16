"""This worker process's device and torch threads, chosen once when the process starts (never at
import: no CUDA is touched before a worker asks)."""

from __future__ import annotations

import logging

import torch

from service.settings import get_settings

log = logging.getLogger("gradtune.worker")

_device: torch.device | None = None


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
