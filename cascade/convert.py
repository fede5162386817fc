"""Translation between the two official checkpoint layouts: Stability's single files and diffusers' folders.

Our modules use Stability's key names. diffusers (`StableCascadeUNet`, `PaellaVQModel`) differs only in
 - attention: the fused `attention.attn.in_proj_{weight,bias}` is split into `attention.to_{q,k,v}`, and
   `attention.attn.out_proj` is `attention.to_out.0`;
 - Stage B: `clip_mapper` is `clip_txt_pooled_mapper`;
 - Stage A: `vquantizer.codebook` is `vquantizer.embedding`.
Reference: huggingface/diffusers `loaders/single_file_utils.py` (convert_stable_cascade_unet_single_file_to_diffusers)
and `scripts/convert_stable_cascade.py`. Configs map field by field (stable-cascade.md section 7).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .stage_b import StageBConfig
from .stage_c import StageCConfig

_BLOCK_NAMES = {"C": "SDCascadeResBlock", "T": "SDCascadeTimestepBlock", "A": "SDCascadeAttnBlock"}
_BLOCK_CODES = {v: k for k, v in _BLOCK_NAMES.items()}

# ---------------------------------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------------------------------

KeyPlan = dict[str, tuple[str, ...]]  # our key -> the source keys it is made of (one, or q/k/v to concatenate)


def diffusers_key_plan(kind: str, source_keys: Iterable[str]) -> KeyPlan:
    """For each of our keys, the diffusers keys that make it. Unknown keys pass through unchanged."""
    plan: KeyPlan = {}
    for key in source_keys:
        if ".attention.to_q." in key:
            prefix, suffix = key.split(".attention.to_q.")
            plan[f"{prefix}.attention.attn.in_proj_{suffix}"] = tuple(
                f"{prefix}.attention.to_{p}.{suffix}" for p in ("q", "k", "v")
            )
        elif ".attention.to_k." in key or ".attention.to_v." in key:
            continue  # folded into the to_q entry
        elif ".attention.to_out.0." in key:
            plan[key.replace(".attention.to_out.0.", ".attention.attn.out_proj.")] = (key,)
        elif kind == "stage_b" and key.startswith("clip_txt_pooled_mapper."):
            plan[key.replace("clip_txt_pooled_mapper.", "clip_mapper.", 1)] = (key,)
        elif kind == "stage_a" and key.startswith("vquantizer.embedding."):
            plan[key.replace("vquantizer.embedding.", "vquantizer.codebook.", 1)] = (key,)
        else:
            plan[key] = (key,)
    return plan


def assemble(parts: list[torch.Tensor]) -> torch.Tensor:
    """One tensor from the source tensors a KeyPlan entry names (q, k, v stack along dim 0 into in_proj)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def to_diffusers_state_dict(kind: str, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our (Stability) keys -> diffusers keys; the inverse of `diffusers_key_plan`."""
    out = {}
    for key, value in state_dict.items():
        if ".attention.attn.in_proj_" in key:
            prefix, suffix = key.split(".attention.attn.in_proj_")
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                out[f"{prefix}.attention.to_{name}.{suffix}"] = part.clone()
        elif ".attention.attn.out_proj." in key:
            out[key.replace(".attention.attn.out_proj.", ".attention.to_out.0.")] = value
        elif kind == "stage_b" and key.startswith("clip_mapper."):
            out[key.replace("clip_mapper.", "clip_txt_pooled_mapper.", 1)] = value
        elif kind == "stage_a" and key.startswith("vquantizer.codebook."):
            out[key.replace("vquantizer.codebook.", "vquantizer.embedding.", 1)] = value
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------------------


def unet_kind_from_diffusers_config(cfg: dict) -> str:
    return "stage_b" if cfg.get("effnet_in_channels") is not None else "stage_c"


def unet_config_from_diffusers(cfg: dict) -> StageCConfig | StageBConfig:
    """A `StableCascadeUNet` config.json (prior/ or decoder/) -> StageCConfig or StageBConfig."""
    n = len(cfg["block_out_channels"])
    dropout = cfg.get("dropout", 0.0)
    dropout = tuple(dropout) if isinstance(dropout, (list, tuple)) else (float(dropout),) * n
    self_attn = cfg.get("self_attn", True)
    if isinstance(self_attn, (list, tuple)):
        if len(set(self_attn)) != 1:
            raise ValueError(f"self_attn: per-level values {self_attn} are not supported; use one boolean")
        self_attn = self_attn[0]
    common = dict(
        c_in=cfg["in_channels"],
        c_out=cfg["out_channels"],
        c_r=cfg["timestep_ratio_embedding_dim"],
        patch_size=cfg["patch_size"],
        c_cond=cfg["conditioning_dim"],
        c_hidden=tuple(cfg["block_out_channels"]),
        # diffusers writes 0 where a level has no attention; the reference writes -1. Neither is ever used.
        nhead=tuple(h if h > 0 else -1 for h in cfg["num_attention_heads"]),
        blocks=(tuple(cfg["down_num_layers_per_block"]), tuple(cfg["up_num_layers_per_block"])),
        block_repeat=(tuple(cfg["down_blocks_repeat_mappers"]), tuple(cfg["up_blocks_repeat_mappers"])),
        level_config=tuple("".join(_BLOCK_CODES[b] for b in level) for level in cfg["block_types_per_layer"]),
        c_clip_seq=cfg["clip_seq"],
        kernel_size=cfg.get("kernel_size", 3),
        dropout=dropout,
        self_attn=bool(self_attn),
        t_conds=tuple(cfg["timestep_conditioning_type"]),
    )
    if unet_kind_from_diffusers_config(cfg) == "stage_b":
        return StageBConfig(
            **common,
            c_clip=cfg["clip_text_pooled_in_channels"],
            c_effnet=cfg["effnet_in_channels"],
            c_pixels=cfg["pixel_mapper_in_channels"],
        )
    return StageCConfig(
        **common,
        c_clip_text=cfg["clip_text_in_channels"],
        c_clip_text_pooled=cfg["clip_text_pooled_in_channels"],
        c_clip_img=cfg["clip_image_in_channels"],
        switch_level=tuple(cfg.get("switch_level") or (False,)),
    )


def unet_config_to_diffusers(config: StageCConfig | StageBConfig) -> dict:
    """StageCConfig / StageBConfig -> the keyword arguments of diffusers' `StableCascadeUNet`."""
    is_b = isinstance(config, StageBConfig)
    return dict(
        in_channels=config.c_in,
        out_channels=config.c_out,
        timestep_ratio_embedding_dim=config.c_r,
        patch_size=config.patch_size,
        conditioning_dim=config.c_cond,
        block_out_channels=list(config.c_hidden),
        num_attention_heads=[max(h, 0) for h in config.nhead],
        down_num_layers_per_block=list(config.blocks[0]),
        up_num_layers_per_block=list(config.blocks[1]),
        down_blocks_repeat_mappers=list(config.block_repeat[0]),
        up_blocks_repeat_mappers=list(config.block_repeat[1]),
        block_types_per_layer=[[_BLOCK_NAMES[c] for c in level] for level in config.level_config],
        clip_text_in_channels=None if is_b else config.c_clip_text,
        clip_text_pooled_in_channels=config.c_clip if is_b else config.c_clip_text_pooled,
        clip_image_in_channels=None if is_b else config.c_clip_img,
        clip_seq=config.c_clip_seq,
        effnet_in_channels=config.c_effnet if is_b else None,
        pixel_mapper_in_channels=config.c_pixels if is_b else None,
        kernel_size=config.kernel_size,
        dropout=list(config.dropout),
        self_attn=config.self_attn,
        timestep_conditioning_type=list(config.t_conds),
        switch_level=None if is_b else list(config.switch_level),
    )
