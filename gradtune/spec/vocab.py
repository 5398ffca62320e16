"""Vocabularies shared by the API (validation, schemas, database), the engine and the client."""

from __future__ import annotations

import enum
import re
from typing import Any

ACTIVATIONS: tuple[str, ...] = ("tanh", "relu", "sigmoid", "gelu")
LOSSES: tuple[str, ...] = ("cross_entropy", "mse")
# the layer types of the declarative ``cnn`` model kind, in the job body's spelling
CNN_LAYER_TYPES: tuple[str, ...] = ("conv2d", "relu", "tanh", "maxpool", "avgpool", "flatten", "linear")


class JobStatus(str, enum.Enum):
    """A job's status. queued -> running -> one of the terminal three (or queued -> cancelled)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})

STATUSES: tuple[str, ...] = tuple(s.value for s in JobStatus)
TERMINAL_STATUSES: tuple[str, ...] = tuple(s.value for s in JobStatus if s in _TERMINAL)
ACTIVE_STATUSES: tuple[str, ...] = tuple(s.value for s in JobStatus if s not in _TERMINAL)

# Facts about the scikit-learn datasets a task can name, kept here so the API can validate a job
# without importing scikit-learn. tests/worker checks them against the real loaders.
BUILTIN_DATASETS: dict[str, dict[str, Any]] = {
    "digits": {"n": 1797, "features": 64, "classes": 10, "task": "classification"},
    "breast_cancer": {"n": 569, "features": 30, "classes": 2, "task": "classification"},
    "wine": {"n": 178, "features": 13, "classes": 3, "task": "classification"},
    "iris": {"n": 150, "features": 4, "classes": 3, "task": "classification"},
    "diabetes": {"n": 442, "features": 10, "classes": None, "task": "regression"},
}

# A tenant's name (service/keys.py stores it; `gradtune keys` checks it before reaching the database;
# the API's ?tenant= too). Match with fullmatch: "$" alone would let a final newline through.
TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
TENANT_RULE = "1-64 characters: lower-case letters, digits, '.', '_' or '-', starting with a letter or digit"
# The file the first `gradtune serve` writes its admin key to, in its data directory (service/keys.py);
# the client and CLI read it for a server on this machine (gradtune/client.py).
ADMIN_KEY_FILE = "admin.key"
DEFAULT_TENANT = "default"  # migration 0007 gave every earlier row to it; `gradtune serve` makes its admin key
