"""gradtune: hyperparameter auto-tuning for PyTorch by hypergradients."""

__version__ = "0.1.0"
