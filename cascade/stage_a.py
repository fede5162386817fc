"""Stage A: the f4 VQGAN that maps RGB images to 4-channel latents at a quarter of the resolution and back.

References:
- Stability-AI/StableCascade `modules/stage_a.py` (maths, parameter names: the keys of `stage_a.safetensors`).
- pabloppp/pytorch-tools `torchtools/nn/vq.py` (`VectorQuantize`: the `codebook` embedding, nearest neighbour).
- huggingface/diffusers `pipelines/deprecated/wuerstchen/modeling_paella_vq_model.py` (`PaellaVQModel`, the same
  network; its quantiser names the codebook `vquantizer.embedding` instead of `vquantizer.codebook`).

Stable Cascade never quantises at inference: Stage B generates continuous latents that go straight to `decode`.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """Paella's mixing residual block: a depthwise 3x3 conv, then a channelwise MLP, each behind a LayerNorm.

    Six learned scalars (`gammas`) modulate both branches: x += dw(LN(x)·(1+g0)+g1)·g2; x += mlp(LN(x)·(1+g3)+g4)·g5.
    They start at zero, so a freshly initialised block is the identity.
    """

    def __init__(self, c: int, c_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.depthwise = nn.Sequential(nn.ReplicationPad2d(1), nn.Conv2d(c, c, kernel_size=3, groups=c))
        self.norm2 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.channelwise = nn.Sequential(nn.Linear(c, c_hidden), nn.GELU(), nn.Linear(c_hidden, c))
        self.gammas = nn.Parameter(torch.zeros(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (b, c, h, w)
        g = self.gammas
        x_norm = self._modulated_norm(self.norm1, x.permute(0, 2, 3, 1), g[0], g[1]).permute(0, 3, 1, 2)
        x = torch.addcmul(x, self.depthwise(x_norm), g[2])  # x + dw(.) * g2 in one pass; (b, c, h, w)
        x_norm = self._modulated_norm(self.norm2, x.permute(0, 2, 3, 1), g[3], g[4])  # (b, h, w, c) for the MLP
        return torch.addcmul(x, self.channelwise(x_norm).permute(0, 3, 1, 2), g[5])  # (b, c, h, w)

    @staticmethod
    def _modulated_norm(norm: nn.LayerNorm, x: torch.Tensor, g_scale: torch.Tensor, g_shift: torch.Tensor):
        """norm(x) * (1 + g_scale) + g_shift, with the scalars as the LayerNorm's own affine: one pass over x, not
        three. At 1024 px the decoder's ResBlocks run on 100 to 200 MB float32 maps, where every elementwise pass
        costs time (docs/PERFORMANCE.md)."""
        c = x.shape[-1]
        return F.layer_norm(x, norm.normalized_shape, (1 + g_scale).expand(c), g_shift.expand(c), norm.eps)


class VectorQuantizer(nn.Module):
    """Snaps each latent pixel to its nearest codebook vector (Euclidean distance over the channel dimension).

    Inference only: unlike torchtools' `VectorQuantize` there is no straight-through gradient and no VQ loss.
    """

    def __init__(self, codebook_size: int, c_latent: int):
        super().__init__()
        self.codebook = nn.Embedding(codebook_size, c_latent)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, c, h, w) latents -> (quantised latents (b, c, h, w), codebook indices (b, h, w))."""
        b, c, h, w = z.shape
        z_flat = z.permute(0, 2, 3, 1).reshape(-1, c)  # (b*h*w, c)
        indices = torch.cdist(z_flat, self.codebook.weight).argmin(dim=1)  # (b*h*w,)
        z_q = self.codebook(indices).view(b, h, w, c).permute(0, 3, 1, 2)  # (b, c, h, w)
        return z_q, indices.view(b, h, w)


