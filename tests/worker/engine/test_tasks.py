"""build_model and batch_indices: names, default init, determinism, epochs and drop_last."""

import math

import pytest
import torch

from tests.helpers.tasks import synthetic_task
from worker.engine import EngineError, batch_indices, build_model


def test_build_model_layout_and_names():
    task = synthetic_task(hidden=(7, 6), activation="gelu", features=5, out=3)
    model = build_model(task)
    assert isinstance(model, torch.nn.Sequential)
    names = [n for n, _ in model.named_parameters()]
    assert names == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    assert [type(m).__name__ for m in model] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    assert model[0].weight.shape == (7, 5) and model[4].weight.shape == (3, 6)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    linear = build_model(synthetic_task(hidden=()))
    assert [n for n, _ in linear.named_parameters()] == ["0.weight", "0.bias"]


def test_build_model_default_init_is_kaiming_uniform_bounds():
    task = synthetic_task(hidden=(200,), features=50, out=3)
    w, b = build_model(task)[0].weight, build_model(task)[0].bias
    bound = 1.0 / math.sqrt(50)  # kaiming_uniform(a=sqrt(5)) and the bias both give 1/sqrt(fan_in)
    assert w.abs().max() <= bound and b.abs().max() <= bound
    assert w.abs().max() > 0.95 * bound  # uniform over the whole range, not something narrower


def test_build_model_deterministic_and_leaves_global_rng_alone():
    task = synthetic_task()
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = build_model(task, draw=0).state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)
    b = build_model(task, draw=0).state_dict()
    c = build_model(task, draw=1).state_dict()
    other_seed = synthetic_task(seed=5)
    d = build_model(other_seed, draw=0).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["0.weight"], c["0.weight"])
    assert not torch.equal(a["0.weight"], d["0.weight"])
    # float32 and float64 tasks start from the same weights up to rounding
    e = build_model(synthetic_task(dtype=torch.float32)).state_dict()
    assert e["0.weight"].dtype == torch.float32
    torch.testing.assert_close(e["0.weight"].double(), a["0.weight"], rtol=0, atol=1e-7)


def test_batch_indices_epochs_reshuffled_and_last_partial_batch_dropped():
    task = synthetic_task(n=50, batch=16, steps=10)  # 3 full batches per epoch, 2 rows dropped
    idx = batch_indices(task)
    assert idx.shape == (10, 16) and idx.dtype == torch.int64
    epochs = [idx[i : i + 3].reshape(-1) for i in range(0, 9, 3)]
    for rows in epochs:
        assert rows.unique().numel() == 48  # no row twice within an epoch
        assert rows.min() >= 0 and rows.max() < 50
    assert not torch.equal(epochs[0], epochs[1])  # reshuffled each epoch
    assert torch.equal(idx, batch_indices(task))  # deterministic
    assert not torch.equal(idx, batch_indices(task, draw=1))


def test_batch_indices_matches_randperm_with_seeded_generator_semantics():
    # Same semantics as DataLoader(shuffle=True, drop_last=True): each epoch is a fresh permutation
    # cut into full batches. Check that consecutive epochs come from one generator stream.
    task = synthetic_task(n=20, batch=20, steps=3)  # one batch per epoch: each row of idx is a permutation
    idx = batch_indices(task)
    for row in idx:
        assert sorted(row.tolist()) == list(range(20))
    assert len({tuple(r.tolist()) for r in idx}) == 3


def test_batch_size_larger_than_training_set_is_refused():
    task = synthetic_task(n=10, batch=16)
    with pytest.raises(EngineError, match="batch size"):
        batch_indices(task)
