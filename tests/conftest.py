
import pytest
import torch

# one intra-op thread: tests run beside notebook kernels and torchrun workers on two cores, where a
# second thread per process oversubscribes the CPU and makes small models many times slower
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is available here")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