# ----------------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageAConfig:
    levels: int = 2  # resolution levels after the pixel unshuffle; each extra level halves the resolution again
    bottleneck_blocks: int = 12  # ResBlocks at the deepest decoder level
    c_hidden: int = 384  # channels at the deepest level; level i has c_hidden // 2**(levels-1-i)
    c_latent: int = 4
    codebook_size: int = 8192
    # Latents are divided by this after encoding and multiplied by it before decoding. The Stability single file is
    # used with 0.43 (its code comment says 0.3764, the Würstchen v2 value that the diffusers `vqgan/` config keeps).
    scale_factor: float = 0.43

    def __post_init__(self):
        if self.levels < 1:
            raise ValueError(f"StageAConfig.levels must be >= 1, got {self.levels}")
        if self.c_hidden % 2 ** (self.levels - 1):
            raise ValueError(f"StageAConfig.c_hidden={self.c_hidden} must be divisible by 2**(levels-1)")
        if self.scale_factor <= 0:
            raise ValueError(f"StageAConfig.scale_factor must be > 0, got {self.scale_factor}")


class StageA(nn.Module):
    """The VQGAN: (b, 3, H, W) RGB in [0, 1] <-> (b, c_latent, H/f, W/f) latents, f = 2**levels (4 by default)."""

    def __init__(self, config: StageAConfig):
        super().__init__()
        self.config = config
        c_levels = [config.c_hidden // 2**i for i in reversed(range(config.levels))]  # [192, 384]

        # Encoder: pixel unshuffle, a ResBlock per level (strided conv in between), 1x1 conv + BatchNorm to the latent.
        self.in_block = nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(3 * 4, c_levels[0], kernel_size=1))
        down_blocks = []
        for i, c in enumerate(c_levels):
            if i > 0:
                down_blocks.append(nn.Conv2d(c_levels[i - 1], c, kernel_size=4, stride=2, padding=1))
            down_blocks.append(ResBlock(c, c * 4))
        down_blocks.append(
            nn.Sequential(
                nn.Conv2d(c_levels[-1], config.c_latent, kernel_size=1, bias=False),
                nn.BatchNorm2d(config.c_latent),  # normalises the latent to roughly mean 0, std 1
            )
        )
        self.down_blocks = nn.Sequential(*down_blocks)

        self.vquantizer = VectorQuantizer(config.codebook_size, config.c_latent)

        # Decoder: 1x1 conv from the latent, bottleneck ResBlocks at the deepest level, one ResBlock per shallower
        # level (transposed conv in between), 1x1 conv + pixel shuffle back to RGB.
        up_blocks = [nn.Sequential(nn.Conv2d(config.c_latent, c_levels[-1], kernel_size=1))]
        for i, c in enumerate(reversed(c_levels)):
            n_blocks = config.bottleneck_blocks if i == 0 else 1
            up_blocks.extend(ResBlock(c, c * 4) for _ in range(n_blocks))
            if i < config.levels - 1:
                up_blocks.append(nn.ConvTranspose2d(c, c // 2, kernel_size=4, stride=2, padding=1))
        self.up_blocks = nn.Sequential(*up_blocks)
        self.out_block = nn.Sequential(nn.Conv2d(c_levels[0], 3 * 4, kernel_size=1), nn.PixelShuffle(2))

        self.initialize_weights()

    def initialize_weights(self):
        # As the reference: Xavier-uniform convs/linears with zero biases inside the ResBlocks (whose gammas are
        # zero, so they start as the identity); PyTorch defaults elsewhere; a small uniform codebook as torchtools.
        for block in self.modules():
            if isinstance(block, ResBlock):
                for m in block.modules():
                    if isinstance(m, (nn.Conv2d, nn.Linear)):
                        nn.init.xavier_uniform_(m.weight)
                        nn.init.zeros_(m.bias)
                nn.init.zeros_(block.gammas)
        k = self.config.codebook_size
        nn.init.uniform_(self.vquantizer.codebook.weight, -1.0 / k, 1.0 / k)

    def encode(self, images: torch.Tensor, quantize: bool = False) -> torch.Tensor:
        """(b, 3, H, W) RGB in [0, 1] -> (b, c_latent, H/4, W/4) latents divided by `scale_factor`.

        With `quantize=True` each latent pixel is first snapped to its nearest codebook vector (training-time
        behaviour; Stable Cascade inference does not quantise).
        """
        x = self.in_block(images)  # (b, c_levels[0], H/2, W/2)
        z = self.down_blocks(x)  # (b, c_latent, H/4, W/4)
        if quantize:
            z, _ = self.vquantizer(z)  # (b, c_latent, H/4, W/4), codebook vectors
        return z / self.config.scale_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(b, c_latent, h, w) scaled latents -> (b, 3, 4h, 4w) RGB, roughly in [0, 1] but NOT clamped: callers clamp.

        Never quantises (as Stable Cascade and diffusers' default `force_not_quantize=True`).

        Runs on channels-last (NHWC) memory, whatever the input's: the ResBlocks' LayerNorms and MLPs work per pixel
        across channels, so on NCHW memory each permute costs a copy of a 100 to 200 MB map at 1024 px, where on NHWC
        it is a view, and the convolutions follow the input's layout (docs/PERFORMANCE.md). The output is NHWC in
        memory too, as an image's pixels are.
        """
        x = latents.contiguous(memory_format=torch.channels_last) * self.config.scale_factor
        x = self.up_blocks(x)  # (b, c_levels[0], 2h, 2w)
        return self.out_block(x)  # (b, 3, 4h, 4w)

    def forward(self, images: torch.Tensor, quantize: bool = False) -> torch.Tensor:
        """Reconstruction: decode(encode(images)), unclamped."""
        return self.decode(self.encode(images, quantize=quantize))


# ----------------------------------------------------------------------------------------------------------------------
# diffusers `PaellaVQModel` config (vqgan/config.json)
# ----------------------------------------------------------------------------------------------------------------------

# PaellaVQModel's constructor defaults, used for fields a config.json leaves out.
_PAELLA_DEFAULTS = dict(
    in_channels=3,
    out_channels=3,
    up_down_scale_factor=2,
    levels=2,
    bottleneck_blocks=12,
    embed_dim=384,
    latent_channels=4,
    num_vq_embeddings=8192,
    scale_factor=0.3764,
)


def stage_a_diffusers_config(config: StageAConfig) -> dict:
    """The `PaellaVQModel` config fields that build the same network as `config`."""
    return dict(
        in_channels=3,
        out_channels=3,
        up_down_scale_factor=2,
        levels=config.levels,
        bottleneck_blocks=config.bottleneck_blocks,
        embed_dim=config.c_hidden,
        latent_channels=config.c_latent,
        num_vq_embeddings=config.codebook_size,
        scale_factor=config.scale_factor,
    )


def stage_a_from_diffusers_config(d: dict) -> StageAConfig:
    """A `StageAConfig` from a `PaellaVQModel` config dict (e.g. a parsed vqgan/config.json).

    The scale factor is taken from the dict as is: the diffusers `vqgan/` config says 0.3764 (the Würstchen v2 value
    the diffusers pipeline uses), whereas Stable Cascade's own `stage_a.safetensors` is used with 0.43. Keys starting
    with "_" (`_class_name`, `_diffusers_version`, ...) are ignored; missing fields take PaellaVQModel's defaults.
    """
    fields = {k: v for k, v in d.items() if not k.startswith("_")}
    unknown = sorted(fields.keys() - _PAELLA_DEFAULTS.keys())
    if unknown:
        raise ValueError(f"unknown PaellaVQModel config fields {unknown}; allowed: {sorted(_PAELLA_DEFAULTS)}")
    f = {**_PAELLA_DEFAULTS, **fields}
    for name in ("in_channels", "out_channels"):
        if f[name] != 3:
            raise ValueError(f"PaellaVQModel {name}={f[name]} is not supported: Stage A is RGB (3)")
    if f["up_down_scale_factor"] != 2:
        raise ValueError(f"PaellaVQModel up_down_scale_factor={f['up_down_scale_factor']} is not supported (only 2)")
    return StageAConfig(
        levels=f["levels"],
        bottleneck_blocks=f["bottleneck_blocks"],
        c_hidden=f["embed_dim"],
        c_latent=f["latent_channels"],
        codebook_size=f["num_vq_embeddings"],
        scale_factor=float(f["scale_factor"]),
    )


# ----------------------------------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------------------------------

STAGE_A = StageAConfig()  # stage_a.safetensors: 18,406,894 parameters
STAGE_A_TINY = StageAConfig(c_hidden=32, bottleneck_blocks=1, codebook_size=16)  # tests: 39,148 parameters
