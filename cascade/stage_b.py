"""Stage B: the diffusion decoder from Stage C's semantic latent to Stage A's 4 x 256 x 256 latent (1024 px).

Reference: Stability-AI/StableCascade `modules/stage_b.py` (architecture, checkpoint key names) and
`train/train_b.py` (the released configurations). Forward signature as the reference:
`StageB(x, r, effnet, clip)` returns the predicted noise epsilon, shaped like x.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .blocks import CascadeUNet, Conditioning, interpolate_like, layer_norm_2d, patch_embedding, patch_head


@dataclass(frozen=True)
class StageBConfig:
    c_in: int = 4
    c_out: int = 4
    c_r: int = 64
    patch_size: int = 2
    c_cond: int = 1280
    c_hidden: tuple[int, ...] = (320, 640, 1280, 1280)
    nhead: tuple[int, ...] = (-1, -1, 20, 20)  # -1: the level has no attention
    blocks: tuple[tuple[int, ...], tuple[int, ...]] = ((2, 6, 28, 6), (6, 28, 6, 2))  # (down, up deepest first)
    block_repeat: tuple[tuple[int, ...], tuple[int, ...]] = ((1, 1, 1, 1), (3, 3, 2, 2))
    level_config: tuple[str, ...] = ("CT", "CT", "CTA", "CTA")
    c_clip: int = 1280  # pooled CLIP-G text embedding
    c_clip_seq: int = 4
    c_effnet: int = 16
    c_pixels: int = 3
    kernel_size: int = 3
    dropout: tuple[float, ...] = (0.0, 0.0, 0.1, 0.1)
    self_attn: bool = True
    t_conds: tuple[str, ...] = ("sca",)


def _mapper(c_in: int, c: int) -> nn.Sequential:
    # 1x1 conv up to 4c, GELU, 1x1 conv down to c, LN: how effnet latents and pixels enter the decoder.
    return nn.Sequential(
        nn.Conv2d(c_in, c * 4, kernel_size=1),
        nn.GELU(),
        nn.Conv2d(c * 4, c, kernel_size=1),
        layer_norm_2d(c),
    )


class StageB(CascadeUNet):
    def __init__(self, config: StageBConfig = StageBConfig()):
        super().__init__()
        self.config = config
        c0 = config.c_hidden[0]

        self.effnet_mapper = _mapper(config.c_effnet, c0)
        self.pixels_mapper = _mapper(config.c_pixels, c0)
        self.clip_mapper = nn.Linear(config.c_clip, config.c_cond * config.c_clip_seq)
        self.clip_norm = nn.LayerNorm(config.c_cond, elementwise_affine=False, eps=1e-6)

        self.embedding = patch_embedding(config.c_in, c0, config.patch_size)

        def downscaler(c_prev: int, c: int, level: int) -> nn.Module:
            return nn.Sequential(layer_norm_2d(c_prev), nn.Conv2d(c_prev, c, kernel_size=2, stride=2))

        def upscaler(c: int, c_prev: int, level: int) -> nn.Module:
            return nn.Sequential(layer_norm_2d(c), nn.ConvTranspose2d(c, c_prev, kernel_size=2, stride=2))

        self._build_levels(config, downscaler, upscaler)

        self.clf = patch_head(c0, config.c_out, config.patch_size)
        self._init_weights()
        nn.init.normal_(self.clip_mapper.weight, std=0.02)
        for mapper in (self.effnet_mapper, self.pixels_mapper):
            nn.init.normal_(mapper[0].weight, std=0.02)
            nn.init.normal_(mapper[2].weight, std=0.02)

    def clip_tokens(self, clip: torch.Tensor) -> torch.Tensor:
        """(B, 1, c_clip) pooled text embedding -> (B, 4, c_cond) tokens."""
        b = clip.shape[0]
        return self.clip_norm(self.clip_mapper(clip).view(b, clip.shape[1] * self.config.c_clip_seq, -1))

    def precompute(
        self,
        x: torch.Tensor,
        effnet: torch.Tensor,
        clip: torch.Tensor,
        pixels: torch.Tensor | None = None,
        **t_cond_values: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """The conditions of a sampling run with the work that is the same at every step done once: the keyword
        arguments `forward(x, r, **them)` takes for any x shaped like this one. The pooled CLIP embedding becomes
        `clip_kv` (its tokens as every attention block's kv_mapper maps them, CascadeUNet.condition_kv); effnet and
        pixels become `effnet_map`, their mappers' outputs at the size of x's embedding, which forward adds to it;
        `sca` (zero where absent) becomes `t_bias`, the TimestepBlocks' modulation that r does not change
        (CascadeUNet.condition_bias)."""
        size = tuple(n // self.config.patch_size for n in x.shape[-2:])
        return {
            "clip_kv": self.condition_kv(self._clip(clip)),
            "effnet_map": self._effnet_map(effnet, pixels, size),
            "t_bias": self.condition_bias(t_cond_values, like=x),
        }

    def _clip(self, clip: torch.Tensor) -> torch.Tensor:
        if clip.dim() != 3:
            raise ValueError(f"clip must be 3-D (B, 1, C); got {tuple(clip.shape)}")
        return self.clip_tokens(clip.to(self.embedding[1].weight.dtype))  # (B, 4, c_cond)

    def _effnet_map(self, effnet: torch.Tensor, pixels: torch.Tensor | None, size) -> torch.Tensor:
        dtype = self.embedding[1].weight.dtype
        if pixels is None:
            pixels = effnet.new_zeros(effnet.shape[0], self.config.c_pixels, 8, 8)
        # effnet is resized before its mapper, pixels after theirs (as the reference).
        mapped = self.effnet_mapper(interpolate_like(effnet.to(dtype), size))
        return mapped + interpolate_like(self.pixels_mapper(pixels.to(dtype)), size)

    def forward(
        self,
        x: torch.Tensor,  # (B, 4, H/4, W/4) noised Stage A latent
        r: torch.Tensor,  # (B,) noise level in [0, 1]
        effnet: torch.Tensor | None = None,  # (B, 16, h, w) Stage C output (zeros for the unconditional pass)
        clip: torch.Tensor | None = None,  # (B, 1, 1280) pooled text embedding
        pixels: torch.Tensor | None = None,  # (B, 3, 8, 8) low-res colour hint; zeros in every release
        clip_kv: torch.Tensor | None = None,  # in place of clip: precompute's
        effnet_map: torch.Tensor | None = None,  # in place of effnet and pixels: precompute's
        t_bias: torch.Tensor | None = None,  # in place of sca: precompute's
        **t_cond_values: torch.Tensor,
    ) -> torch.Tensor:
        if (clip is None) == (clip_kv is None) or (effnet is None) == (effnet_map is None):
            raise ValueError("StageB needs effnet and clip, or effnet_map and clip_kv (precompute), one of each")
        dtype = self.embedding[1].weight.dtype
        cond = Conditioning(
            r_embed=self._r_embed(r, t_cond_values, t_bias).to(dtype),  # (B, 128 or 64)
            clip=None if clip is None else self._clip(clip),
        )
        conds = self._block_conditions(cond, clip_kv, t_bias)
        h = self.embedding(x.to(dtype))  # (B, c0, H/8, W/8)
        if effnet_map is None:
            effnet_map = self._effnet_map(effnet, pixels, h.shape[-2:])
        h = h + effnet_map
        level_outputs = self._down_encode(h, cond, conds)
        h = self._up_decode(level_outputs, cond, conds)
        return self.clf(h).to(x.dtype)  # (B, 4, H/4, W/4)


# Named presets: the official configurations (parameter counts checked in tests/test_presets.py).
STAGE_B_3B = StageBConfig()
STAGE_B_700M = StageBConfig(
    c_hidden=(320, 576, 1152, 1152),
    nhead=(-1, 9, 18, 18),
    blocks=((2, 4, 14, 4), (4, 14, 4, 2)),
    block_repeat=((1, 1, 1, 1), (2, 2, 2, 2)),
)
STAGE_B_TINY = StageBConfig(
    c_cond=32,
    c_hidden=(16, 32, 64, 64),
    nhead=(-1, -1, 2, 2),
    blocks=((1, 1, 2, 1), (1, 2, 1, 1)),
    block_repeat=((1, 1, 1, 1), (3, 3, 2, 2)),
    c_clip=32,
    dropout=(0.0, 0.0, 0.0, 0.0),
)

__all__ = ["StageB", "StageBConfig", "STAGE_B_3B", "STAGE_B_700M", "STAGE_B_TINY"]
