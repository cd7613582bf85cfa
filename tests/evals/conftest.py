import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def one_torch_thread():
    """Tiny tensors gain nothing from intra-op threads, and on shared cores idle-waiting
    threads make the tests several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
