"""The weights digest recorded in manifests: content-based, cached per file, the same for every layout path."""

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cascade import save_stage, tiny_models
from cascade.weights import WeightsError
from workers.models import file_sha256, model_digest


def write_family(folder):
    tiny = tiny_models()
    tiny.text_encoder.model.save_pretrained(folder / "text_encoder")
    save_stage(tiny.stage_c, folder / "stage_c.safetensors")
    save_stage(tiny.stage_b, folder / "stage_b.safetensors")
    save_stage(tiny.stage_a, folder / "stage_a.safetensors")
    return folder


def test_digest_follows_the_weights_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = write_family(tmp_path / "w")
    hashed = []
    first = model_digest(str(folder), False, "fp32", progress=hashed.append)
    assert len(first) == 16 and len(hashed) >= 4
    hashed.clear()
    assert model_digest(str(folder), False, "fp32", progress=hashed.append) == first and hashed == []  # cached
    tiny = tiny_models()
    with torch.no_grad():
        tiny.stage_b.clf[1].bias.add_(1.0)
    save_stage(tiny.stage_b, folder / "stage_b.safetensors")  # new content: new size or mtime, new hash
    assert model_digest(str(folder), False, "fp32") != first
    # Content-based: the file's own sha256 (not its name, size or time), here with nothing cached.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    path = folder / "stage_a.safetensors"
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert model_digest("tiny", False, "auto") != model_digest("random-big", False, "auto")  # a seeded model: its name


def test_the_built_in_digests_need_no_model_build(tmp_path):
    """The driver computes the digest before every job: the demo's comes from its shipped files (the same as naming
    its folder), a seeded model's from its name, and neither builds a model or imports transformers (seconds)."""
    script = (
        "import sys; from workers.models import model_digest; from cascade.geometry import DEMO_FOLDER;"
        "print(model_digest('demo', False, 'auto'), model_digest(str(DEMO_FOLDER), False, 'auto'),"
        "model_digest('tiny', False, 'auto'), model_digest('random-big', False, 'auto'), 'transformers' in sys.modules)"
    )
    env = {"XDG_CACHE_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=root, timeout=120
    )
    assert done.returncode == 0, done.stderr
    demo, demo_folder, tiny, big, imported = done.stdout.split()
    assert demo == demo_folder and len({demo, tiny, big}) == 3 and imported == "False"


def test_with_dtype_auto_the_digest_and_the_check_follow_the_files_each_pool_loads(tmp_path, monkeypatch):
    """A folder with both precisions (as Stability's repository has): dtype auto reads the bf16 files on a GPU and
    the fp32 ones on a CPU, so the digest is taken over what each pool's actors will load, and the check before Ray
    starts looks at both files, either of which may be read."""
    from jobs.config import from_mapping
    from jobs.generate import check_model, job_digest
    from workers.models import pool_dtype, weight_files

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = write_family(tmp_path / "w")
    tiny = tiny_models(dtype=torch.bfloat16)
    save_stage(tiny.stage_c, folder / "stage_c_bf16.safetensors")
    save_stage(tiny.stage_b, folder / "stage_b_bf16.safetensors")
    assert (pool_dtype("auto", 0), pool_dtype("auto", 0.5), pool_dtype("fp16", 0)) == ("fp32", "bf16", "fp16")
    names = lambda *a: [p.name for p in weight_files(str(folder), False, *a)][:3]  # noqa: E731
    assert names("fp32") == ["stage_c.safetensors", "stage_b.safetensors", "stage_a.safetensors"]
    assert names("bf16", "fp32") == ["stage_c_bf16.safetensors", "stage_b.safetensors", "stage_a.safetensors"]

    config = from_mapping({"prompts": "unused", "out": "unused", "model": str(folder), "dtype": "auto"})
    on_cpu, on_gpus = job_digest(config, 0, 0), job_digest(config, 1, 1)
    assert on_cpu == model_digest(str(folder), False, "fp32") != on_gpus == model_digest(str(folder), False, "bf16")
    assert len({on_cpu, on_gpus, job_digest(config, 1, 0)}) == 3  # Stage C on a GPU, Stage B/A on the CPU

    check_model(config)
    (folder / "stage_b.safetensors").write_bytes(b"not safetensors")  # the file CPU actors would read
    with pytest.raises(WeightsError, match="stage_b.safetensors"):
        check_model(config)
