"""Trainers for the two diffusion stages, with the reference's objective and conditioning dropouts.

Both train on tensors computed once up front with the frozen encoders (the reference computes them per batch under
no_grad; with a fixed, small data set precomputing is the same maths and several times faster on a CPU):

- Stage C (the prior) denoises semantic latents, conditioned on the caption's CLIP hidden states and pooled
  embedding, and a CLIP image embedding that is zeros here (the reference feeds one for 10 % of samples; a family
  trained from scratch has no image CLIP). Captions are replaced by "" for 5 % of samples, which is what makes
  classifier-free guidance work at sampling time.
- Stage B (the decoder) denoises Stage A latents, conditioned on the semantic latent of the same image (zeroed for
  10 % of samples) and the pooled caption embedding ("" for 5 %).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..stage_b import StageB, StageBConfig
from ..stage_c import StageC, StageCConfig
from ..text import TextEncoder
from .loop import RunConfig, Trained, fit
from .objective import AdaptiveLossWeight, diffusion_loss

CAPTION_DROPOUT = 0.05  # the reference: captions -> "" for 5 % (Stages B and C)
EFFNET_DROPOUT = 0.10  # the reference: Stage B's effnet conditioning zeroed for 10 %
GENERAL_SHARE_C = 0.25  # Stage C: the share of each batch drawn from general images (captioned without a colour)


@dataclass
class TextTensors:
    """A data set's captions through the frozen text encoder, and the empty caption's ("" : the unconditional)."""

    clip_text: torch.Tensor  # (N, 77, hidden)
    pooled: torch.Tensor  # (N, 1, projection)
    empty_text: torch.Tensor  # (1, 77, hidden)
    empty_pooled: torch.Tensor  # (1, 1, projection)


@torch.no_grad()
def batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """fn over x in batches (an encoder over a whole data set), concatenated."""
    return torch.cat([fn(x[i : i + batch]) for i in range(0, len(x), batch)])


@torch.no_grad()
def encode_captions(text_encoder: TextEncoder, captions: list[str], batch: int = 256) -> TextTensors:
    text_encoder.eval()
    parts = [text_encoder.encode(captions[i : i + batch]) for i in range(0, len(captions), batch)]
    empty = text_encoder.encode([""])
    return TextTensors(
        torch.cat([p.clip_text for p in parts]).float(),
        torch.cat([p.clip_text_pooled for p in parts]).float(),
        empty.clip_text.float(),
        empty.clip_text_pooled.float(),
    )


def _drop(values: torch.Tensor, replacement: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Replace each sample's `values` by `replacement` with probability p."""
    mask = (torch.rand(values.shape[0], generator=generator) < p).view(-1, *[1] * (values.dim() - 1))
    return torch.where(mask, replacement.expand_as(values), values)


def train_stage_c(
    latents: torch.Tensor,
    text: TextTensors,
    config: StageCConfig,
    run: RunConfig,
    checkpoint: Path | None = None,
    progress: bool = True,
    general: tuple[torch.Tensor, TextTensors] | None = None,
) -> Trained:
    """latents: (N, 16, h, w) semantic latents of the images whose captions `text` holds. `general`: semantic latents
    of general images and their captions without a colour (`shapes.colourless_captions`); each sample of a batch is
    one of those with probability `GENERAL_SHARE_C`."""
    torch.manual_seed(run.seed)  # starting weights from the run's seed, not the process's history
    model = StageC(config)
    clip_img = torch.zeros(run.batch_size, 1, config.c_clip_img)

    def step(generator: torch.Generator, loss_weight: AdaptiveLossWeight) -> torch.Tensor:
        idx = torch.randint(latents.shape[0], (run.batch_size,), generator=generator)
        x0, clip_text, pooled = latents[idx], text.clip_text[idx], text.pooled[idx]
        if general is not None:
            general_latents, general_text = general
            gidx = torch.randint(general_latents.shape[0], (run.batch_size,), generator=generator)
            use = (torch.rand(run.batch_size, generator=generator) < GENERAL_SHARE_C).view(-1, 1, 1)
            x0 = torch.where(use.unsqueeze(-1), general_latents[gidx], x0)
            clip_text = torch.where(use, general_text.clip_text[gidx], clip_text)
            pooled = torch.where(use, general_text.pooled[gidx], pooled)
        keep = (torch.rand(run.batch_size, generator=generator) >= CAPTION_DROPOUT).view(-1, 1, 1)
        clip_text = torch.where(keep, clip_text, text.empty_text)
        pooled = torch.where(keep, pooled, text.empty_pooled)
        conditions = {"clip_text": clip_text, "clip_text_pooled": pooled, "clip_img": clip_img}
        mse, adjusted = diffusion_loss(model, x0, conditions, loss_weight, generator)
        return adjusted, mse.mean()

    return fit({"stage_c": model}, step, run, checkpoint, AdaptiveLossWeight(), "Stage C", progress)


def train_stage_b(
    stage_a_latents: torch.Tensor,
    semantic_latents: torch.Tensor,
    text: TextTensors,
    config: StageBConfig,
    run: RunConfig,
    checkpoint: Path | None = None,
    progress: bool = True,
    general: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Trained:
    """stage_a_latents: (N, 4, H/4, W/4) (Stage A's encode, scaled as at inference); semantic_latents: (N, 16, h, w)
    of the same images; text: their captions. `general`: (Stage A latents, semantic latents) of uncaptioned images
    (`shapes.make_general`), decoded with the empty caption, as the official Stage B is a decoder of any image."""
    torch.manual_seed(run.seed)  # starting weights from the run's seed, not the process's history
    model = StageB(config)
    pooled_all = text.pooled
    if general is not None:
        stage_a_latents = torch.cat([stage_a_latents, general[0]])
        semantic_latents = torch.cat([semantic_latents, general[1]])
        pooled_all = torch.cat([pooled_all, text.empty_pooled.expand(len(general[0]), -1, -1)])

    def step(generator: torch.Generator, loss_weight: AdaptiveLossWeight) -> torch.Tensor:
        idx = torch.randint(stage_a_latents.shape[0], (run.batch_size,), generator=generator)
        effnet = semantic_latents[idx]
        effnet = _drop(effnet, torch.zeros_like(effnet[:1]), EFFNET_DROPOUT, generator)
        pooled = _drop(pooled_all[idx], text.empty_pooled, CAPTION_DROPOUT, generator)
        conditions = {"effnet": effnet, "clip": pooled}
        mse, adjusted = diffusion_loss(model, stage_a_latents[idx], conditions, loss_weight, generator)
        return adjusted, mse.mean()

    return fit({"stage_b": model}, step, run, checkpoint, AdaptiveLossWeight(), "Stage B", progress)
