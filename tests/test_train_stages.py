"""Stage C and Stage B trainers: conditioning and dropouts wired as the reference, and a prior that follows text."""

import pytest
import torch

from cascade import gdf
from cascade.stage_b import STAGE_B_TINY
from cascade.stage_c import STAGE_C_TINY
from cascade.text import TINY_TEXT_CONFIG, build_text_encoder
from cascade.train.loop import RunConfig
from cascade.train.stages import encode_captions, train_stage_b, train_stage_c


def two_captions(n: int):
    """Half the samples say red and have latent +1 everywhere, half say blue and have -1 (plus a little noise)."""
    g = torch.Generator().manual_seed(0)
    captions = ["a red circle on a white background", "a blue square on a black background"] * (n // 2)
    signs = torch.tensor([1.0, -1.0] * (n // 2)).view(-1, 1, 1, 1)
    latents = signs * torch.ones(n, 16, 4, 4) + 0.1 * torch.randn(n, 16, 4, 4, generator=g)
    return captions, latents


@pytest.mark.slow
def test_stage_c_learns_to_follow_the_caption():
    captions, latents = two_captions(64)
    text = encode_captions(build_text_encoder(TINY_TEXT_CONFIG, seed=0), captions)
    run = RunConfig(steps=600, batch_size=16, lr=2e-3, warmup=50, ema_beta=0.99)
    trained = train_stage_c(latents, text, STAGE_C_TINY, run, progress=False)
    model = trained.ema["stage_c"]
    clip_img = torch.zeros(2, 1, STAGE_C_TINY.c_clip_img)
    cond = {"clip_text": text.clip_text[:2], "clip_text_pooled": text.pooled[:2], "clip_img": clip_img}
    uncond = {
        "clip_text": text.empty_text.expand(2, -1, -1),
        "clip_text_pooled": text.empty_pooled.expand(2, -1, -1),
        "clip_img": clip_img,
    }
    generators = [torch.Generator().manual_seed(s) for s in (1, 2)]
    with torch.no_grad():
        out = gdf.sample(gdf.guided_denoiser(model, cond, uncond, 1.0), generators, (16, 4, 4), steps=20)
    red, blue = float(out[0].mean()), float(out[1].mean())
    # Short training on a CPU: the direction is learned (the full runs sharpen the values).
    assert red > 0.3 and blue < -0.3, (red, blue)


def test_stage_b_trains_with_its_dropouts():
    g = torch.Generator().manual_seed(0)
    semantic = torch.randn(32, 16, 4, 4, generator=g)
    stage_a = torch.nn.functional.interpolate(semantic[:, :4], size=(16, 16), mode="nearest")  # decodable from effnet
    text = encode_captions(build_text_encoder(TINY_TEXT_CONFIG, seed=0), ["a shape"] * 32)
    run = RunConfig(steps=80, batch_size=8, lr=2e-3, warmup=10)
    trained = train_stage_b(stage_a, semantic, text, STAGE_B_TINY, run, progress=False)
    assert sum(trained.losses[-10:]) / 10 < 0.8 * sum(trained.losses[:10]) / 10


def test_stage_b_decodes_general_images_with_the_empty_caption(monkeypatch):
    """Uncaptioned images (`shapes.make_general`) join Stage B's data with the empty caption's pooled embedding."""
    from cascade.train import stages

    g = torch.Generator().manual_seed(0)
    semantic = torch.randn(8, 16, 4, 4, generator=g)
    stage_a = torch.zeros(8, 4, 16, 16)  # captioned images' latents are 0, the general images' 7: told apart below
    general = (torch.full((8, 4, 16, 16), 7.0), torch.randn(8, 16, 4, 4, generator=g))
    text = encode_captions(build_text_encoder(TINY_TEXT_CONFIG, seed=0), ["a red circle"] * 8)
    seen = []
    real_loss = stages.diffusion_loss

    def spy(model, x0, conditions, loss_weight, generator):
        seen.append((x0[:, 0, 0, 0].clone(), conditions["clip"].clone()))
        return real_loss(model, x0, conditions, loss_weight, generator)

    monkeypatch.setattr(stages, "diffusion_loss", spy)
    train_stage_b(stage_a, semantic, text, STAGE_B_TINY, RunConfig(steps=6, batch_size=8, warmup=1), general=general)
    values = torch.cat([v for v, _ in seen])
    pooled = torch.cat([p for _, p in seen])
    is_general = values == 7.0
    assert 0 < int(is_general.sum()) < len(values)  # both kinds are drawn
    assert torch.equal(pooled[is_general], text.empty_pooled.expand(int(is_general.sum()), -1, -1))
    captioned = pooled[~is_general]
    kept = (captioned - text.pooled[:1]).abs().amax(dim=(1, 2)) == 0  # most keep their caption (5 % dropout)
    assert int(kept.sum()) > len(captioned) // 2
