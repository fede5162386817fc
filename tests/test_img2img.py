"""img2img: Stage C starts from the EfficientNet latent of an image, noised to t = strength (the sampler's t_start)."""

import pytest
import torch
from PIL import Image

from cascade import Request, gdf, generate, run_prior, tiny_models
from cascade.pipeline import PRIOR_SHIFT, effnet_latents, stage_generator

SMALL = dict(width=256, height=256, prior_steps=3, decoder_steps=2)


@pytest.fixture(scope="module")
def models():
    return tiny_models(with_effnet=True)


def picture(color):
    return Image.new("RGB", (300, 200), color)


def test_stage_c_starts_from_the_noised_image_latent(models):
    seen = []
    hook = models.stage_c.register_forward_pre_hook(
        lambda module, args: seen.append((args[0].clone(), args[1].clone()))
    )
    # cfg 1: one model call per step; 10 steps asked at strength 0.6 run 6, from t = 0.6 (the reference's
    # int(steps * noise_level): the step size of a whole 10-step run)
    request = Request("a red circle", seed=4, prior_cfg=1.0, **{**SMALL, "prior_steps": 10})
    try:
        run_prior(models, [request], [picture("red")], strength=0.6)
    finally:
        hook.remove()
    x_first, r_first = seen[0]
    # The first step sees the image latent noised at t = 0.6 with the request's first noise draw...
    latent = effnet_latents(models, [picture("red")], (6, 6))
    noise = gdf.randn((16, 6, 6), [stage_generator(4, "stage_c")])
    torch.testing.assert_close(x_first, gdf.diffuse(latent, 0.6, noise, shift=1.0))
    # ...and the noise level r of t_start = 0.6 on Stage C's shifted schedule, not r(1).
    expected_r = gdf.noise_cond(gdf.log_snr(torch.tensor([0.6]), PRIOR_SHIFT))
    torch.testing.assert_close(r_first, expected_r)
    assert len(seen) == 6
    steps_t = torch.linspace(0.6, 0.0, 7)[:-1]  # t of each step: 0.6, 0.5, ... 0.1
    expected = gdf.noise_cond(gdf.log_snr(steps_t, PRIOR_SHIFT))
    torch.testing.assert_close(torch.cat([r for _, r in seen]), expected)
    # A strength whose share of the steps rounds to none still runs one.
    seen.clear()
    hook = models.stage_c.register_forward_pre_hook(lambda module, args: seen.append(args[1].clone()))
    try:
        run_prior(models, [request], [picture("red")], strength=0.05)
    finally:
        hook.remove()
    assert len(seen) == 1


def test_the_init_image_matters_and_results_are_deterministic(models):
    request = [Request("a red circle", seed=4, **SMALL)]
    red = run_prior(models, request, [picture("red")])[0].latent
    blue = run_prior(models, request, [picture("blue")])[0].latent
    assert not torch.allclose(red, blue)
    torch.testing.assert_close(run_prior(models, request, [picture("red")])[0].latent, red, rtol=0, atol=0)


def test_generate_with_init_images(models):
    results = generate(
        models,
        [Request("a", seed=1, **SMALL), Request("b", seed=2, **SMALL)],
        init_images=[picture("red"), picture("green")],
        strength=0.5,
    )
    assert all(r.error is None and r.image.size == (256, 256) for r in results)


def test_img2img_errors(models):
    request = [Request("a", **SMALL)]
    with pytest.raises(ValueError, match=r"strength: 0 is not allowed; use a number in \(0, 1\]"):
        run_prior(models, request, [picture("red")], strength=0)
    with pytest.raises(ValueError, match="2 images for 1 requests"):
        run_prior(models, request, [picture("red"), picture("red")])
    with pytest.raises(ValueError, match=r"needs the family.s semantic encoder \(effnet_encoder.safetensors"):
        run_prior(tiny_models(), request, [picture("red")])
