"""Builtin datasets: the small scikit-learn datasets that ship with the package (no download).

Arrays come back exactly as scikit-learn stores them (no scaling, no centring); only the dtype is
fixed (float32 features, int64 labels or float32 regression targets of shape (N, 1)), and the split
into training and validation rows is a seeded permutation:

    perm = numpy.random.default_rng(seed).permutation(n)
    n_val = max(1, round(n * val_fraction)); val = perm[:n_val]; train = perm[n_val:]
"""

from __future__ import annotations

import numpy as np

BUILTIN_INFO: dict[str, dict] = {
    "digits": {"n": 1797, "features": 64, "classes": 10, "task": "classification"},
    "breast_cancer": {"n": 569, "features": 30, "classes": 2, "task": "classification"},
    "wine": {"n": 178, "features": 13, "classes": 3, "task": "classification"},
    "iris": {"n": 150, "features": 4, "classes": 3, "task": "classification"},
    "diabetes": {"n": 442, "features": 10, "classes": None, "task": "regression"},
}


def _load_raw(name: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn import datasets as skd

    loaders = {
        "digits": skd.load_digits,
        "breast_cancer": skd.load_breast_cancer,
        "wine": skd.load_wine,
        "iris": skd.load_iris,
        "diabetes": skd.load_diabetes,
    }
    bunch = loaders[name]()
    return bunch.data, bunch.target


def load_builtin(
    name: str, val_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (x_train, y_train, x_val, y_val) for the builtin dataset ``name``."""
    if name not in BUILTIN_INFO:
        raise ValueError(f"Unknown builtin dataset {name!r}; choose one of {sorted(BUILTIN_INFO)}.")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError("val_fraction must be strictly between 0 and 1.")
    info = BUILTIN_INFO[name]
    data, target = _load_raw(name)
    x = np.ascontiguousarray(data, dtype=np.float32)
    if info["task"] == "classification":
        y = np.ascontiguousarray(target, dtype=np.int64)
    else:
        y = np.ascontiguousarray(target, dtype=np.float32).reshape(-1, 1)
    n = x.shape[0]
    perm = np.random.default_rng(seed).permutation(n)
    n_val = max(1, round(n * val_fraction))
    if n_val >= n:
        raise ValueError("val_fraction leaves no training rows.")
    val, train = perm[:n_val], perm[n_val:]
    return x[train], y[train], x[val], y[val]
