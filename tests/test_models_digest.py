"""The weights digest recorded in manifests: content-based, cached per file, the same for every layout path."""

import subprocess
import sys
from pathlib import Path

import torch

from cascade import save_stage, tiny_models
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
    assert file_sha256(folder / "stage_a.safetensors") == file_sha256(folder / "stage_a.safetensors")
    assert model_digest("tiny", False, "auto") == model_digest("tiny", False, "auto")


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
