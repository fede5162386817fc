"""A whole family loads from one folder laid out as the official repos, in either layout, and generates the same
images as the in-memory model it was saved from."""

import numpy as np
import pytest
import torch

from cascade import Request, WeightsError, generate, load_models, save_stage, tiny_models
from cascade.text import save_tokenizer

SMALL = dict(width=256, height=256, prior_steps=2, decoder_steps=2)


@pytest.fixture(scope="module")
def tiny():
    return tiny_models()


def write_family(tiny, folder, layout):
    tiny.text_encoder.model.save_pretrained(folder / "text_encoder")
    save_tokenizer(folder / "tokenizer", tiny.text_encoder.tokenizer)
    if layout == "stability":
        save_stage(tiny.stage_c, folder / "stage_c.safetensors")
        save_stage(tiny.stage_b, folder / "stage_b.safetensors")
        save_stage(tiny.stage_a, folder / "stage_a.safetensors")
    else:
        save_stage(tiny.stage_c, folder / "prior", layout="diffusers")
        save_stage(tiny.stage_b, folder / "decoder", layout="diffusers")
        save_stage(tiny.stage_a, folder / "vqgan", layout="diffusers")
    return folder


@pytest.mark.parametrize("layout", ["stability", "diffusers"])
def test_family_folder_generates_like_the_original(tmp_path, tiny, layout):
    folder = write_family(tiny, tmp_path / "weights", layout)
    loaded = load_models(folder, dtype=torch.float32)
    request = [Request("a red circle on a blue background", seed=3, **SMALL)]
    expected = np.asarray(generate(tiny, request)[0].image)
    assert np.array_equal(np.asarray(generate(loaded, request)[0].image), expected)


def test_family_prefers_bf16_files_for_bf16(tmp_path, tiny):
    folder = write_family(tiny, tmp_path / "weights", "stability")
    save_stage(tiny.stage_c, folder / "stage_c_bf16.safetensors")
    save_stage(tiny.stage_b, folder / "stage_b_bf16.safetensors")
    from cascade.family import find_stage

    assert find_stage(folder, "stage_c", False, torch.bfloat16).name == "stage_c_bf16.safetensors"
    assert find_stage(folder, "stage_c", False, torch.float32).name == "stage_c.safetensors"
    models = load_models(folder, dtype=torch.bfloat16)
    assert next(models.stage_c.parameters()).dtype == torch.bfloat16
    assert next(models.stage_a.parameters()).dtype == torch.float32  # Stage A stays fp32 as in the reference


def test_official_effnet_file_loads_for_img2img(tmp_path, tiny):
    """Stability's effnet_encoder.safetensors has no metadata of ours: it is told from the semantic encoder (same
    backbone/mapper key names) by its EfficientNetV2 blocks' keys, and loads for --init-image."""
    from safetensors.torch import save_file

    from cascade.effnet import EFFNET_ENCODER, EfficientNetEncoder

    folder = write_family(tiny, tmp_path / "weights", "stability")
    effnet = EfficientNetEncoder(EFFNET_ENCODER).eval()
    save_file(effnet.state_dict(), str(folder / "effnet_encoder.safetensors"), metadata={"format": "pt"})
    models = load_models(folder, dtype=torch.float32, parts=("decoder",), with_effnet=True)
    assert isinstance(models.effnet, EfficientNetEncoder)
    loaded = models.effnet.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in effnet.state_dict().items())


def test_missing_stage_names_what_was_expected(tmp_path, tiny):
    folder = write_family(tiny, tmp_path / "weights", "stability")
    (folder / "stage_b.safetensors").unlink()
    with pytest.raises(WeightsError, match="no big stage_b weights: expected one of stage_b_bf16.safetensors"):
        load_models(folder)
    with pytest.raises(WeightsError, match="no lite stage_c weights"):
        load_models(folder, lite=True)


def test_every_file_is_found_before_anything_loads_and_the_other_size_is_hinted(tmp_path, tiny, monkeypatch):
    """A folder without the EfficientNet encoder that img2img needs (or without Stage B) was named only after the
    text encoder and every stage had loaded: gigabytes for the official family."""
    import cascade.family as family

    folder = write_family(tiny, tmp_path / "weights", "stability")
    loaded = []
    monkeypatch.setattr(family, "_load_text", lambda *a, **k: loaded.append("text"))
    monkeypatch.setattr(family, "load_stage", lambda *a, **k: loaded.append("stage"))
    with pytest.raises(WeightsError, match="no effnet weights: expected one of effnet_encoder.safetensors"):
        load_models(folder, with_effnet=True)
    assert loaded == []
    (folder / "stage_c.safetensors").rename(folder / "stage_c_lite.safetensors")
    with pytest.raises(WeightsError, match="no big stage_c weights: .*; the folder has the lite one: add --lite"):
        load_models(folder)


