"""Building blocks shared by Stage B and Stage C, and the U-Net level machinery both use.

Reference: Stability-AI/StableCascade `modules/common.py`, `modules/stage_b.py`, `modules/stage_c.py`. Parameter
names are the official checkpoint's (`depthwise`, `channelwise.{0,2,4}`, `attention.attn.in_proj_weight`,
`kv_mapper.1`, `mapper_<cond>`, ...), so the official files load with `strict=True`.

Every block is called as `block(x, cond, skip=None)` where `cond` carries the r-embedding and the CLIP tokens; each
block takes what it needs. The levels are built once and run in a loop with no type checks.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class Conditioning(NamedTuple):
    r_embed: torch.Tensor  # (B, c_r * (1 + len(t_conds)))
    clip: torch.Tensor | None  # (B, tokens, c_cond); None where kv is given
    # One attention block's condition tokens as its kv_mapper maps them, (B, tokens, c), made once per sampling run
    # (CascadeUNet.condition_kv) instead of at every step: the CLIP tokens do not change between steps.
    kv: torch.Tensor | None = None
    # One TimestepBlock's part of its modulation that r does not change, (B, 2c): its mapper's bias plus its extra
    # conditions' mappings, made once per sampling run (CascadeUNet.condition_bias). Where it is given, r_embed is
    # r's embedding alone, (B, c_r).
    t_bias: torch.Tensor | None = None


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def layer_norm_2d(c: int) -> LayerNorm2d:
    # Every norm inside the generators is non-affine with eps 1e-6.
    return LayerNorm2d(c, elementwise_affine=False, eps=1e-6)


def hw_l2_norm_by_squares(x: torch.Tensor) -> torch.Tensor:
    """The L2 norm over H and W of (B, H, W, C), as torch.norm(x, p=2, dim=(1, 2), keepdim=True), written as a
    float32 sum of squares: torch.norm's CPU kernel reduces over these inner dimensions about 25 times slower (a sixth
    of a demo Stage B training step went there). In float32 so that a half-precision square cannot overflow
    (|x| > 256 would in float16); a zero sum gets torch.norm's gradient there, 0, not sqrt's infinite one (which made
    NaNs)."""
    ss = x.float().square().sum(dim=(1, 2), keepdim=True)
    nonzero = ss > 0
    return torch.where(nonzero, torch.where(nonzero, ss, 1.0).sqrt(), 0.0).to(x.dtype)


def hw_l2_norm(x: torch.Tensor, fused: bool | None = None) -> torch.Tensor:
    """The same norm. fused (the default on a GPU): one reduction that reads x once and accumulates in float32. The
    sum of squares is three passes (a float32 copy of x, its square, the sum: 18 bytes moved per bf16 element against
    2) over the MLP's 4C-wide hidden state, the largest tensor in a block: about half the bytes that a guided Stage C
    or Stage B pass's memory-bound operations move in eager mode (counted on meta tensors by
    scripts/memory_traffic.py, docs/PERFORMANCE.md). On a CPU the sum of squares stays the default: there it is as
    fast forward and up to 4x faster with backward (the demo's training shapes)."""
    if fused is None:
        fused = x.is_cuda
    if fused:
        return torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True, dtype=torch.float32).to(x.dtype)
    return hw_l2_norm_by_squares(x)


