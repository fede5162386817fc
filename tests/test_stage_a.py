"""Stage A: sizes, checkpoint key names, and parity with diffusers' PaellaVQModel on random weights."""

import dataclasses

import pytest
import torch
from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel

from cascade.stage_a import (
    STAGE_A,
    STAGE_A_TINY,
    ResBlock,
    StageA,
    StageAConfig,
    stage_a_diffusers_config,
    stage_a_from_diffusers_config,
)
from tests.helpers import load_script

# The one key that differs between the Stability file (ours) and the diffusers `vqgan/` checkpoint.
OURS_CODEBOOK, DIFFUSERS_CODEBOOK = "vquantizer.codebook.weight", "vquantizer.embedding.weight"


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def randomized_state_dict(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every float parameter and buffer random, including the zero-initialised `gammas` and BatchNorm statistics."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        if not value.is_floating_point():  # num_batches_tracked
            state[key] = value
        elif key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(value.shape, generator=g)
        else:
            state[key] = torch.randn(value.shape, generator=g) * 0.05
    return state


def test_param_counts():
    with torch.device("meta"):
        assert n_params(StageA(STAGE_A)) == 18_406_894
        assert n_params(StageA(STAGE_A_TINY)) == 39_148


def test_keys_equal_diffusers_modulo_codebook_rename():
    with torch.device("meta"):
        ours = StageA(STAGE_A).state_dict()
        theirs = PaellaVQModel(**stage_a_diffusers_config(STAGE_A)).state_dict()
    renamed = {OURS_CODEBOOK if k == DIFFUSERS_CODEBOOK else k: v for k, v in theirs.items()}
    assert OURS_CODEBOOK in ours and DIFFUSERS_CODEBOOK not in ours
    assert list(ours) == list(renamed)  # same keys, same order
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in renamed.items()}
    assert tuple(ours[OURS_CODEBOOK].shape) == (8192, 4)


def test_structural_keys_of_the_stability_file():
    with torch.device("meta"):
        keys = set(StageA(STAGE_A).state_dict())
    expected = {
        "in_block.1.weight",
        "down_blocks.0.gammas",
        "down_blocks.0.depthwise.1.weight",
        "down_blocks.1.weight",
        "down_blocks.2.channelwise.2.bias",
        "down_blocks.3.0.weight",
        "down_blocks.3.1.running_var",
        "down_blocks.3.1.num_batches_tracked",
        "up_blocks.0.0.weight",
        "up_blocks.12.gammas",
        "up_blocks.13.weight",
        "up_blocks.14.channelwise.0.weight",
        "out_block.0.bias",
    }
    assert expected <= keys
    assert "down_blocks.3.0.bias" not in keys  # the latent projection has no bias
    assert not any(k.startswith("up_blocks.15") for k in keys)


@pytest.fixture(scope="module")
def tiny_pair():
    """diffusers' tiny PaellaVQModel and ours with the same fully random weights, both in eval mode."""
    torch.manual_seed(0)
    theirs = PaellaVQModel(embed_dim=32, bottleneck_blocks=1, num_vq_embeddings=16).eval()
    theirs.load_state_dict(randomized_state_dict(theirs))
    config = stage_a_from_diffusers_config(dict(theirs.config))
    ours = StageA(config).eval()
    state = {OURS_CODEBOOK if k == DIFFUSERS_CODEBOOK else k: v for k, v in theirs.state_dict().items()}
    ours.load_state_dict(state, strict=True)
    return ours, theirs


def test_tiny_config_from_diffusers(tiny_pair):
    ours, theirs = tiny_pair
    assert ours.config == dataclasses.replace(STAGE_A_TINY, scale_factor=0.3764)  # the diffusers default is kept
    assert n_params(ours) == n_params(theirs) == 39_148


