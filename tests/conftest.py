import os
import tempfile

import pytest
import torch

# Ray in tests: no token auth (a plain ray.init() turns it on for later runs), no usage reporting, and a private,
# short temp dir (its socket paths must stay under 108 bytes). Subprocesses (ray start, ray job submit) inherit these.
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="rt", dir="/tmp"))


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


@pytest.fixture(scope="session")
def local_ray(seaweed):
    """An in-process local Ray with two fake GPUs: actors asking for one GPU get scheduled and see
    CUDA_VISIBLE_DEVICES, while torch finds no CUDA and runs on the CPU. One for the whole session: starting and
    stopping a Ray costs about 10 s. Its workers get the standard AWS variables of the test S3 server (as a user's
    cluster nodes have their own credentials), so a job on this Ray can read and write the server's buckets; this
    process does not (the `s3_bucket` fixture sets them per test). The server starts first, so the ports it was
    given are held before Ray picks its own."""
    from unittest import mock

    import ray

    from tests.servers import s3_env

    with mock.patch.dict(os.environ, s3_env()):  # the Ray processes started now inherit them; this one keeps its own
        ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, _temp_dir=os.environ["RAY_TMPDIR"])
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def _two_nodes():
    from tests.servers import TwoNodeCluster

    cluster = TwoNodeCluster()
    yield cluster
    cluster.stop()


@pytest.fixture
def two_node_cluster(_two_nodes):
    """The module's two-node cluster, whole: a node a test killed is started again before the next test needs it
    (not after the last one)."""
    if "stage_b" not in _two_nodes.nodes:
        _two_nodes.add_node()
    return _two_nodes
