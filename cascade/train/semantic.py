"""Train the semantic encoder (the family's Stage C latent space) as an autoencoder with a small Previewer decoder.

The loss is the MSE between the previewer's reconstruction (8x the latent grid: 32 px for a 64 px image's 4 x 4
latent) and the image averaged down to that size. A 16 x 4 x 4 latent cannot hold the pixels, so it learns what a
32 px thumbnail needs: the colours, the shape's outline, where it is, how large, and the background, which is what
Stage C must generate from the caption and Stage B must expand.

The preview MSE alone gives a small shape's outline little weight (a few pixels of a 32 px thumbnail), and a latent
trained that way carried colour and place but not shape (the checker read the right shape off 32 % of its previews).
The official semantic encoder is an ImageNet classifier's features: its latent is semantic because it was trained on
labels. This one is too: a linear probe on the flattened latent classifies each image's attributes (shape, colour,
position, size, background, from the data set's labels), and its cross-entropy is added to the preview loss
(weight `PROBE_WEIGHT`). The probe only shapes the latent space; it is not part of the family.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..previewer import Previewer, PreviewerConfig
from ..semantic import SemanticEncoder, SemanticEncoderConfig
from .loop import RunConfig, Trained, fit
from .shapes import ATTRIBUTES, ShapesData, labels

PROBE_WEIGHT = 0.01  # the attribute probe's cross-entropy against the preview MSE (about 0.004 when trained)


class AttributeProbe(nn.Module):
    """One linear classifier per attribute on the flattened semantic latent (training only)."""

    def __init__(self, latent_values: int):
        super().__init__()
        self.heads = nn.ModuleDict({name: nn.Linear(latent_values, len(v)) for name, v in ATTRIBUTES.items()})

    def forward(self, latents: torch.Tensor) -> dict[str, torch.Tensor]:
        flat = latents.flatten(1)
        return {name: head(flat) for name, head in self.heads.items()}


def train_semantic(
    data: ShapesData,
    run: RunConfig,
    checkpoint: Path | None = None,
    config: SemanticEncoderConfig = SemanticEncoderConfig(),
    preview_hidden: int = 64,
    progress: bool = True,
    general: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None,
) -> Trained:
    """`general`: uncaptioned images in any colour and their labels (`shapes.make_general`), drawn as often as the
    data set's own images."""
    torch.manual_seed(run.seed)  # starting weights from the run's seed, not the process's history
    encoder = SemanticEncoder(config)
    previewer = Previewer(PreviewerConfig(c_in=config.c_latent, c_hidden=preview_hidden))
    grid = data.images.shape[-1] // config.stride
    probe = AttributeProbe(config.c_latent * grid * grid)
    images_all, targets = data.images, labels(data.attributes)
    if general is not None:
        images_all = torch.cat([images_all, general[0]])
        targets = {name: torch.cat([targets[name], general[1][name]]) for name in ATTRIBUTES}

    def step(generator: torch.Generator, _) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(images_all), (run.batch_size,), generator=generator)
        images = images_all[idx]
        latents = encoder.encode(images)
        recon = previewer(latents)
        preview = F.mse_loss(recon, F.interpolate(images, size=recon.shape[-2:], mode="area"))
        logits = probe(latents)
        probe_loss = sum(
            F.cross_entropy(logits[name], targets[name][idx])  # -100 (a general image's colour): no loss
            for name in ATTRIBUTES
            if (targets[name][idx] >= 0).any()
        )
        return preview + PROBE_WEIGHT * probe_loss, preview  # minimised, reported

    modules = {"encoder": encoder, "previewer": previewer, "probe": probe}
    return fit(modules, step, run, checkpoint, None, "semantic encoder", progress)
