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
    """From the same noisy latent, the trained prior's estimate of the clean latent follows the caption: towards +1
    for the red caption, -1 for the blue one. Read at a high noise level (t = 0.95), where the latent says little and
    the caption must say the rest; one denoising step, not a sampled chain, so nothing else compounds."""
    captions, latents = two_captions(64)
    text = encode_captions(build_text_encoder(TINY_TEXT_CONFIG, seed=0), captions)
    # The prior learns to read the caption late in a short run (about step 250-350 here): 400 steps give margin.
    run = RunConfig(steps=400, batch_size=16, lr=2e-3, warmup=50, ema_beta=0.95)
    model = train_stage_c(latents, text, STAGE_C_TINY, run, progress=False).ema["stage_c"].eval()
    n, t = 8, 0.95
    noisy = gdf.diffuse(
        torch.zeros(n, 16, 4, 4), t, torch.randn(n, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    )
    logsnr = gdf.log_snr(torch.full((n,), t))
    clean = []
    for i in (0, 1):  # the red caption, the blue one
        cond = {
            "clip_text": text.clip_text[i : i + 1].expand(n, -1, -1),
            "clip_text_pooled": text.pooled[i : i + 1].expand(n, -1, -1),
            "clip_img": torch.zeros(n, 1, STAGE_C_TINY.c_clip_img),
        }
        with torch.no_grad():
            eps = model(noisy, gdf.noise_cond(logsnr), **cond)
        clean.append(gdf.predict_x0(noisy, eps, logsnr).mean(dim=(1, 2, 3)))
    gap = clean[0] - clean[1]  # the data's gap is 2 (+1 against -1)
    assert bool((gap > 1.0).all()), gap


def test_stage_b_trains_with_its_dropouts():
    g = torch.Generator().manual_seed(0)
    semantic = torch.randn(32, 16, 4, 4, generator=g)
    stage_a = torch.nn.functional.interpolate(semantic[:, :4], size=(16, 16), mode="nearest")  # decodable from effnet
    text = encode_captions(build_text_encoder(TINY_TEXT_CONFIG, seed=0), ["a shape"] * 32)
    run = RunConfig(steps=80, batch_size=8, lr=2e-3, warmup=10)
    trained = train_stage_b(stage_a, semantic, text, STAGE_B_TINY, run, progress=False)
    assert sum(trained.losses[-10:]) / 10 < 0.8 * sum(trained.losses[:10]) / 10


def test_stage_b_drops_its_caption_and_its_effnet_conditioning_at_the_reference_s_rates(monkeypatch):
    """Captions go to "" 5 % of the time and the semantic (effnet) latent to zeros 10 %, each drawn per sample
    (the reference's dropouts): counted over 2,400 samples, the rates land near those, not at 0."""
    from cascade.train import stages

    g = torch.Generator().manual_seed(0)
    semantic = torch.randn(8, 16, 4, 4, generator=g) + 3.0  # never all zeros by chance
    stage_a = torch.zeros(8, 4, 16, 16)
    text = encode_captions(build_text_encoder(TINY_TEXT_CONFIG, seed=0), ["a red circle"] * 8)
    seen = []
    # Only the conditioning is looked at: no model pass, no gradient (the draws do not depend on either).
    look = lambda model, x0, conditions, *a: seen.append(conditions) or (x0, x0.sum())  # noqa: E731
    monkeypatch.setattr(stages, "diffusion_loss", look)
    monkeypatch.setattr(torch.Tensor, "backward", lambda self, *a, **k: None)
    train_stage_b(stage_a, semantic, text, STAGE_B_TINY, RunConfig(steps=150, batch_size=16, warmup=1), progress=False)
    effnet = torch.cat([c["effnet"] for c in seen])
    pooled = torch.cat([c["clip"] for c in seen])
    zeroed = (effnet.abs().amax(dim=(1, 2, 3)) == 0).float().mean()
    empty = ((pooled - text.empty_pooled).abs().amax(dim=(1, 2)) == 0).float().mean()
    assert 0.07 < zeroed < 0.13 and 0.03 < empty < 0.07, (float(zeroed), float(empty))


def spy_on_loss(monkeypatch, condition: str) -> list:
    """Each batch a trainer passes to its loss, as (x0's first value per sample, `condition` per sample)."""
    from cascade.train import stages

    seen, real_loss = [], stages.diffusion_loss

    def spy(model, x0, conditions, loss_weight, generator):
        seen.append((x0[:, 0, 0, 0].clone(), conditions[condition].clone()))
        return real_loss(model, x0, conditions, loss_weight, generator)

    monkeypatch.setattr(stages, "diffusion_loss", spy)
    return seen


def test_stage_b_decodes_general_images_with_the_empty_caption(monkeypatch):
    """Uncaptioned images (`shapes.make_general`) join Stage B's data with the empty caption's pooled embedding."""
    g = torch.Generator().manual_seed(0)
    semantic = torch.randn(8, 16, 4, 4, generator=g)
    stage_a = torch.zeros(8, 4, 16, 16)  # captioned images' latents are 0, the general images' 7: told apart below
    general = (torch.full((8, 4, 16, 16), 7.0), torch.randn(8, 16, 4, 4, generator=g))
    text = encode_captions(build_text_encoder(TINY_TEXT_CONFIG, seed=0), ["a red circle"] * 8)
    seen = spy_on_loss(monkeypatch, "clip")
    train_stage_b(stage_a, semantic, text, STAGE_B_TINY, RunConfig(steps=6, batch_size=8, warmup=1), general=general)
    values = torch.cat([v for v, _ in seen])
    pooled = torch.cat([p for _, p in seen])
    is_general = values == 7.0
    assert 0 < int(is_general.sum()) < len(values)  # both kinds are drawn
    assert torch.equal(pooled[is_general], text.empty_pooled.expand(int(is_general.sum()), -1, -1))
    captioned = pooled[~is_general]
    kept = (captioned - text.pooled[:1]).abs().amax(dim=(1, 2)) == 0  # most keep their caption (5 % dropout)
    assert int(kept.sum()) > len(captioned) // 2


def test_stage_c_draws_a_share_of_general_images_with_their_own_captions(monkeypatch):
    """General images (`shapes.colourless_captions`) join a quarter of Stage C's samples, each with its own caption;
    the captions' 5 % dropout to "" applies to both kinds."""
    encoder = build_text_encoder(TINY_TEXT_CONFIG, seed=0)
    text = encode_captions(encoder, ["a large red circle in the center"] * 8)
    general_text = encode_captions(encoder, ["a large circle in the center"] * 8)
    latents, general_latents = torch.zeros(8, 16, 4, 4), torch.full((8, 16, 4, 4), 7.0)  # told apart below
    seen = spy_on_loss(monkeypatch, "clip_text_pooled")
    run = RunConfig(steps=12, batch_size=16, warmup=1)
    train_stage_c(latents, text, STAGE_C_TINY, run, progress=False, general=(general_latents, general_text))
    values, pooled = torch.cat([v for v, _ in seen]), torch.cat([p for _, p in seen])
    is_general = values == 7.0
    assert 0.1 < is_general.float().mean() < 0.45, is_general.float().mean()  # about GENERAL_SHARE_C of 192
    own = torch.where(is_general.view(-1, 1, 1), general_text.pooled[:1], text.pooled[:1])
    matches = (pooled - own).abs().amax(dim=(1, 2)) == 0
    dropped = (pooled - text.empty_pooled).abs().amax(dim=(1, 2)) == 0
    assert bool((matches | dropped).all()) and int(matches.sum()) > 0.8 * len(values)
    assert 0.01 < dropped.float().mean() < 0.12, dropped.float().mean()  # about CAPTION_DROPOUT (5 %) of 192
    assert bool(matches[is_general].any()) and bool(matches[~is_general].any())


@pytest.mark.parametrize("stage", ["stage_c", "stage_b"])
def test_a_trainer_starts_from_its_run_seed_whatever_the_process_drew_before(stage):
    """A stage's starting weights come from its run's seed: `all` (stages one after another in one process) and one
    command per stage train the same weights."""
    g = torch.Generator().manual_seed(0)
    semantic = torch.randn(8, 16, 4, 4, generator=g)
    text = encode_captions(build_text_encoder(TINY_TEXT_CONFIG, seed=0), ["a red circle"] * 8)

    def weights(run: RunConfig) -> dict:
        if stage == "stage_c":
            trained = train_stage_c(semantic, text, STAGE_C_TINY, run, progress=False)
        else:
            trained = train_stage_b(torch.randn(8, 4, 16, 16, generator=g.manual_seed(1)), semantic, text,
                                    STAGE_B_TINY, run, progress=False)  # fmt: skip
        return trained.modules[stage].state_dict()

    run = RunConfig(steps=1, batch_size=4, warmup=1)
    first = weights(run)
    torch.rand(7)  # the process's generator moved on, as after an earlier stage
    again, other = weights(run), weights(RunConfig(steps=1, batch_size=4, warmup=1, seed=1))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
