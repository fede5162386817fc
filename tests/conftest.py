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


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    """A real S3 server for the whole session; each test makes its own bucket."""
    from tests.servers import SeaweedFS

    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(seaweed, monkeypatch, request):
    """A fresh bucket, and the standard AWS variables pointing at the test server for this test."""
    from tests.servers import s3_env

    for name, value in s3_env().items():
        monkeypatch.setenv(name, value)
    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50].strip("-")
    seaweed.client().create_bucket(Bucket=name)
    return name
