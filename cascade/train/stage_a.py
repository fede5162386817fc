"""Train Stage A, the f4 VQGAN, as the reference's VQGAN: reconstruction through a vector-quantised bottleneck.

The losses: the pixel MSE of decode(quantise(encode(x))) with a straight-through gradient past the quantiser, the
codebook loss (codebook vectors pulled to the encoder's outputs) and the commitment loss (the encoder pulled to its
codebook vectors, weight 0.25). The reference's VQGAN adds a perceptual (LPIPS) and an adversarial loss for natural
photographs' texture; LPIPS needs ImageNet-trained VGG weights that cannot be downloaded here, and flat synthetic
shapes reconstruct sharply from pixel losses alone, so neither is used (docs/TRAINING.md).

Most samples (80 %) skip the quantiser: at inference Stage A decodes Stage B's continuous latents without
quantising (as Stable Cascade does), so that is the path that must be sharp. Those continuous latents also get a
random amount of Gaussian noise (up to 0.2 of their standard deviation): Stage B's sampled latents are never exactly
an encoder's output, and a decoder trained only on exact latents turned small latent errors into wrong colours and
shapes (measured: noise of 0.3 std took the checker's colour accuracy from 100 % to 44 %; docs/TRAINING.md).

The codebook starts from encoder outputs (the first batch's latents) rather than the reference's tiny uniform
values: with a small data set, codes initialised far from every latent are never chosen and stay dead.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..stage_a import StageA, StageAConfig
from .loop import RunConfig, Trained, fit
from .shapes import ShapesData

COMMITMENT = 0.25
QUANTISED = 0.2  # the share of samples decoded through the quantiser; the rest decode their continuous latents
LATENT_NOISE = 0.2  # the most Gaussian noise (in latent standard deviations) the continuous ones are trained under


def vq_losses(
    model: StageA,
    images: torch.Tensor,
    quantize: torch.Tensor,
    noise_level: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstruction MSE, codebook + commitment loss). quantize: (B,) bool, which samples pass the quantiser;
    noise_level: (B, 1, 1, 1) or None, the Gaussian noise added to the continuous samples' latents, in units of their
    std (drawn from `generator`)."""
    z = model.down_blocks(model.in_block(images))  # (B, c_latent, H/4, W/4), before the scale factor
    z_q, _ = model.vquantizer(z)
    codebook = F.mse_loss(z_q, z.detach()) + COMMITMENT * F.mse_loss(z, z_q.detach())
    straight = z + (z_q - z).detach()  # the quantised values forward, the encoder's gradient backward
    continuous = z
    if noise_level is not None:
        continuous = z + noise_level * torch.randn(z.shape, generator=generator) * z.detach().std()
    latent = torch.where(quantize.view(-1, 1, 1, 1), straight, continuous)
    recon = model.out_block(model.up_blocks(latent))
    return F.mse_loss(recon, images), codebook


@torch.no_grad()
def _seed_codebook(model: StageA, images: torch.Tensor, generator: torch.Generator) -> None:
    z = model.down_blocks(model.in_block(images))
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    pick = torch.randint(flat.shape[0], (model.config.codebook_size,), generator=generator)
    model.vquantizer.codebook.weight.copy_(flat[pick])


def train_stage_a(
    data: ShapesData,
    config: StageAConfig,
    run: RunConfig,
    checkpoint: Path | None = None,
    progress: bool = True,
    general: torch.Tensor | None = None,
) -> Trained:
    """`general`: uncaptioned images (`shapes.make_general`) drawn as often as the data set's own."""
    torch.manual_seed(run.seed)  # starting weights from the run's seed, not the process's history
    model = StageA(config)
    _seed_codebook(model, data.images[:256], torch.Generator().manual_seed(run.seed))
    pool = data.images if general is None else torch.cat([data.images, general])

    def step(generator: torch.Generator, _) -> torch.Tensor:
        images = pool[torch.randint(len(pool), (run.batch_size,), generator=generator)]
        quantize = torch.rand(run.batch_size, generator=generator) < QUANTISED
        level = torch.rand(run.batch_size, 1, 1, 1, generator=generator) * LATENT_NOISE
        recon, codebook = vq_losses(model, images, quantize, level, generator)
        return recon + codebook

    return fit({"stage_a": model}, step, run, checkpoint, None, "Stage A", progress)


@torch.no_grad()
def latent_scale(model: StageA, images: torch.Tensor) -> float:
    """The scale factor that gives the encoded latents unit standard deviation, what Stage B's diffusion expects
    (the official 0.43 plays this role for the official Stage A)."""
    model.eval()
    z = torch.cat([model.down_blocks(model.in_block(images[i : i + 256])) for i in range(0, len(images), 256)])
    return float(z.std())


def with_scale(model: StageA, scale: float) -> StageA:
    """The same weights with `scale_factor` set (the config is frozen, so a new module)."""
    config = StageAConfig(**{**model.config.__dict__, "scale_factor": scale})
    scaled = StageA(config)
    scaled.load_state_dict(model.state_dict())
    return scaled.eval()
