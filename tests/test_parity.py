"""Forward parity with diffusers' StableCascadeUNet (the test oracle) on tiny configs with every parameter random."""

import pytest
import torch
from diffusers import StableCascadeUNet

from cascade.convert import to_diffusers_state_dict, unet_config_from_diffusers, unet_config_to_diffusers
from cascade.stage_b import STAGE_B_TINY, StageB, StageBConfig
from cascade.stage_c import STAGE_C_TINY, StageC
from tests.helpers import randomize


def diffusers_twin(kind, ours):
    df = StableCascadeUNet(**unet_config_to_diffusers(ours.config)).eval()
    df.load_state_dict(to_diffusers_state_dict(kind, ours.state_dict()), strict=True)
    return df


def assert_close_rel(a, b, rel=1e-5):
    scale = b.abs().max().item()
    assert scale > 1e-3, "the output is degenerate; the test would prove nothing"
    assert (a - b).abs().max().item() <= rel * scale


@pytest.mark.parametrize("seed", [0, 1])
def test_stage_c_matches_diffusers(seed):
    ours = randomize(StageC(STAGE_C_TINY), seed)
    df = diffusers_twin("stage_c", ours)
    g = torch.Generator().manual_seed(seed + 10)
    x = torch.randn(2, 16, 6, 6, generator=g)
    r = torch.rand(2, generator=g)
    clip_text, pooled, clip_img = (torch.randn(s, generator=g) for s in [(2, 77, 32), (2, 1, 32), (2, 1, 24)])
    with torch.no_grad():
        a = ours(x, r, clip_text, pooled, clip_img)
        b = df(x, r, clip_text_pooled=pooled, clip_text=clip_text, clip_img=clip_img).sample
    assert a.shape == x.shape
    assert_close_rel(a, b)


@pytest.mark.parametrize("size", [32, 40])  # 40: odd grids take the interpolation path in the up levels
def test_stage_b_matches_diffusers(size):
    ours = randomize(StageB(STAGE_B_TINY), 3)
    df = diffusers_twin("stage_b", ours)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, size, size, generator=g)
    r = torch.rand(2, generator=g)
    pooled, effnet = torch.randn(2, 1, 32, generator=g), torch.randn(2, 16, 3, 3, generator=g)
    with torch.no_grad():
        a = ours(x, r, effnet, pooled)
        b = df(x, r, clip_text_pooled=pooled, effnet=effnet).sample
    assert a.shape == x.shape
    assert_close_rel(a, b)


def test_conditioning_changes_the_output():
    ours = randomize(StageC(STAGE_C_TINY), 5)
    x, r = torch.randn(1, 16, 6, 6), torch.tensor([0.5])
    text_a, text_b, pooled, img = (
        torch.randn(1, 77, 32),
        torch.randn(1, 77, 32),
        torch.randn(1, 1, 32),
        torch.zeros(1, 1, 24),
    )
    with torch.no_grad():
        assert not torch.allclose(ours(x, r, text_a, pooled, img), ours(x, r, text_b, pooled, img))


def test_configs_round_trip_through_diffusers_config():
    for config in (STAGE_C_TINY, STAGE_B_TINY, StageBConfig()):
        assert unet_config_from_diffusers(unet_config_to_diffusers(config)) == config


def test_pooled_text_must_be_3d():
    ours = StageC(STAGE_C_TINY).eval()
    with pytest.raises(ValueError, match="3-D"):
        ours(torch.randn(1, 16, 6, 6), torch.rand(1), torch.randn(1, 77, 32), torch.randn(1, 32), torch.zeros(1, 1, 24))
