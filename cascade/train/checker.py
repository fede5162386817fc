"""The independent judge of generated images: a small CNN trained on ground-truth renders of every combination.

It never sees a generated image in training and shares no weights or code path with the generator, so its verdict
on a generated image ("is this a red circle in the top left?") is an outside check of prompt following. Three heads
classify colour, shape and position; background and size are left to the eye (the contact sheet).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .shapes import ATTRIBUTES, Attributes, render, sample_attributes
from .shapes import labels as attribute_labels

HEADS = {name: ATTRIBUTES[name] for name in ("colour", "shape", "position")}


class Checker(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        layers, c_in = [], 3
        for c in (width, width * 2, width * 4, width * 4):
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.heads = nn.ModuleDict({name: nn.Linear(c_in * 4, len(labels)) for name, labels in HEADS.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images (B, 3, H, W) in [0, 1], any H = W from 32 up -> logits per head."""
        features = self.features(images * 2 - 1)
        return {name: head(features) for name, head in self.heads.items()}


def labels(attributes: Sequence[Attributes]) -> dict[str, torch.Tensor]:
    return attribute_labels(attributes, HEADS)


def _batch(rng: random.Random, n: int, size: int) -> tuple[torch.Tensor, list[Attributes]]:
    attributes = [sample_attributes(rng, rng.choice(("train", "heldout"))) for _ in range(n)]
    pixels = [torch.from_numpy(np.array(render(a, size, rng.randrange(2**31)))) for a in attributes]
    images = torch.stack(pixels).permute(0, 3, 1, 2).float() / 255
    # Generated images are blurrier and noisier than renders: train on both, so the judge reads the outline a person
    # would and is not fooled by texture. A third of the batches stay sharp, a third get a 3x3 box blur, a third go
    # through half resolution and back (about what Stage A's MSE-trained decoder does to a small shape's corners).
    blur = rng.randrange(3)
    if blur == 1:
        images = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    elif blur == 2:
        half = F.interpolate(images, scale_factor=0.5, mode="area")
        images = F.interpolate(half, size=images.shape[-2:], mode="bilinear", align_corners=False)
    images = images + torch.randn(images.shape, generator=torch.Generator().manual_seed(rng.randrange(2**31))) * 0.03
    return images.clamp(0, 1), attributes


def train_checker(size: int = 64, steps: int = 600, batch: int = 64, seed: int = 0, progress=None) -> Checker:
    """Train on fresh ground-truth renders of all combinations (held-out pairs included: the judge must know them)."""
    torch.manual_seed(seed)
    rng = random.Random(f"checker:{seed}")
    model = Checker()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    model.train()
    for step in range(steps):
        images, attributes = _batch(rng, batch, size)
        logits, target = model(images), labels(attributes)
        loss = sum(F.cross_entropy(logits[name], target[name]) for name in HEADS)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress is not None:
            progress(step + 1, steps, float(loss))
    return model.eval()


@dataclass
class Verdict:
    accuracy: dict[str, float]  # per head, over the images
    correct: dict[str, list[bool]]  # per head, per image

    @property
    def all_correct(self) -> float:
        per_image = zip(*self.correct.values())
        flags = [all(c) for c in per_image]
        return sum(flags) / len(flags) if flags else 0.0


@torch.no_grad()
def judge(checker: Checker, images: torch.Tensor, attributes: Sequence[Attributes]) -> Verdict:
    """Does each image show its attributes? images (B, 3, H, W) in [0, 1]."""
    checker.eval()
    logits, target = checker(images.float()), labels(attributes)
    correct = {name: (logits[name].argmax(1) == target[name]).tolist() for name in HEADS}
    return Verdict({name: sum(c) / len(c) for name, c in correct.items()}, correct)