class GlobalResponseNorm(nn.Module):
    """GRN from ConvNeXt-V2, on channels-last input (B, H, W, C)."""

    # How every GRN computes its norm (hw_l2_norm's `fused`): None, by device; the profile and the byte count set it
    # to compare the two ways.
    fused: bool | None = None

    def __init__(self, c: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, c))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, c))

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> the per (image, channel) factor GRN multiplies x by, gamma * Nx + 1: (B, 1, 1, C)."""
        gx = hw_l2_norm(x, self.fused)  # (B, 1, 1, C)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * nx + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # gamma * (x * nx) + beta + x, as one pass over x: the scale is per (image, channel), so it is folded first.
        return torch.addcmul(self.beta, x, self.scale(x))


class ResBlock(nn.Module):
    """Depthwise conv -> LN -> (concat skip) -> channelwise MLP with GRN, residual."""

    def __init__(self, c: int, c_skip: int = 0, kernel_size: int = 3, dropout: float = 0.0):
        super().__init__()
        self.depthwise = nn.Conv2d(c, c, kernel_size=kernel_size, padding=kernel_size // 2, groups=c)
        self.norm = layer_norm_2d(c)
        self.channelwise = nn.Sequential(
            nn.Linear(c + c_skip, c * 4),
            nn.GELU(),
            GlobalResponseNorm(c * 4),
            nn.Dropout(dropout),
            nn.Linear(c * 4, c),
        )

    def forward(self, x: torch.Tensor, cond: Conditioning | None = None, skip: torch.Tensor | None = None):
        residual = x
        x = self.norm(self.depthwise(x))
        if skip is not None:
            x = torch.cat([x, skip], dim=1)  # (B, c + c_skip, H, W)
        x = self.channelwise(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x + residual


class TimestepBlock(nn.Module):
    """Modulation x * (1 + a) + b by the r-embedding and one embedding per extra condition (`sca`, `crp`)."""

    def __init__(self, c: int, c_r: int, conds: tuple[str, ...] = ("sca",)):
        super().__init__()
        self.mapper = nn.Linear(c_r, c * 2)
        self.conds = tuple(conds)
        for name in self.conds:
            setattr(self, f"mapper_{name}", nn.Linear(c_r, c * 2))

    def condition_bias(self, cond_embeds: torch.Tensor) -> torch.Tensor:
        """The extra conditions' embeddings side by side (B, c_r * len(conds)) -> the part of this block's (a, b)
        that r does not change, (B, 2c): the r mapper's bias plus every extra condition's mapping."""
        bias = self.mapper.bias.expand(cond_embeds.shape[0], -1)
        for name, chunk in zip(self.conds, cond_embeds.chunk(len(self.conds), dim=1) if self.conds else ()):
            bias = bias + getattr(self, f"mapper_{name}")(chunk)
        return bias

    def forward(self, x: torch.Tensor, cond: Conditioning, skip: torch.Tensor | None = None):
        if cond.t_bias is None:
            chunks = cond.r_embed.chunk(len(self.conds) + 1, dim=1)
            ab = self.mapper(chunks[0])
            for name, chunk in zip(self.conds, chunks[1:]):
                ab = ab + getattr(self, f"mapper_{name}")(chunk)
        else:  # one product for the whole modulation: t_bias + r_embed @ W^T
            ab = torch.addmm(cond.t_bias, cond.r_embed, self.mapper.weight.t())
        a, b = ab[:, :, None, None].chunk(2, dim=1)  # (B, c, 1, 1) each
        return torch.addcmul(b, x, 1 + a)  # x * (1 + a) + b in one pass over x


def multihead_attention(
    attn: nn.MultiheadAttention, queries: torch.Tensor, keys: torch.Tensor, in_proj: nn.Module | None = None
) -> torch.Tensor:
    """What `attn(queries, keys, keys)` computes (batch first, no mask), on its own parameters.

    nn.MultiheadAttention moves the batch to the second dimension before its input projections, and on that layout
    PyTorch runs each projection as one small matrix product per token (a batched matmul over the sequence, each
    re-reading the whole weight): on an H200 that took 80 % of Stage C's time (docs/PERFORMANCE.md). Here each
    projection is one (B * L, C) matrix product, attention is `scaled_dot_product_attention` (flash kernels), and
    the parameters are still the module's `in_proj_weight`/`in_proj_bias`/`out_proj`, so the official key names load
    and LoRA's parametrisations of them apply. in_proj: the same projections as modules `q` and `kv` (a float8 copy,
    cascade.float8), used in place of the parameters."""
    c, heads = attn.embed_dim, attn.num_heads
    if in_proj is None:
        weight, bias = attn.in_proj_weight, attn.in_proj_bias
        q = F.linear(queries, weight[:c], bias[:c])  # (B, L, C)
        k, v = F.linear(keys, weight[c:], bias[c:]).chunk(2, dim=-1)  # (B, S, C) each
    else:
        q, (k, v) = in_proj.q(queries), in_proj.kv(keys).chunk(2, dim=-1)

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (heads, c // heads)).transpose(1, 2)  # (B, heads, L, C / heads)

    dropout = attn.dropout if attn.training else 0.0
    out = F.scaled_dot_product_attention(split(q), split(k), split(v), dropout_p=dropout)
    return attn.out_proj(out.transpose(1, 2).flatten(2))


class Attention2D(nn.Module):
    """Multi-head attention of the image tokens over [image tokens; condition tokens]."""

    def __init__(self, c: int, nhead: int, dropout: float = 0.0):
        super().__init__()
        # Holds the parameters under the official names; multihead_attention computes with them.
        self.attn = nn.MultiheadAttention(c, nhead, dropout=dropout, bias=True, batch_first=True)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, self_attn: bool) -> torch.Tensor:
        b, c, h, w = x.shape
        # flatten, not view: x may be channels-last (cascade.speed.channels_last), where this is free.
        tokens = x.flatten(2).transpose(1, 2).contiguous()  # (B, HW, C)
        if self_attn:
            kv = torch.cat([tokens, kv], dim=1)  # (B, HW + T, C)
        # float8_in_proj: a submodule only where cascade.float8 made one.
        out = multihead_attention(self.attn, tokens, kv, getattr(self, "float8_in_proj", None))
        return out.permute(0, 2, 1).reshape(b, c, h, w)


class AttnBlock(nn.Module):
    def __init__(self, c: int, c_cond: int, nhead: int, self_attn: bool = True, dropout: float = 0.0):
        super().__init__()
        self.self_attn = self_attn
        self.norm = layer_norm_2d(c)
        self.attention = Attention2D(c, nhead, dropout)
        self.kv_mapper = nn.Sequential(nn.SiLU(), nn.Linear(c_cond, c))

    def forward(self, x: torch.Tensor, cond: Conditioning, skip: torch.Tensor | None = None):
        kv = self.kv_mapper(cond.clip) if cond.kv is None else cond.kv  # (B, T, c)
        return x + self.attention(self.norm(x), kv, self_attn=self.self_attn)


def patch_embedding(c_in: int, c: int, patch_size: int) -> nn.Sequential:
    """Latent -> features: pixel-unshuffle patches, 1x1 conv, LN (keys `embedding.1.*`)."""
    return nn.Sequential(
        nn.PixelUnshuffle(patch_size), nn.Conv2d(c_in * patch_size**2, c, kernel_size=1), layer_norm_2d(c)
    )


def patch_head(c: int, c_out: int, patch_size: int) -> nn.Sequential:
    """Features -> predicted noise: LN, 1x1 conv, pixel-shuffle back (keys `clf.1.*`)."""
    return nn.Sequential(
        layer_norm_2d(c), nn.Conv2d(c, c_out * patch_size**2, kernel_size=1), nn.PixelShuffle(patch_size)
    )


def r_embedding(r: torch.Tensor, c_r: int, max_positions: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding of the noise level r in [0, 1]: (B,) -> (B, c_r), computed in float32."""
    r = r.float() * max_positions
    half = c_r // 2
    freqs = torch.arange(half, device=r.device).float().mul(-math.log(max_positions) / (half - 1)).exp()
    args = r[:, None] * freqs[None, :]
    emb = torch.cat([args.sin(), args.cos()], dim=1)
    if c_r % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