def test_a_text_encoder_of_another_family_is_refused_naming_both_widths(tmp_path, tiny):
    """The demo's text encoder (64 wide) beside the tiny model's stages (32): refused when loading, not by a matmul
    in the first request."""
    import shutil

    from cascade.geometry import DEMO_FOLDER

    folder = write_family(tiny, tmp_path / "weights", "stability")
    shutil.rmtree(folder / "text_encoder")
    shutil.copytree(DEMO_FOLDER / "text_encoder", folder / "text_encoder")
    with pytest.raises(WeightsError, match="hidden embeddings are 64 wide, but Stage C's text input takes 32"):
        load_models(folder, dtype=torch.float32)
    assert load_models(folder, dtype=torch.float32, parts=("decoder",)).stage_b is not None  # no text encoder there


def test_missing_text_encoder_and_folder(tmp_path):
    with pytest.raises(WeightsError, match="weights folder not found"):
        load_models(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="no text encoder"):
        load_models(tmp_path / "empty")


def test_text_encoder_variant_and_broken_text_encoder(tmp_path, tiny):
    folder = write_family(tiny, tmp_path / "weights", "stability")
    for f in (folder / "text_encoder").glob("model*.safetensors"):
        f.unlink()
    tiny.text_encoder.model.save_pretrained(folder / "text_encoder", variant="bf16")  # only a bf16 variant
    models = load_models(folder, dtype=torch.float32)  # still found, read into fp32
    assert next(models.text_encoder.parameters()).dtype == torch.float32
    for f in (folder / "text_encoder").glob("model*.safetensors"):
        f.unlink()
    with pytest.raises(WeightsError, match="text_encoder: the text encoder could not be loaded"):
        load_models(folder)


