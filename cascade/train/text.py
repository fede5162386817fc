"""Train the family's text encoder contrastively, as CLIP was: each caption against its own image, in a batch.

The demo family's text encoder (cascade.train.demo, TEXT) is trained this way, then frozen while Stages B and C
train. Measured against the alternative, the same small CLIP text model left random and frozen, it lifts Stage C's
held-out colour from 74 to 92 % (docs/TRAINING.md). The image side is the frozen semantic encoder's latent (what
Stage C generates), flattened, through a linear head to the text projection's width; the head is training-only. The
loss is CLIP's symmetric cross-entropy over the batch's caption-image similarities, with its learned temperature
(logit scale starting at log(1 / 0.07), clamped at 100). Captions of the same attribute combination in a batch are
each other's positives too (shared target weight), since their images differ only by jitter.

Stage C reads the encoder's last hidden states and its pooled projection, so both are trained: the pooled one
directly, the hidden states through it.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..text import TextEncoder
from .loop import RunConfig, Trained, fit
from .shapes import ShapesData, make_dataset


class ImageHead(nn.Module):
    """The semantic latent, flattened, to the text projection's width; and CLIP's learned temperature."""

    def __init__(self, latent_values: int, width: int):
        super().__init__()
        self.proj = nn.Linear(latent_values, width)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.proj(latents.flatten(1))


def clip_loss(text: torch.Tensor, images: torch.Tensor, logit_scale: torch.Tensor, groups: torch.Tensor):
    """Symmetric cross-entropy of the (n, n) cosine similarities; samples of one group are all positives."""
    text, images = F.normalize(text, dim=-1), F.normalize(images, dim=-1)
    logits = logit_scale.clamp(max=math.log(100)).exp() * text @ images.T
    same = (groups[:, None] == groups[None, :]).float()
    target = same / same.sum(dim=1, keepdim=True)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def train_text_encoder(
    encoder: TextEncoder,
    data: ShapesData,
    latents: torch.Tensor,
    run: RunConfig,
    checkpoint: Path | None = None,
    progress: bool = True,
) -> Trained:
    """Fit `encoder` (in place; its EMA is what to keep) to `data`'s captions against `latents`, their images'
    semantic latents (N, 16, h, w)."""
    combos: dict = {}  # attribute combination -> group id
    groups = torch.tensor([combos.setdefault(a, len(combos)) for a in data.attributes])
    torch.manual_seed(run.seed)  # the head's starting weights from the run's seed
    head = ImageHead(latents[0].numel(), encoder.model.config.projection_dim)
    encoder.model.requires_grad_(True).train()

    def step(generator: torch.Generator, _) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(data), (run.batch_size,), generator=generator)
        text = encoder([data.captions[i] for i in idx.tolist()]).clip_text_pooled[:, 0].float()
        loss = clip_loss(text, head(latents[idx]), head.logit_scale, groups[idx])
        return loss, loss

    return fit({"text_encoder": encoder.model, "image_head": head}, step, run, checkpoint, None, "text encoder",
               progress)  # fmt: skip


@torch.no_grad()
def retrieval_accuracy(encoder: TextEncoder, head: ImageHead, captions: list[str], latents: torch.Tensor) -> float:
    """How often a caption's most similar image (among `latents`) is its own: a check that training took."""
    encoder.eval()
    text = F.normalize(encoder.encode(captions).clip_text_pooled[:, 0].float(), dim=-1)
    images = F.normalize(head(latents), dim=-1)
    return (text @ images.T).argmax(dim=1).eq(torch.arange(len(captions))).float().mean().item()


def heldout_retrieval(encoder: TextEncoder, head: ImageHead, semantic, size: int, seed: int = 7) -> float:
    """Retrieval among one render of each held-out attribute combination (never seen in training)."""
    held = make_dataset(200, size, seed=seed, split="heldout")
    one = list({a: i for i, a in enumerate(held.attributes)}.values())
    with torch.no_grad():
        latents = semantic.encode(held.images[one])
    return retrieval_accuracy(encoder, head, [held.captions[i] for i in one], latents)
