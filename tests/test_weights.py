"""Loading the official layouts: diffusers folders written by diffusers itself, Stability single files, errors."""

import json
import os
import stat
import struct

import pytest
import torch
from diffusers import StableCascadeUNet
from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel
from safetensors.torch import save_file

from cascade.convert import unet_config_to_diffusers
from cascade.effnet import EFFNET_ENCODER, EfficientNetEncoder
from cascade.previewer import PREVIEWER, Previewer
from cascade.stage_a import STAGE_A, STAGE_A_TINY, StageA, stage_a_diffusers_config
from cascade.stage_b import STAGE_B_3B, STAGE_B_700M, STAGE_B_TINY, StageB
from cascade.stage_c import STAGE_C_1B, STAGE_C_3B, STAGE_C_TINY, StageC
from cascade.weights import WeightsError, inspect_stage, load_stage, save_stage
from tests.helpers import randomize


def stability_keys(kind, diffusers_state):
    """Convert a diffusers state dict back to Stability's keys, written independently of cascade.convert."""
    out = {}
    for key, value in diffusers_state.items():
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        if ".attention.to_q." in key:
            prefix, suffix = key.split(".attention.to_q.")
            qkv = [diffusers_state[f"{prefix}.attention.to_{p}.{suffix}"] for p in "qkv"]
            out[f"{prefix}.attention.attn.in_proj_{suffix}"] = torch.cat(qkv).contiguous()
        elif ".attention.to_out.0." in key:
            out[key.replace("to_out.0", "attn.out_proj")] = value
        elif kind == "stage_b" and key.startswith("clip_txt_pooled_mapper."):
            out[key.replace("clip_txt_pooled_mapper", "clip_mapper")] = value
        elif kind == "stage_a" and key == "vquantizer.embedding.weight":
            out["vquantizer.codebook.weight"] = value
        else:
            out[key] = value
    return out


def c_inputs(g):
    return (
        torch.randn(2, 16, 6, 6, generator=g),
        torch.rand(2, generator=g),
        torch.randn(2, 77, 32, generator=g),
        torch.randn(2, 1, 32, generator=g),
        torch.randn(2, 1, 24, generator=g),
    )


def b_inputs(g):
    return (
        torch.randn(2, 4, 32, 32, generator=g),
        torch.rand(2, generator=g),
        torch.randn(2, 16, 3, 3, generator=g),
        torch.randn(2, 1, 32, generator=g),
    )


def diffusers_unet(config, seed):
    return randomize(StableCascadeUNet(**unet_config_to_diffusers(config)), seed)


def run_diffusers(df, kind, inputs):
    with torch.no_grad():
        if kind == "stage_c":
            x, r, text, pooled, img = inputs
            return df(x, r, clip_text_pooled=pooled, clip_text=text, clip_img=img).sample
        x, r, effnet, pooled = inputs
        return df(x, r, clip_text_pooled=pooled, effnet=effnet).sample


CASES = [("stage_c", STAGE_C_TINY, c_inputs), ("stage_b", STAGE_B_TINY, b_inputs)]


