"""Stage C: the text-conditioned diffusion prior on 16 x 24 x 24 semantic latents (for 1024 x 1024 images).

Reference: Stability-AI/StableCascade `modules/stage_c.py` (architecture, checkpoint key names) and
`train/train_c.py` (the released configurations). Forward signature as the reference:
`StageC(x, r, clip_text, clip_text_pooled, clip_img)` returns the predicted noise epsilon, shaped like x.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .blocks import CascadeUNet, Conditioning, layer_norm_2d, patch_embedding, patch_head


@dataclass(frozen=True)
class StageCConfig:
    c_in: int = 16
    c_out: int = 16
    c_r: int = 64
    patch_size: int = 1
    c_cond: int = 2048
    c_hidden: tuple[int, ...] = (2048, 2048)
    nhead: tuple[int, ...] = (32, 32)
    blocks: tuple[tuple[int, ...], tuple[int, ...]] = ((8, 24), (24, 8))  # (down per level, up deepest first)
    block_repeat: tuple[tuple[int, ...], tuple[int, ...]] = ((1, 1), (1, 1))
    level_config: tuple[str, ...] = ("CTA", "CTA")  # C = ResBlock, T = TimestepBlock, A = AttnBlock
    c_clip_text: int = 1280
    c_clip_text_pooled: int = 1280
    c_clip_img: int = 768
    c_clip_seq: int = 4  # tokens made from each pooled embedding
    kernel_size: int = 3
    dropout: tuple[float, ...] = (0.1, 0.1)
    self_attn: bool = True
    t_conds: tuple[str, ...] = ("sca", "crp")
    switch_level: tuple[bool, ...] = (False,)  # False: levels share one resolution (a 1x1 conv between them)


class UpDownBlock2d(nn.Module):
    """A 1x1 conv, with a bilinear x2 resampling only when the level switch is enabled (never in the releases)."""

    def __init__(self, c_in: int, c_out: int, mode: str, enabled: bool):
        super().__init__()
        resample = (
            nn.Upsample(scale_factor=2 if mode == "up" else 0.5, mode="bilinear", align_corners=True)
            if enabled
            else nn.Identity()
        )
        mapping = nn.Conv2d(c_in, c_out, kernel_size=1)
        # The order fixes the checkpoint keys: `blocks.0` is the conv going down, `blocks.1` going up.
        self.blocks = nn.ModuleList([resample, mapping] if mode == "up" else [mapping, resample])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class StageC(CascadeUNet):
    def __init__(self, config: StageCConfig = StageCConfig()):
        super().__init__()
        self.config = config
        c0 = config.c_hidden[0]

        # Conditioning: text tokens, pooled text and image embeddings become one sequence of c_cond tokens.
        self.clip_txt_mapper = nn.Linear(config.c_clip_text, config.c_cond)
        self.clip_txt_pooled_mapper = nn.Linear(config.c_clip_text_pooled, config.c_cond * config.c_clip_seq)
        self.clip_img_mapper = nn.Linear(config.c_clip_img, config.c_cond * config.c_clip_seq)
        self.clip_norm = nn.LayerNorm(config.c_cond, elementwise_affine=False, eps=1e-6)

        self.embedding = patch_embedding(config.c_in, c0, config.patch_size)

        def downscaler(c_prev: int, c: int, level: int) -> nn.Module:
            return nn.Sequential(layer_norm_2d(c_prev), UpDownBlock2d(c_prev, c, "down", config.switch_level[level]))

        def upscaler(c: int, c_prev: int, level: int) -> nn.Module:
            return nn.Sequential(layer_norm_2d(c), UpDownBlock2d(c, c_prev, "up", config.switch_level[level]))

        self._build_levels(config, downscaler, upscaler)

        self.clf = patch_head(c0, config.c_out, config.patch_size)
        self._init_weights()
        nn.init.normal_(self.clip_txt_mapper.weight, std=0.02)
        nn.init.normal_(self.clip_txt_pooled_mapper.weight, std=0.02)
        nn.init.normal_(self.clip_img_mapper.weight, std=0.02)

    def clip_tokens(self, clip_text: torch.Tensor, clip_text_pooled: torch.Tensor, clip_img: torch.Tensor):
        """(B, 77, c_clip_text), (B, 1, c_clip_text_pooled), (B, N, c_clip_img) -> (B, 77 + 4 + 4N, c_cond)."""
        b = clip_text.shape[0]
        text = self.clip_txt_mapper(clip_text)
        pooled = self.clip_txt_pooled_mapper(clip_text_pooled).view(
            b, clip_text_pooled.shape[1] * self.config.c_clip_seq, -1
        )
        img = self.clip_img_mapper(clip_img).view(b, clip_img.shape[1] * self.config.c_clip_seq, -1)
        return self.clip_norm(torch.cat([text, pooled, img], dim=1))

    def precompute(
        self,
        x: torch.Tensor,
        clip_text: torch.Tensor,
        clip_text_pooled: torch.Tensor,
        clip_img: torch.Tensor,
        **t_cond_values: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """The conditions of a sampling run with the work that is the same at every step done once: the keyword
        arguments `forward(x, r, **them)` takes for any x shaped like this one. The CLIP inputs become `clip_kv`,
        the condition tokens as every attention block's kv_mapper maps them (CascadeUNet.condition_kv); `sca` and
        `crp` (zero where absent) become `t_bias`, the TimestepBlocks' modulation that r does not change
        (CascadeUNet.condition_bias)."""
        clip_kv = self.condition_kv(self._clip(clip_text, clip_text_pooled, clip_img))
        return {"clip_kv": clip_kv, "t_bias": self.condition_bias(t_cond_values, like=x)}

    def _clip(self, clip_text: torch.Tensor, clip_text_pooled: torch.Tensor, clip_img: torch.Tensor) -> torch.Tensor:
        if clip_text_pooled.dim() != 3 or clip_img.dim() != 3:
            raise ValueError(
                f"clip_text_pooled and clip_img must be 3-D (B, N, C); got {tuple(clip_text_pooled.shape)} and "
                f"{tuple(clip_img.shape)}"
            )
        dtype = self.embedding[1].weight.dtype
        return self.clip_tokens(clip_text.to(dtype), clip_text_pooled.to(dtype), clip_img.to(dtype))  # (B, 85, c)

    def forward(
        self,
        x: torch.Tensor,  # (B, 16, h, w) noised latent
        r: torch.Tensor,  # (B,) noise level in [0, 1]
        clip_text: torch.Tensor | None = None,  # (B, 77, 1280) CLIP-G hidden states
        clip_text_pooled: torch.Tensor | None = None,  # (B, 1, 1280) projected pooled text embedding
        clip_img: torch.Tensor | None = None,  # (B, 1, 768) CLIP-L image embedding, zeros for text-to-image
        clip_kv: torch.Tensor | None = None,  # in place of the three above: precompute's
        t_bias: torch.Tensor | None = None,  # in place of sca and crp: precompute's
        **t_cond_values: torch.Tensor,  # optional `sca` / `crp`, zero when absent
    ) -> torch.Tensor:
        dtype = self.embedding[1].weight.dtype
        if clip_kv is None:
            if clip_text is None or clip_text_pooled is None or clip_img is None:
                raise ValueError("StageC needs clip_text, clip_text_pooled and clip_img, or clip_kv (precompute)")
            clip = self._clip(clip_text, clip_text_pooled, clip_img)
        else:
            clip = None
        cond = Conditioning(r_embed=self._r_embed(r, t_cond_values, t_bias).to(dtype), clip=clip)  # (B, 192 or 64)
        conds = self._block_conditions(cond, clip_kv, t_bias)
        h = self.embedding(x.to(dtype))  # (B, c_hidden[0], h, w)
        level_outputs = self._down_encode(h, cond, conds)
        h = self._up_decode(level_outputs, cond, conds)
        return self.clf(h).to(x.dtype)  # (B, 16, h, w)


# Named presets: the official configurations (parameter counts checked in tests/test_presets.py).
STAGE_C_3B = StageCConfig()
STAGE_C_1B = StageCConfig(c_cond=1536, c_hidden=(1536, 1536), nhead=(24, 24), blocks=((4, 12), (12, 4)))
STAGE_C_TINY = StageCConfig(
    c_cond=64,
    c_hidden=(64, 64),
    nhead=(2, 2),
    blocks=((2, 2), (2, 2)),
    c_clip_text=32,
    c_clip_text_pooled=32,
    c_clip_img=24,
    dropout=(0.0, 0.0),
)

__all__ = ["StageC", "StageCConfig", "STAGE_C_3B", "STAGE_C_1B", "STAGE_C_TINY"]
