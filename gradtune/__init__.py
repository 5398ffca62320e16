"""gradtune: hyperparameter auto-tuning for PyTorch by hypergradients.

``import gradtune.spec`` (the shared, standard-library-only facts) must not import the client's
HTTP stack, so the client's names are loaded on first use (PEP 562).
"""

from typing import Any

__version__ = "0.1.0"

__all__ = ["Client", "GradtuneError", "TunedSettings", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("Client", "GradtuneError", "TunedSettings"):
        from gradtune import client

        return getattr(client, name)
    raise AttributeError(f"module 'gradtune' has no attribute {name!r}")
