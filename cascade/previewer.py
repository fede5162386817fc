"""The Previewer: a small conv decoder from Stage C's 16-channel EfficientNet latents to a low-resolution RGB preview.

References:
- Stability-AI/StableCascade `modules/previewer.py` (architecture; the keys `blocks.{0..24}` of previewer.safetensors).

16 x 24 x 24 -> 3 x 192 x 192 (8x upsampling), output roughly in [0, 1] (not clamped).
"""

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class PreviewerConfig:
    c_in: int = 16
    c_hidden: int = 512
    c_out: int = 3

    def __post_init__(self):
        if self.c_hidden % 4:
            raise ValueError(f"PreviewerConfig.c_hidden must be divisible by 4, got {self.c_hidden}")


class Previewer(nn.Module):
    """(b, c_in, h, w) latents -> (b, c_out, 8h, 8w) RGB.

    One flat `blocks` Sequential, as the checkpoint: every conv but the last is followed by GELU then BatchNorm2d,
    so convs sit at indices 0, 3, 6, ..., 21 and the final 1x1 conv at 24.
    """

    def __init__(self, config: PreviewerConfig):
        super().__init__()
        self.config = config
        c = config.c_hidden
        # (conv, c_out of the conv), each followed by GELU + BatchNorm2d; ConvTranspose2d k2 s2 doubles the resolution.
        convs = [
            nn.Conv2d(config.c_in, c, kernel_size=1),  # (b, 512, h, w)
            nn.Conv2d(c, c, kernel_size=3, padding=1),
            nn.ConvTranspose2d(c, c // 2, kernel_size=2, stride=2),  # (b, 256, 2h, 2w)
            nn.Conv2d(c // 2, c // 2, kernel_size=3, padding=1),
            nn.ConvTranspose2d(c // 2, c // 4, kernel_size=2, stride=2),  # (b, 128, 4h, 4w)
            nn.Conv2d(c // 4, c // 4, kernel_size=3, padding=1),
            nn.ConvTranspose2d(c // 4, c // 4, kernel_size=2, stride=2),  # (b, 128, 8h, 8w)
            nn.Conv2d(c // 4, c // 4, kernel_size=3, padding=1),
        ]
        layers = []
        for conv in convs:
            layers += [conv, nn.GELU(), nn.BatchNorm2d(conv.out_channels)]
        layers.append(nn.Conv2d(c // 4, config.c_out, kernel_size=1))  # (b, 3, 8h, 8w)
        self.blocks = nn.Sequential(*layers)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:  # latents: (b, 16, h, w)
        return self.blocks(latents)  # (b, 3, 8h, 8w)


PREVIEWER = PreviewerConfig()  # previewer.safetensors: 3,979,651 parameters
