import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """2-core machines: one intra-op thread is fastest and keeps the suite's timing stable."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
