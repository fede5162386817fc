"""Checks that need the official weights (CASCADE_WEIGHTS=folder) or a GPU; they skip cleanly elsewhere."""

import os

import numpy as np
import pytest
import torch

from cascade import Request, generate, load_models, tiny_models

SMALL = dict(width=256, height=256, prior_steps=3, decoder_steps=2)


@pytest.mark.gpu
def test_tiny_model_on_cuda_matches_cpu():
    request = [Request("a red circle", seed=5, **SMALL)]
    cpu = np.asarray(generate(tiny_models(), request)[0].image, dtype=int)
    gpu = np.asarray(generate(tiny_models(device="cuda"), request)[0].image, dtype=int)
    # Same CPU-drawn noise, fp32 on both: only kernel rounding differs.
    assert np.abs(cpu - gpu).mean() < 2.0


@pytest.mark.gpu
@pytest.mark.weights
@pytest.mark.slow
def test_official_weights_make_a_picture():
    models = load_models(os.environ["CASCADE_WEIGHTS"], dtype=torch.bfloat16, device="cuda")
    result = generate(models, [Request("a photo of a red apple on a wooden table", seed=1)])[0]
    assert result.error is None
    image = np.asarray(result.image, dtype=float)
    assert image.shape == (1024, 1024, 3)
    # A real picture has structure: neighbouring pixels correlate strongly, unlike noise.
    gray = image.mean(axis=2)
    correlation = np.corrcoef(gray[:, :-1].ravel(), gray[:, 1:].ravel())[0, 1]
    assert correlation > 0.8
    red, green = image[..., 0].mean(), image[..., 1].mean()
    assert red > green  # the prompt asked for a red apple
