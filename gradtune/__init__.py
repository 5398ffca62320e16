"""gradtune: hyperparameter auto-tuning for PyTorch by hypergradients."""

__version__ = "0.1.0"

from gradtune.client import Client, GradtuneError, TunedSettings  # noqa: E402

__all__ = ["Client", "GradtuneError", "TunedSettings", "__version__"]
