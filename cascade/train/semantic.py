"""Train the semantic encoder (the family's Stage C latent space) as an autoencoder with a small Previewer decoder.

The loss is the MSE between the previewer's reconstruction (8x the latent grid: 32 px for a 64 px image's 4 x 4
latent) and the image averaged down to that size. A 16 x 4 x 4 latent cannot hold the pixels, so it learns what a
32 px thumbnail needs: the colours, the shape's outline, where it is, how large, and the background, which is what
Stage C must generate from the caption and Stage B must expand.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..previewer import Previewer, PreviewerConfig
from ..semantic import SemanticEncoder, SemanticEncoderConfig
from .loop import RunConfig, Trained, fit
from .shapes import ShapesData


def train_semantic(
    data: ShapesData,
    run: RunConfig,
    checkpoint: Path | None = None,
    config: SemanticEncoderConfig = SemanticEncoderConfig(),
    preview_hidden: int = 64,
    progress: bool = True,
) -> Trained:
    encoder = SemanticEncoder(config)
    previewer = Previewer(PreviewerConfig(c_in=config.c_latent, c_hidden=preview_hidden))

    def step(generator: torch.Generator, _) -> torch.Tensor:
        images = data.images[torch.randint(len(data), (run.batch_size,), generator=generator)]
        recon = previewer(encoder.encode(images))
        return F.mse_loss(recon, F.interpolate(images, size=recon.shape[-2:], mode="area"))

    return fit({"encoder": encoder, "previewer": previewer}, step, run, checkpoint, None, "semantic encoder", progress)
