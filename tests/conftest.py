import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Skip GPU and real-weight tests cleanly where the machine cannot run them."""
    no_gpu = pytest.mark.skip(reason="needs a CUDA device")
    no_weights = pytest.mark.skip(reason="needs the official weights: set CASCADE_WEIGHTS to their folder")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "weights" in item.keywords and not os.environ.get("CASCADE_WEIGHTS"):
            item.add_marker(no_weights)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
