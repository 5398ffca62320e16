"""Fixtures of the worker's tests (tests/worker and tests/worker/engine)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """2-core machines: one intra-op thread is fastest (small convolutions are erratic with several)
    and keeps the suite's timing stable."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fresh_program_cache():
    """The worker's cache of loaded .pt2 programs, empty before and after the test."""
    from worker import model_loader

    model_loader.clear_cache()
    yield
    model_loader.clear_cache()
