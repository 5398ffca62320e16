"""worker.datasets: builtin datasets as scikit-learn ships them, split by a seeded permutation."""

import numpy as np
import pytest
from sklearn import datasets as skd

from worker.datasets import BUILTIN_INFO, load_builtin

LOADERS = {
    "digits": skd.load_digits,
    "breast_cancer": skd.load_breast_cancer,
    "wine": skd.load_wine,
    "iris": skd.load_iris,
    "diabetes": skd.load_diabetes,
}


def test_builtin_info_matches_sklearn():
    assert set(BUILTIN_INFO) == set(LOADERS)
    for name, loader in LOADERS.items():
        bunch = loader()
        info = BUILTIN_INFO[name]
        assert info["n"] == bunch.data.shape[0]
        assert info["features"] == bunch.data.shape[1]
        if info["task"] == "classification":
            assert info["classes"] == len(np.unique(bunch.target))
            assert np.array_equal(np.unique(bunch.target), np.arange(info["classes"]))
        else:
            assert info["task"] == "regression" and info["classes"] is None


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_load_builtin_split_dtypes_and_no_preprocessing(name):
    bunch = LOADERS[name]()
    x_tr, y_tr, x_va, y_va = load_builtin(name, val_fraction=0.2, seed=3)
    n = bunch.data.shape[0]
    perm = np.random.default_rng(3).permutation(n)
    n_val = max(1, round(n * 0.2))
    assert x_va.shape == (n_val, bunch.data.shape[1]) and x_tr.shape == (n - n_val, bunch.data.shape[1])
    assert x_tr.dtype == np.float32 and x_va.dtype == np.float32
    np.testing.assert_array_equal(x_va, bunch.data[perm[:n_val]].astype(np.float32))
    np.testing.assert_array_equal(x_tr, bunch.data[perm[n_val:]].astype(np.float32))
    if BUILTIN_INFO[name]["task"] == "classification":
        assert y_tr.dtype == np.int64 and y_tr.ndim == 1
        np.testing.assert_array_equal(y_va, bunch.target[perm[:n_val]])
    else:
        assert y_tr.dtype == np.float32 and y_tr.shape == (n - n_val, 1)
        np.testing.assert_array_equal(y_va[:, 0], bunch.target[perm[:n_val]].astype(np.float32))


def test_split_is_reproducible_and_depends_on_seed():
    a = load_builtin("iris", seed=0)
    b = load_builtin("iris", seed=0)
    c = load_builtin("iris", seed=1)
    assert all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))
    assert not np.array_equal(a[2], c[2])
    assert load_builtin("iris", val_fraction=0.001)[2].shape[0] == 1  # at least one validation row


def test_unknown_dataset_is_refused():
    with pytest.raises(ValueError, match="Unknown builtin dataset"):
        load_builtin("mnist")
