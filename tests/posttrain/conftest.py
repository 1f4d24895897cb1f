import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Post-training tests run many tiny ops, which a second thread only slows on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