def test_parts_load_one_half_with_the_same_weights(tmp_path, tiny):
    prior, decoder = tiny_models(parts=("prior",)), tiny_models(parts=("decoder",))
    assert prior.stage_b is None and prior.stage_a is None and prior.stage_c is not None
    assert decoder.text_encoder is None and decoder.stage_c is None and decoder.stage_a is not None
    for a, b in zip(prior.stage_c.state_dict().values(), tiny.stage_c.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(decoder.stage_b.state_dict().values(), tiny.stage_b.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="parts"):
        tiny_models(parts=("stage_x",))
    folder = write_family(tiny, tmp_path / "w", "stability")
    (folder / "stage_c.safetensors").unlink()
    half = load_models(folder, parts=("decoder",), dtype=torch.float32)  # needs nothing of the prior's
    assert half.stage_c is None and half.text_encoder is None and half.stage_b is not None
    with pytest.raises(WeightsError, match="stage_c"):
        load_models(folder, parts=("prior",), dtype=torch.float32)


class _Payload:
    """Unpickling this runs code: what a malicious pickle checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickle_text_encoder_is_refused_and_never_unpickled(tmp_path, tiny):
    import pickle

    folder = write_family(tiny, tmp_path / "weights", "stability")
    for f in (folder / "text_encoder").glob("model*.safetensors"):
        f.unlink()
    marker = tmp_path / "pwned"
    (folder / "text_encoder" / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(WeightsError, match="text_encoder: the text encoder could not be loaded"):
        load_models(folder)
    assert not marker.exists()


def test_a_broken_text_encoder_is_named_not_a_traceback_nor_random_weights(tmp_path, tiny, capsys):
    """A cut-off or empty file (a partial download), a config.json whose sizes are not the file's, and another
    stage's file in the text encoder's place: each a WeightsError naming the folder (exit 3 from the CLI), as a stage
    file's faults are. Before, the first two were tracebacks (exit 1) and the third loaded a randomly initialised
    CLIP with exit 0."""
    import json
    import shutil

    from cascade.__main__ import main

    good = write_family(tiny, tmp_path / "good", "stability")
    weights = "text_encoder/model.safetensors"
    cases = {
        "cut": lambda f: (f / weights).write_bytes((good / weights).read_bytes()[:5000]),
        "empty": lambda f: (f / weights).write_bytes(b""),
        "config": lambda f: (f / "text_encoder/config.json").write_text(
            json.dumps({**json.loads((good / "text_encoder/config.json").read_text()), "hidden_size": 64})
        ),
        "stage_a": lambda f: shutil.copyfile(good / "stage_a.safetensors", f / weights),
    }
    for name, spoil in cases.items():
        folder = tmp_path / name
        shutil.copytree(good, folder)
        spoil(folder)
        with pytest.raises(WeightsError, match="text_encoder: the text encoder could not be loaded: ") as refused:
            load_models(folder)
        if name == "stage_a":
            assert "not a CLIP text encoder's weights: " in str(refused.value)
    assert main(["x", "--weights", str(tmp_path / "stage_a"), "--out", str(tmp_path / "o.png")]) == 3
    assert "text_encoder: the text encoder could not be loaded: not a CLIP text encoder's weights: " in (
        capsys.readouterr().err
    )


def test_random_full_size_models_have_the_official_parameter_counts():
    from cascade.family import BUILTIN_MODELS
    from cascade.geometry import OFFICIAL, family_geometry

    big = BUILTIN_MODELS["random-big"](device="meta")  # full size, no memory
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (count(big.stage_c), count(big.stage_b)) == (3_589_103_632, 1_562_941_136)
    assert big.text_encoder.model.config.hidden_size == 1280 and big.name == "random-big"
    lite = BUILTIN_MODELS["random-lite"](device="meta", parts=("prior",))
    assert count(lite.stage_c) == 1_030_785_040 and lite.stage_b is None
    assert family_geometry("random-big") == OFFICIAL


def test_ship_family_copies_a_family_that_loads_and_refuses_a_partial_one_before_writing(tmp_path):
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from cascade.geometry import DEMO_FOLDER

    root = Path(__file__).resolve().parents[1]
    ship = lambda src, dst: subprocess.run(  # noqa: E731
        [sys.executable, "scripts/ship_family.py", str(src), str(dst)], cwd=root, capture_output=True, text=True
    )
    done = ship(DEMO_FOLDER, tmp_path / "shipped")
    assert done.returncode == 0, done.stderr
    assert "stage_c.safetensors: float16" in done.stdout and "family.json: copied" in done.stdout
    models = load_models(tmp_path / "shipped", dtype=torch.float32)
    assert models.geometry.default_size == 64
    partial = tmp_path / "partial"
    shutil.copytree(tmp_path / "shipped", partial)
    (partial / "previewer.safetensors").unlink()
    refused = ship(partial, tmp_path / "never")
    assert refused.returncode == 1 and "previewer.safetensors not found: is" in refused.stderr
    assert not (tmp_path / "never").exists()  # nothing written


def test_a_family_makes_requests_with_its_own_defaults():
    """Request(...) alone takes the reference's defaults (1024 px, 20 / 4 / 10 / 1.1), which the demo cannot even
    render; models.request(...) takes the family's own, as the CLI and the job do."""
    from cascade import CascadeModels, Request
    from cascade.family import demo_models
    from cascade.request import sampling_defaults

    demo = demo_models(parts=("decoder",))
    made = demo.request("a red circle", seed=3)
    assert (made.width, made.height, made.seed) == (demo.geometry.default_size, demo.geometry.default_size, 3)
    assert demo.sampling and {k: getattr(made, k) for k in sampling_defaults("demo")} == sampling_defaults("demo")
    assert demo.request("x", prior_cfg=5.0, width=128).prior_cfg == 5.0
    assert CascadeModels(None, None, None, None).request("x", seed=1) == Request("x", seed=1)  # the official's


def test_load_family_names_a_setting_that_does_not_apply_to_the_model_given(tmp_path, tiny):
    """A built-in takes a seed, a folder `lite` and `with_previewer`: the other was Python's bare "unexpected keyword
    argument" from deep inside. What applies still loads."""
    from cascade.family import load_family

    with pytest.raises(TypeError, match=r"lite does not apply to the built-in model 'tiny' \(random-lite is"):
        load_family("tiny", lite=True)
    folder = write_family(tiny, tmp_path / "weights", "stability")
    with pytest.raises(TypeError, match="seed does not apply to a weights folder; it takes lite, dtype"):
        load_family(folder, seed=3)
    assert load_family(folder, dtype=torch.float32, parts=("decoder",)).stage_b is not None
    assert load_family("tiny", seed=1, parts=("prior",)).stage_c is not None
