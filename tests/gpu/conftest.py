import pytest
import torch


def pytest_collection_modifyitems(config, items):
    # Hooks see every collected item: skip only the GPU tests, and only without a GPU.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device: pytest -m gpu tests/gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
