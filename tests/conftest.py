import os

import pytest
import torch

# two CPU cores on CI: keep intra-op threads bounded so parallel pieces do not thrash
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is available here")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
