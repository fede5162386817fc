"""A small semantic encoder: the stand-in for the EfficientNetV2-S encoder in a family trained from scratch.

Stage C's latent space is whatever the semantic encoder produces; Stage B learns to expand it back into a Stage A
latent. The official family uses an ImageNet-trained EfficientNetV2-S (20 M parameters, stride 32), frozen. A family
trained here cannot download ImageNet weights, and its images are small (64 px), so it uses this encoder instead:
a few stride-2 conv stages and the official mapper (1x1 conv to 16 channels, then BatchNorm without affine, so the
latent is about N(0, 1) per channel, what Stage C's diffusion expects). It is trained once as an autoencoder with a
small `Previewer` as its decoder (cascade.train.semantic), then frozen; that previewer doubles as the family's
preview of Stage C latents, as the official previewer does.

Same interface as EfficientNetEncoder: `encode(images in [0, 1]) -> (b, c_latent, H / stride, W / stride)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class SemanticEncoderConfig:
    c_latent: int = 16
    c_hidden: tuple[int, ...] = (32, 64, 96, 128)  # one stride-2 stage each: stride = 2 ** len(c_hidden)

    @property
    def stride(self) -> int:
        return 2 ** len(self.c_hidden)


class SemanticEncoder(nn.Module):
    def __init__(self, config: SemanticEncoderConfig = SemanticEncoderConfig()):
        super().__init__()
        self.config = config
        stages, c_in = [], 3
        for c in config.c_hidden:
            stages.append(
                nn.Sequential(
                    nn.Conv2d(c_in, c, kernel_size=3, stride=2, padding=1),
                    nn.BatchNorm2d(c),
                    nn.GELU(),
                    nn.Conv2d(c, c, kernel_size=3, padding=1),
                    nn.BatchNorm2d(c),
                    nn.GELU(),
                )
            )
            c_in = c
        self.backbone = nn.Sequential(*stages)
        # The official mapper: keys `mapper.0.weight`, `mapper.1.running_*`.
        self.mapper = nn.Sequential(
            nn.Conv2d(c_in, config.c_latent, kernel_size=1, bias=False), nn.BatchNorm2d(config.c_latent, affine=False)
        )

    @property
    def stride(self) -> int:  # image pixels per latent pixel
        return self.config.stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mapper(self.backbone(x))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(b, 3, H, W) RGB in [0, 1] -> (b, c_latent, H / stride, W / stride)."""
        return self(images * 2 - 1)
