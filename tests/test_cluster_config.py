"""cluster.yaml parses, and its node types and resources agree with the job settings that go with it."""

import re
from pathlib import Path

import yaml

from jobs.config import from_mapping, load_yaml

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_is_a_valid_launcher_config():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(yaml.safe_load((ROOT / "cluster.yaml").read_text())))  # Ray's own schema check


def test_cluster_yaml_and_job_settings_agree():
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types and types[cluster["head_node_type"]]["max_workers"] == 0
    urls = {"prompts": "s3://bucket/p", "out": "s3://bucket/o"}
    job = from_mapping({**urls, **load_yaml(ROOT / "examples/cluster-job.yaml")})
    for pool in (job.prior_pool, job.decoder_pool):
        assert len(pool.resources) == 1, "each pool pins itself to one node type"
        ((resource, per_actor),) = pool.resources.items()
        carriers = [t for t in types.values() if resource in t.get("resources", {})]
        assert len(carriers) == 1, f"exactly one node type carries {resource}"
        node = carriers[0]
        slots = node["resources"][resource] // per_actor * node["max_workers"]
        assert pool.actors <= slots, f"{pool.actors} actors need more {resource} than the cluster can hold ({slots})"
        assert pool.gpus * node["resources"][resource] / per_actor <= 8  # one actor per GPU of a p5.48xlarge
    # The two pools land on different node types.
    assert job.prior_pool.resources.keys() != job.decoder_pool.resources.keys()
    # The dashboard and job server stay on the head's loopback; setup installs the project.
    assert all("--dashboard-host=127.0.0.1" in c for c in cluster["head_start_ray_commands"] if "--head" in c)
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import pytest

        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (install,) = [c for c in cluster["setup_commands"] if "pip install -e" in c and "pipeline" in c]
    # Every node installs the same Ray and torch, whenever it is launched: exact pins, within the project's ranges.
    from packaging.requirements import Requirement

    required = {r.name: r for r in map(Requirement, project["project"]["dependencies"])}
    required.update((r.name, r) for r in map(Requirement, project["project"]["optional-dependencies"]["pipeline"]))
    pins = {r.name: r for r in map(Requirement, re.findall(r"'([a-z]+(?:\[[a-z,]+\])?==[0-9.]+)'", install))}
    assert set(pins) == {"ray", "torch"}
    for name, pin in pins.items():
        (exact,) = pin.specifier
        assert exact.operator == "==" and required[name].specifier.contains(exact.version), (name, exact)
        assert pin.extras == required[name].extras
    # Only what installing the project needs is mounted: ray up hashes every file of a mounted folder, ignored ones
    # included (.venv, a local weights/, outputs), and re-runs setup on every node when the hash changes.
    packages = [p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]]
    needed = {"pyproject.toml", project["project"]["readme"], *packages}
    mounts = cluster["file_mounts"]
    assert mounts == {f"~/cascade-batch/{name}": f"./{name}" for name in needed}
    assert all((ROOT / local).exists() for local in mounts.values())
    # The weights reach every node (the head too: the driver checks and hashes them) at the job's model path, and a
    # local weights/ folder is never shipped with the project (only the package folders are mounted, above).
    assert any(job.model in c and "aws s3 sync" in c for c in cluster["setup_commands"])
    # The head's instance profile is its own (it launches the GPU nodes: EC2 rights the workers do not get).
    profiles = {name: t["node_config"]["IamInstanceProfile"]["Name"] for name, t in types.items()}
    head = profiles.pop(cluster["head_node_type"])
    assert head not in profiles.values()


def test_a_weights_folder_missing_on_the_driver_says_the_head_needs_it_on_a_cluster(monkeypatch):
    import pytest

    from cascade.weights import WeightsError
    from jobs.generate import check_model

    config = from_mapping({"prompts": "p", "out": "o", "model": "/mnt/weights/none"})
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(WeightsError, match=r"nor a weights folder$"):
        check_model(config)
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")  # as under ray job submit
    with pytest.raises(WeightsError, match="driver \\(on the head node\\) reads the weights folder too"):
        check_model(config)


def test_a_mistyped_built_in_model_gets_the_nearest_name():
    import pytest

    from cascade.weights import WeightsError
    from jobs.generate import check_model

    with pytest.raises(WeightsError, match=r"nor a weights folder \(did you mean 'demo'\?\)$"):
        check_model(from_mapping({"prompts": "p", "out": "o", "model": "demoo"}))