@pytest.mark.parametrize("kind,config,inputs", CASES, ids=["stage_c", "stage_b"])
def test_diffusers_folder_from_save_pretrained_loads(tmp_path, kind, config, inputs):
    df = diffusers_unet(config, 1)
    df.save_pretrained(tmp_path / "unet")  # diffusers' own writer: config.json + diffusion_pytorch_model.safetensors
    ours = load_stage(tmp_path / "unet", expect=kind)
    assert ours.config == config
    assert not ours.training and not any(p.requires_grad for p in ours.parameters())
    x = inputs(torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(*x), run_diffusers(df, kind, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,config,inputs", CASES, ids=["stage_c", "stage_b"])
def test_stability_single_file_loads(tmp_path, kind, config, inputs):
    df = diffusers_unet(config, 3)
    path = tmp_path / f"{kind}.safetensors"
    save_file(stability_keys(kind, df.state_dict()), str(path))  # no metadata, as the official files
    ours = load_stage(path, config=config, dtype=torch.float32)
    x = inputs(torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(ours(*x), run_diffusers(df, kind, x), rtol=1e-5, atol=1e-6)


def test_stage_a_from_diffusers_folder_and_single_file(tmp_path):
    df = randomize(PaellaVQModel(**stage_a_diffusers_config(STAGE_A_TINY)), 5)
    df.save_pretrained(tmp_path / "vqgan")
    save_file(stability_keys("stage_a", df.state_dict()), str(tmp_path / "stage_a.safetensors"))
    z = torch.randn(1, 4, 8, 8)
    expected = df.decode(z * STAGE_A_TINY.scale_factor).sample
    from_folder = load_stage(tmp_path / "vqgan")
    from_file = load_stage(tmp_path / "stage_a.safetensors", config=STAGE_A_TINY)
    with torch.no_grad():
        torch.testing.assert_close(from_folder.decode(z), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(from_file.decode(z), expected, rtol=1e-5, atol=1e-6)


def test_loads_straight_into_bf16_and_keeps_integer_buffers(tmp_path):
    path = save_stage(randomize(StageA(STAGE_A_TINY)), tmp_path / "a.safetensors")
    model = load_stage(path, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.state_dict()["down_blocks.3.1.num_batches_tracked"].dtype == torch.int64


def test_our_files_carry_their_configuration(tmp_path):
    model = randomize(StageB(STAGE_B_TINY))
    for layout, path in (("stability", tmp_path / "b.safetensors"), ("diffusers", tmp_path / "b")):
        loaded = load_stage(save_stage(model, path, layout=layout))
        assert loaded.config == STAGE_B_TINY
        for k, v in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), k


def test_saved_files_get_the_mode_open_gives_them(tmp_path):
    # safetensors 0.8 makes its files 0o600 (safetensors #782): weights, LoRAs and checkpoints the other users of
    # shared storage could not read.
    model = randomize(StageB(STAGE_B_TINY))
    old = os.umask(0o022)
    try:
        paths = [save_stage(model, tmp_path / "b.safetensors"), save_stage(model, tmp_path / "b", layout="diffusers")]
    finally:
        os.umask(old)
    for path in (paths[0], paths[1] / "diffusion_pytorch_model.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def write_sparse(path, state):
    """A safetensors file with the real header of `state` (bf16, int64 kept) whose data is a sparse hole: full-size
    official layouts cost no disk and no memory, and only headers are read from them."""
    header, offset = {}, 0
    for k, v in state.items():
        integer = v.dtype == torch.int64
        n = v.numel() * (8 if integer else 2)
        header[k] = {
            "dtype": "I64" if integer else "BF16",
            "shape": list(v.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return path


def write_sparse_official(path, model_cls, config):
    with torch.device("meta"):
        return write_sparse(path, model_cls(config).state_dict())


@pytest.mark.parametrize(
    "cls,config,kind",
    [
        (StageC, STAGE_C_3B, "stage_c"),
        (StageC, STAGE_C_1B, "stage_c"),
        (StageB, STAGE_B_3B, "stage_b"),
        (StageB, STAGE_B_700M, "stage_b"),
        (StageA, STAGE_A, "stage_a"),
        (EfficientNetEncoder, EFFNET_ENCODER, "effnet"),
        (Previewer, PREVIEWER, "previewer"),
    ],
    ids=["c", "c_lite", "b", "b_lite", "a", "effnet", "previewer"],
)
def test_official_variant_detected_from_shapes(tmp_path, cls, config, kind):
    path = write_sparse_official(tmp_path / "official.safetensors", cls, config)
    source = inspect_stage(path)
    assert source.kind.name == kind and source.config == config


# ------------------------------------------------------------------------------------------------------- bad files


def test_missing_file_is_named(tmp_path):
    with pytest.raises(WeightsError, match="no such file or folder") as e:
        load_stage(tmp_path / "stage_c_bf16.safetensors")
    assert "stage_c_bf16.safetensors" in str(e.value)


def test_truncated_file_is_reported(tmp_path):
    path = save_stage(StageC(STAGE_C_TINY), tmp_path / "c.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(WeightsError, match=r"c\.safetensors: truncated"):
        load_stage(path)


def test_garbage_and_pickle_files_are_refused(tmp_path):
    garbage = tmp_path / "stage_b.safetensors"
    garbage.write_bytes(b"\x00" * 3 + b"definitely not safetensors" * 10)
    with pytest.raises(WeightsError, match="not a safetensors file"):
        load_stage(garbage)
    pickle = tmp_path / "stage_b.bin"
    pickle.write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(WeightsError, match="only .safetensors"):
        load_stage(pickle)
    folder = tmp_path / "decoder"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"_class_name": "StableCascadeUNet", **unet_config_to_diffusers(STAGE_B_TINY)})
    )
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(WeightsError, match="pickle"):
        load_stage(folder)


def test_foreign_file_is_refused(tmp_path):
    path = tmp_path / "unet.safetensors"
    save_file({"conv_in.weight": torch.zeros(4, 4), "time_embedding.linear_1.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(WeightsError, match="not a Stable Cascade stage"):
        load_stage(path)


def test_mismatched_file_names_the_key(tmp_path):
    path = save_stage(StageC(STAGE_C_TINY), tmp_path / "c.safetensors")
    other = STAGE_C_TINY.__class__(**{**STAGE_C_TINY.__dict__, "c_clip_text": 48})
    with pytest.raises(WeightsError, match=r"clip_txt_mapper.weight has shape \[64, 32\]"):
        load_stage(path, config=other)
    with pytest.raises(WeightsError, match="holds stage_c weights, but stage_b was expected"):
        load_stage(path, expect="stage_b")


def test_missing_keys_are_listed(tmp_path):
    state = StageB(STAGE_B_TINY).state_dict()
    del state["clf.1.weight"]
    path = tmp_path / "b.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(WeightsError, match=r"1 missing keys \(clf.1.weight\)"):
        load_stage(path, config=STAGE_B_TINY)


def test_folder_without_config_or_weights(tmp_path):
    (tmp_path / "prior").mkdir()
    with pytest.raises(WeightsError, match="config.json, which is missing"):
        load_stage(tmp_path / "prior")
    (tmp_path / "prior" / "config.json").write_text(
        json.dumps({"_class_name": "StableCascadeUNet", **unet_config_to_diffusers(STAGE_C_TINY)})
    )
    with pytest.raises(WeightsError, match="no diffusion_pytorch_model.safetensors"):
        load_stage(tmp_path / "prior")


def test_pre_release_diffusers_config_is_named(tmp_path):
    """The official repos' first upload (February 2024) wrote a config a released diffusers cannot read either."""
    folder = tmp_path / "decoder"
    folder.mkdir()
    first_upload = {"_class_name": "StableCascadeUnet", "_diffusers_version": "0.26.0.dev0", "c_in": 4, "c_effnet": 16}
    (folder / "config.json").write_text(json.dumps(first_upload))
    with pytest.raises(WeightsError, match=r"pre-release diffusers configuration \(0.26.0.dev0.*current revision"):
        load_stage(folder)


def test_official_shapes_that_match_no_preset_need_a_config(tmp_path):
    path = tmp_path / "c.safetensors"
    save_file({k: v.contiguous() for k, v in StageC(STAGE_C_TINY).state_dict().items()}, str(path))
    with pytest.raises(WeightsError, match="match no official configuration"):
        load_stage(path)


# The configurations diffusers' scripts/convert_stable_cascade(_lite).py gives the official prior/ and decoder/
# folders (what their config.json files hold).
_PRIOR = dict(
    in_channels=16,
    out_channels=16,
    timestep_ratio_embedding_dim=64,
    patch_size=1,
    conditioning_dim=2048,
    block_out_channels=[2048, 2048],
    num_attention_heads=[32, 32],
    down_num_layers_per_block=[8, 24],
    up_num_layers_per_block=[24, 8],
    down_blocks_repeat_mappers=[1, 1],
    up_blocks_repeat_mappers=[1, 1],
    block_types_per_layer=[["SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"]] * 2,
    clip_text_in_channels=1280,
    clip_text_pooled_in_channels=1280,
    clip_image_in_channels=768,
    clip_seq=4,
    kernel_size=3,
    dropout=[0.1, 0.1],
    self_attn=True,
    timestep_conditioning_type=["sca", "crp"],
    switch_level=[False],
)
_PRIOR_LITE = dict(
    _PRIOR,
    conditioning_dim=1536,
    block_out_channels=[1536, 1536],
    num_attention_heads=[24, 24],
    down_num_layers_per_block=[4, 12],
    up_num_layers_per_block=[12, 4],
)
_DECODER = dict(
    in_channels=4,
    out_channels=4,
    timestep_ratio_embedding_dim=64,
    patch_size=2,
    conditioning_dim=1280,
    block_out_channels=[320, 640, 1280, 1280],
    down_num_layers_per_block=[2, 6, 28, 6],
    up_num_layers_per_block=[6, 28, 6, 2],
    down_blocks_repeat_mappers=[1, 1, 1, 1],
    up_blocks_repeat_mappers=[3, 3, 2, 2],
    num_attention_heads=[0, 0, 20, 20],
    block_types_per_layer=[["SDCascadeResBlock", "SDCascadeTimestepBlock"]] * 2
    + [["SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"]] * 2,
    clip_text_pooled_in_channels=1280,
    clip_seq=4,
    effnet_in_channels=16,
    pixel_mapper_in_channels=3,
    kernel_size=3,
    dropout=[0, 0, 0.1, 0.1],
    self_attn=True,
    timestep_conditioning_type=["sca"],
)
_DECODER_LITE = dict(
    _DECODER,
    block_out_channels=[320, 576, 1152, 1152],
    num_attention_heads=[0, 9, 18, 18],
    down_num_layers_per_block=[2, 4, 14, 4],
    up_num_layers_per_block=[4, 14, 4, 2],
    up_blocks_repeat_mappers=[2, 2, 2, 2],
)


@pytest.mark.parametrize(
    "kwargs,preset",
    [(_PRIOR, STAGE_C_3B), (_PRIOR_LITE, STAGE_C_1B), (_DECODER, STAGE_B_3B), (_DECODER_LITE, STAGE_B_700M)],
    ids=["prior", "prior_lite", "decoder", "decoder_lite"],
)
def test_official_diffusers_folders_map_to_the_presets(tmp_path, kwargs, preset):
    with torch.device("meta"):
        df = StableCascadeUNet(**kwargs)
    df.save_config(tmp_path)  # config.json exactly as save_pretrained writes it
    # Weights: diffusers' own key names and shapes (only headers are read here).
    write_sparse(tmp_path / "diffusion_pytorch_model.bf16.safetensors", df.state_dict())
    source = inspect_stage(tmp_path)
    assert source.config == preset and source.layout == "diffusers"
    # Every diffusers key maps onto one of ours with the right shape (the strict check load_stage runs).
    from cascade.convert import diffusers_key_plan
    from cascade.weights import _check_keys, _expected_shapes

    _check_keys(
        tmp_path,
        source.kind,
        diffusers_key_plan(source.kind.name, source.tensors),
        source.tensors,
        _expected_shapes(source.kind, preset),
    )


def test_sharded_variant_folders_as_diffusers_writes_them(tmp_path):
    df = diffusers_unet(STAGE_C_TINY, 6)
    df.save_pretrained(tmp_path / "prior")  # plain fp32 weights and, beside them, a bf16 variant in shards
    bf16_twin = StableCascadeUNet(**unet_config_to_diffusers(STAGE_C_TINY))
    bf16_twin.load_state_dict({k: v.bfloat16() for k, v in df.state_dict().items()})
    bf16_twin.to(torch.bfloat16).save_pretrained(tmp_path / "prior", variant="bf16", max_shard_size="200KB")
    files = sorted(p.name for p in (tmp_path / "prior").iterdir())
    assert any("bf16-00001-of" in f for f in files) and "diffusion_pytorch_model.safetensors" in files
    bf16 = inspect_stage(tmp_path / "prior", dtype=torch.bfloat16)
    assert {t.file.name for t in bf16.tensors.values()} == {f for f in files if ".bf16-" in f}
    assert {t.file.name for t in inspect_stage(tmp_path / "prior").tensors.values()} == {
        "diffusion_pytorch_model.safetensors"
    }
    x = c_inputs(torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = run_diffusers(df, "stage_c", x)
        torch.testing.assert_close(load_stage(tmp_path / "prior")(*x), expected, rtol=1e-5, atol=1e-6)
        from_shards = load_stage(tmp_path / "prior", variant="bf16")  # bf16 shards read into fp32
        torch.testing.assert_close(from_shards(*x), expected, rtol=0.05, atol=0.05)


def test_missing_shard_is_named(tmp_path):
    df = diffusers_unet(STAGE_B_TINY, 8)
    df.save_pretrained(tmp_path / "decoder", max_shard_size="100KB")
    shard = sorted((tmp_path / "decoder").glob("*-00002-of-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(WeightsError, match=f"names shards that are missing: {shard.name}"):
        load_stage(tmp_path / "decoder")


def test_official_file_with_a_missing_tensor_names_it(tmp_path):
    with torch.device("meta"):
        state = StageB(STAGE_B_700M).state_dict()
    del state["down_blocks.2.3.channelwise.4.bias"]
    path = write_sparse(tmp_path / "stage_b_lite_bf16.safetensors", state)
    with pytest.raises(WeightsError, match=r"1 missing keys \(down_blocks.2.3.channelwise.4.bias\)"):
        load_stage(path)
