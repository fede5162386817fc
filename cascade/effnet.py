"""The EfficientNetV2-S encoder that produces Stage C's 16-channel latents (and Stage B's effnet conditioning).

References:
- Stability-AI/StableCascade `modules/effnet.py` (`EfficientNetEncoder`: backbone + mapper, the keys of
  `effnet_encoder.safetensors`) and `train/train_c.py` (`effnet_preprocess`: ImageNet normalisation in the data
  pipeline, outside the module).
- pytorch/vision `torchvision/models/efficientnet.py` (`efficientnet_v2_s().features`), `torchvision/ops/misc.py`
  (`Conv2dNormActivation`, `SqueezeExcitation`). Written here without torchvision; the module tree reproduces
  torchvision's so the parameter names are the same (`backbone.4.0.block.2.fc1.weight`, ...).
- Tan & Le, "EfficientNetV2: Smaller Models and Faster Training" (2021), Table 4 (the V2-S stages).

Inference only: torchvision's stochastic depth (identity in eval mode, no parameters) is left out.
"""

from dataclasses import dataclass

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# EfficientNetV2-S stages (paper Table 4, torchvision `_efficientnet_conf("efficientnet_v2_s")`):
# (fused, expand_ratio, stride, c_in, c_out, layers); all kernels are 3x3.
EFFICIENTNET_V2_S_STAGES = (
    (True, 1, 1, 24, 24, 2),
    (True, 4, 2, 24, 48, 4),
    (True, 4, 2, 48, 64, 4),
    (False, 4, 2, 64, 128, 6),
    (False, 6, 1, 128, 160, 9),
    (False, 6, 2, 160, 256, 15),
)
C_FEATURES = 1280  # channels of the final 1x1 conv of the backbone

# ----------------------------------------------------------------------------------------------------------------------
# Blocks (torchvision's module trees, hence the index-named children)
# ----------------------------------------------------------------------------------------------------------------------


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias, "same" padding) -> BatchNorm2d (eps 1e-3, as torchvision's V2) -> optional SiLU.

    torchvision's `Conv2dNormActivation`: children `0` (conv), `1` (norm), `2` (activation).
    """

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 1, stride: int = 1, groups: int = 1, act: bool = True):
        layers = [
            nn.Conv2d(c_in, c_out, kernel_size, stride, padding=(kernel_size - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(c_out, eps=1e-3),
        ]
        if act:
            layers.append(nn.SiLU(inplace=True))
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """x · sigmoid(fc2(SiLU(fc1(mean_hw(x))))), with 1x1 convs as the fully connected layers."""

    def __init__(self, c: int, c_squeeze: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, c_squeeze, kernel_size=1)
        self.fc2 = nn.Conv2d(c_squeeze, c, kernel_size=1)
        self.activation = nn.SiLU(inplace=True)
        self.scale_activation = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (b, c, h, w)
        scale = self.fc2(self.activation(self.fc1(self.avgpool(x))))  # (b, c, 1, 1)
        return x * self.scale_activation(scale)


class FusedMBConv(nn.Module):
    """Fused inverted residual: a full 3x3 conv expands (and strides), a 1x1 conv projects; residual if shapes match.

    With expand ratio 1 the block is a single 3x3 ConvBNAct.
    """

    def __init__(self, c_in: int, c_out: int, expand_ratio: int, stride: int):
        super().__init__()
        c_expanded = c_in * expand_ratio
        if c_expanded == c_in:
            layers = [ConvBNAct(c_in, c_out, kernel_size=3, stride=stride)]
        else:
            layers = [
                ConvBNAct(c_in, c_expanded, kernel_size=3, stride=stride),
                ConvBNAct(c_expanded, c_out, kernel_size=1, act=False),
            ]
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.use_residual else y


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise (strided), squeeze-excitation, 1x1 project; residual if same shape.

    The squeeze width is a quarter of the block's *input* channels, not of the expanded ones.
    """

    def __init__(self, c_in: int, c_out: int, expand_ratio: int, stride: int):
        super().__init__()
        c_expanded = c_in * expand_ratio
        self.block = nn.Sequential(
            ConvBNAct(c_in, c_expanded, kernel_size=1),
            ConvBNAct(c_expanded, c_expanded, kernel_size=3, stride=stride, groups=c_expanded),
            SqueezeExcitation(c_expanded, max(1, c_in // 4)),
            ConvBNAct(c_expanded, c_out, kernel_size=1, act=False),
        )
        self.use_residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.use_residual else y


def efficientnet_v2_s_features() -> nn.Sequential:
    """torchvision's `efficientnet_v2_s().features`: stem (0), six stages (1-6), 1x1 conv to 1280 (7); stride 32."""
    layers = [ConvBNAct(3, EFFICIENTNET_V2_S_STAGES[0][3], kernel_size=3, stride=2)]  # stem
    for fused, expand_ratio, stride, c_in, c_out, n_layers in EFFICIENTNET_V2_S_STAGES:
        block = FusedMBConv if fused else MBConv
        # Only the first block of a stage changes the width and strides.
        first = block(c_in, c_out, expand_ratio, stride)
        stage = [first] + [block(c_out, c_out, expand_ratio, 1) for _ in range(n_layers - 1)]
        layers.append(nn.Sequential(*stage))
    layers.append(ConvBNAct(EFFICIENTNET_V2_S_STAGES[-1][4], C_FEATURES, kernel_size=1))
    return nn.Sequential(*layers)


# ----------------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EfficientNetEncoderConfig:
    c_latent: int = 16


class EfficientNetEncoder(nn.Module):
    """(b, 3, H, W) ImageNet-normalised RGB -> (b, c_latent, H/32, W/32) latents, roughly N(0, 1) per channel."""

    stride = 32  # image pixels per latent pixel

    def __init__(self, config: EfficientNetEncoderConfig):
        super().__init__()
        self.config = config
        self.backbone = efficientnet_v2_s_features()
        self.mapper = nn.Sequential(
            nn.Conv2d(C_FEATURES, config.c_latent, kernel_size=1, bias=False),
            nn.BatchNorm2d(config.c_latent, affine=False),  # standardises the latent with its running statistics
        )
        self.initialize_weights()

    def initialize_weights(self):
        # torchvision's EfficientNet init for the backbone (the official weights replace it anyway); the mapper keeps
        # PyTorch's defaults, as in the reference.
        for m in self.backbone.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        """(b, 3, H, W) RGB in [0, 1] -> ImageNet-normalised; no resizing (the caller picks the resolution)."""
        mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        return (images - mean) / std

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (b, 3, H, W), ImageNet-normalised
        features = self.backbone(x)  # (b, 1280, H/32, W/32)
        return self.mapper(features)  # (b, c_latent, H/32, W/32)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(b, 3, H, W) RGB in [0, 1] -> (b, c_latent, H/32, W/32): `forward(preprocess(images))`."""
        return self(self.preprocess(images))


# ----------------------------------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------------------------------

EFFNET_ENCODER = EfficientNetEncoderConfig()  # effnet_encoder.safetensors: 20,197,968 parameters