def interpolate_like(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize as the reference (align_corners=True, computed in float32), back in x's dtype."""
    return F.interpolate(x.float(), size=size, mode="bilinear", align_corners=True).to(x.dtype)


class CascadeUNet(nn.Module):
    """The level structure shared by Stage B and Stage C.

    Down path: per level a downscaler, then its blocks run `block_repeat` times with a 1x1 "repeat mapper" conv
    between passes (the blocks' weights are shared across passes). Up path, deepest first: the first block of each
    non-deepest level concatenates the matching down output. Subclasses build the conditioning, embedding and head,
    then call `_build_levels` with their down- and upscaler factories.
    """

    def _build_levels(self, config, make_downscaler, make_upscaler) -> None:
        c_hidden, nhead, level_config = config.c_hidden, config.nhead, config.level_config
        dropout = config.dropout
        n = len(c_hidden)

        def block(kind: str, i: int, c_skip: int = 0) -> nn.Module:
            if kind == "C":
                return ResBlock(c_hidden[i], c_skip, kernel_size=config.kernel_size, dropout=dropout[i])
            if kind == "A":
                return AttnBlock(c_hidden[i], config.c_cond, nhead[i], self_attn=config.self_attn, dropout=dropout[i])
            if kind == "T":
                return TimestepBlock(c_hidden[i], config.c_r, conds=config.t_conds)
            raise ValueError(f"level_config: unknown block type {kind!r}; allowed are 'C', 'T', 'A'")

        def repeat_mappers(count: int, c: int) -> nn.ModuleList:
            return nn.ModuleList(nn.Conv2d(c, c, kernel_size=1) for _ in range(count - 1))

        self.down_blocks, self.down_downscalers, self.down_repeat_mappers = (
            nn.ModuleList(),
            nn.ModuleList(),
            nn.ModuleList(),
        )
        for i in range(n):
            self.down_downscalers.append(
                make_downscaler(c_hidden[i - 1], c_hidden[i], i - 1) if i > 0 else nn.Identity()
            )
            self.down_blocks.append(
                nn.ModuleList(block(kind, i) for _ in range(config.blocks[0][i]) for kind in level_config[i])
            )
            self.down_repeat_mappers.append(repeat_mappers(config.block_repeat[0][i], c_hidden[i]))

        # Up levels are stored deepest first; `blocks[1]` and `block_repeat[1]` list them in that order too.
        self.up_blocks, self.up_upscalers, self.up_repeat_mappers = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(n)):
            self.up_upscalers.append(make_upscaler(c_hidden[i], c_hidden[i - 1], i - 1) if i > 0 else nn.Identity())
            blocks = []
            for j in range(config.blocks[1][::-1][i]):
                for k, kind in enumerate(level_config[i]):
                    # Only the level's very first block takes the skip connection (not the deepest level's).
                    c_skip = c_hidden[i] if i < n - 1 and j == k == 0 else 0
                    blocks.append(block(kind, i, c_skip))
            self.up_blocks.append(nn.ModuleList(blocks))
            self.up_repeat_mappers.append(repeat_mappers(config.block_repeat[1][::-1][i], c_hidden[i]))
        # Plain tuples (not registered again): the order of condition_kv's and condition_bias's packing, and each
        # block's width in it, which _block_conditions splits the packed tensors by at every pass.
        self.attention_blocks = tuple(m for m in self.modules() if isinstance(m, AttnBlock))
        self.timestep_blocks = tuple(m for m in self.modules() if isinstance(m, TimestepBlock))
        self.kv_widths = [block.attention.attn.embed_dim for block in self.attention_blocks]
        self.t_bias_widths = [block.mapper.out_features for block in self.timestep_blocks]

    def condition_kv(self, clip: torch.Tensor) -> torch.Tensor:
        """The condition tokens (B, T, c_cond) -> each attention block's mapping of them (its `kv_mapper`), side by
        side in one tensor (B, T, sum of c): what a forward pass takes as `clip_kv` in place of its CLIP inputs.

        They are the same at every sampling step, so a sampling run maps them once (`precompute`) instead of at each
        step: for Stage C at 1024 px, 1.1 % of a pass's FLOPs and two kernels in each of its 64 attention blocks.
        (Their keys and values are not cached too: a block attends to [image tokens; condition tokens], and joining
        cached keys and values to the image tokens' would copy a 2c-wide tensor where the inputs' join copies a
        c-wide one; on a GPU the extra bytes about cancel the saved FLOPs, docs/PERFORMANCE.md.)"""
        kvs = [block.kv_mapper(clip) for block in self.attention_blocks]
        return torch.cat(kvs, dim=-1) if kvs else clip.new_zeros(*clip.shape[:2], 0)

    def condition_bias(self, t_cond_values: dict[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """The extra conditions (`sca`, `crp`: zero where absent, for a batch like `like`'s) -> every TimestepBlock's
        part of its modulation that r does not change, side by side (B, sum of 2c): what a forward pass takes as
        `t_bias`. Made once per sampling run, it leaves each block one matrix product per step where it had one per
        condition and their sums (for Stage C, four kernels fewer in each of its 64 TimestepBlocks)."""
        zeros = like.new_zeros(like.shape[0])
        embeds = self._t_cond_embeddings(t_cond_values, zeros)
        cond_embeds = torch.cat(embeds, dim=1) if embeds else zeros.new_zeros(len(zeros), 0)
        dtype = next(self.parameters()).dtype
        return torch.cat([block.condition_bias(cond_embeds.to(dtype)) for block in self.timestep_blocks], dim=-1)

    def _t_cond_embeddings(self, t_cond_values: dict[str, torch.Tensor], zeros: torch.Tensor) -> list[torch.Tensor]:
        """One embedding per extra condition, `zeros` (B,) where absent: the released models always see 0 for
        `sca` and `crp`."""
        values = (t_cond_values.get(name) for name in self.config.t_conds)
        return [r_embedding(zeros if value is None else value, self.config.c_r) for value in values]

    def _r_conditioning(self, r: torch.Tensor, t_cond_values: dict[str, torch.Tensor]) -> torch.Tensor:
        # r plus one embedding per extra condition.
        return torch.cat(
            [r_embedding(r, self.config.c_r), *self._t_cond_embeddings(t_cond_values, torch.zeros_like(r))], 1
        )

    def _r_embed(self, r: torch.Tensor, t_cond_values: dict[str, torch.Tensor], t_bias: torch.Tensor | None):
        """r's embedding for the blocks: with the extra conditions' after it, or alone where t_bias holds them."""
        if t_bias is None:
            return self._r_conditioning(r, t_cond_values)
        if t_cond_values:
            raise ValueError(f"{', '.join(sorted(t_cond_values))}: given with t_bias, which already holds them")
        return r_embedding(r, self.config.c_r)

    def _block_conditions(
        self, cond: Conditioning, clip_kv: torch.Tensor | None, t_bias: torch.Tensor | None = None
    ) -> dict[nn.Module, Conditioning]:
        """Each attention block's and TimestepBlock's Conditioning with its own part of clip_kv and t_bias (views);
        blocks not in it take cond."""
        conds = {}
        for blocks, packed, name, widths in (
            (self.attention_blocks, clip_kv, "kv", self.kv_widths),
            (self.timestep_blocks, t_bias, "t_bias", self.t_bias_widths),
        ):
            if packed is None:
                continue
            if packed.shape[-1] != sum(widths):
                what = "clip_kv" if name == "kv" else name
                raise ValueError(f"{what}: {packed.shape[-1]} channels; this model's blocks take {sum(widths)}")
            for block, part in zip(blocks, packed.split(widths, dim=-1)):
                conds[block] = cond._replace(**{name: part})
        return conds

    def _down_encode(self, x: torch.Tensor, cond: Conditioning, conds: dict) -> list[torch.Tensor]:
        """conds: _block_conditions' per-block Conditioning, where a block has its own (else cond)."""
        level_outputs = []
        for blocks, downscaler, repeat_mappers in zip(
            self.down_blocks, self.down_downscalers, self.down_repeat_mappers
        ):
            x = downscaler(x)
            for pass_index in range(len(repeat_mappers) + 1):
                for block in blocks:
                    x = block(x, conds.get(block, cond))
                if pass_index < len(repeat_mappers):
                    x = repeat_mappers[pass_index](x)
            level_outputs.insert(0, x)  # deepest first
        return level_outputs

    def _up_decode(self, level_outputs: list[torch.Tensor], cond: Conditioning, conds: dict) -> torch.Tensor:
        x = level_outputs[0]
        for i, (blocks, upscaler, repeat_mappers) in enumerate(
            zip(self.up_blocks, self.up_upscalers, self.up_repeat_mappers)
        ):
            skip = level_outputs[i] if i > 0 else None
            for pass_index in range(len(repeat_mappers) + 1):
                if skip is not None and x.shape[-2:] != skip.shape[-2:]:
                    # Odd latent sizes: the transposed conv overshoots or undershoots the down path's grid.
                    x = interpolate_like(x, skip.shape[-2:])
                x = blocks[0](x, conds.get(blocks[0], cond), skip)
                for block in blocks[1:]:
                    x = block(x, conds.get(block, cond))
                if pass_index < len(repeat_mappers):
                    x = repeat_mappers[pass_index](x)
            x = upscaler(x)
        return x

    def _init_weights(self) -> None:
        """The reference's initialisation (used when training from scratch; loading overwrites it)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.embedding[1].weight, 0.02)  # inputs
        nn.init.zeros_(self.clf[1].weight)  # outputs start at zero
        depth_scale = math.sqrt(1 / sum(self.config.blocks[0]))
        for level in list(self.down_blocks) + list(self.up_blocks):
            for block in level:
                if isinstance(block, ResBlock):
                    block.channelwise[-1].weight.data *= depth_scale
                elif isinstance(block, TimestepBlock):
                    for layer in block.modules():
                        if isinstance(layer, nn.Linear):
                            nn.init.zeros_(layer.weight)  # modulation starts as identity