@torch.no_grad()
def test_encode_matches_diffusers(tiny_pair):
    ours, theirs = tiny_pair
    x = torch.rand(2, 3, 32, 32)
    z = ours.encode(x)
    assert z.shape == (2, 4, 8, 8)
    # diffusers returns the unscaled latent; ours divides by scale_factor.
    torch.testing.assert_close(z * ours.config.scale_factor, theirs.encode(x).latents, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_decode_matches_diffusers(tiny_pair):
    ours, theirs = tiny_pair
    z = torch.randn(2, 4, 8, 8)
    expected = theirs.decode(z * ours.config.scale_factor).sample  # force_not_quantize=True by default
    torch.testing.assert_close(ours.decode(z), expected, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_quantized_encode_matches_diffusers_quantizer(tiny_pair):
    ours, theirs = tiny_pair
    x = torch.rand(2, 3, 32, 32)
    expected, _, _ = theirs.vquantizer(theirs.encode(x).latents)
    torch.testing.assert_close(ours.encode(x, quantize=True) * ours.config.scale_factor, expected)


@torch.no_grad()
def test_quantize_snaps_to_nearest_codebook_vector(tiny_pair):
    ours, _ = tiny_pair
    x = torch.rand(1, 3, 32, 32)
    z = ours.encode(x) * ours.config.scale_factor  # (1, 4, 8, 8) unscaled
    q = ours.encode(x, quantize=True) * ours.config.scale_factor
    codebook = ours.vquantizer.codebook.weight  # (16, 4)
    z_pixels, q_pixels = z.flatten(2).squeeze(0).T, q.flatten(2).squeeze(0).T  # (64, 4)
    nearest = codebook[((z_pixels[:, None] - codebook[None]) ** 2).sum(-1).argmin(1)]
    torch.testing.assert_close(q_pixels, nearest, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(z, q)  # quantising changes the latent


@torch.no_grad()
def test_round_trip_shapes():
    model = StageA(STAGE_A_TINY).eval()
    x = torch.rand(1, 3, 32, 32)
    z = model.encode(x)
    assert z.shape == (1, 4, 8, 8)
    assert model.decode(z).shape == (1, 3, 32, 32)
    assert model(x).shape == (1, 3, 32, 32)


def test_diffusers_config_round_trip():
    for config in (STAGE_A, STAGE_A_TINY):
        assert stage_a_from_diffusers_config(stage_a_diffusers_config(config)) == config
    # A vqgan/config.json-style dict: "_" bookkeeping keys are ignored, its scale factor is kept.
    vqgan = {
        "_class_name": "PaellaVQModel",
        "_name_or_path": "warp-ai/wuerstchen",
        "bottleneck_blocks": 12,
        "embed_dim": 384,
        "in_channels": 3,
        "latent_channels": 4,
        "levels": 2,
        "num_vq_embeddings": 8192,
        "out_channels": 3,
        "scale_factor": 0.3764,
        "up_down_scale_factor": 2,
    }
    assert stage_a_from_diffusers_config(vqgan) == dataclasses.replace(STAGE_A, scale_factor=0.3764)


def test_bad_configs_fail_fast():
    with pytest.raises(ValueError, match="unknown"):
        stage_a_from_diffusers_config({"embed_dims": 384})
    with pytest.raises(ValueError, match="in_channels"):
        stage_a_from_diffusers_config({"in_channels": 4})
    with pytest.raises(ValueError, match="c_hidden"):
        StageAConfig(c_hidden=33)


def test_decode_variants_script_times_and_checks_the_decoder_ways(tmp_path, capsys):
    """scripts/stage_a_variants.py (a part of the GPU session): the decoder as it is, on NCHW memory and as written
    before its passes were fused give the same images, and the fused ResBlocks move fewer memory-bound bytes."""
    import json

    script = load_script("stage_a_variants")
    out = tmp_path / "stage_a.json"
    originals = StageA.decode, ResBlock.forward
    assert script.main(["--size", "64", "--repeats", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())["variants"]
    assert set(report) == {"ours", "nchw", "before"} and report["before"]["vs_before"] == 1.0
    assert all(v["ms_per_image"] > 0 and v["max_abs_diff"] < 1e-4 for v in report.values())
    ours, before = report["ours"]["memory_bound_gb_per_image"], report["before"]["memory_bound_gb_per_image"]
    assert 0 < ours < 0.8 * before
    assert (StageA.decode, ResBlock.forward) == originals  # the script put the decoder back as it found it


def test_decode_runs_on_channels_last_memory_and_gives_what_nchw_gives():
    """decode converts its input to channels-last (the layout the ResBlocks' per-pixel work wants); the image is
    the one the NCHW path computes, and the output is channels-last in memory."""
    torch.manual_seed(0)
    model = StageA(STAGE_A_TINY).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.1)
    latents = torch.randn(2, 4, 12, 10)
    with torch.inference_mode():
        image = model.decode(latents)
        nchw = model.out_block(model.up_blocks(latents * model.config.scale_factor))
    assert image.is_contiguous(memory_format=torch.channels_last) and not nchw.is_contiguous(
        memory_format=torch.channels_last
    )
    assert image.abs().max() > 0.1
    torch.testing.assert_close(image, nchw, rtol=1e-5, atol=1e-5)
