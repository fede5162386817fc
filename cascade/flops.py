"""Model FLOPs per image, and the device's measured matrix-product rate: what model-FLOPs utilisation (MFU) divides.

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` over one forward pass of each stage, built from the
loaded family's configurations on the `meta` device (no weights allocated, nothing computed), at the image size
asked for. Sampling multiplies the Stage C and Stage B passes by the steps, and by 2 where guidance needs the
unconditional pass (cfg != 1); the text encoder runs twice per image (the prompt and the negative prompt).
For the official family at 1024 x 1024: Stage C 4.08 TFLOP per pass, Stage B 6.17 (tests/test_flops.py).
"""

from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from .request import latent_sizes
from .text import MAX_LENGTH


def _count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def forward_flops(models, size: int) -> dict[str, int]:
    """FLOPs of one forward pass per image, per stage ("text", "stage_c", "stage_b", "stage_a"), at size x size.
    Stages the family does not hold (a half loaded by a pool actor) are left out."""
    shape_c, shape_b = latent_sizes(size, size, models.geometry)
    flops = {}
    with torch.device("meta"):
        if models.text_encoder is not None:
            model = type(models.text_encoder.model)(models.text_encoder.model.config)
            ids = torch.zeros(1, MAX_LENGTH, dtype=torch.long)
            flops["text"] = _count(lambda: model(input_ids=ids, output_hidden_states=True))
        if models.stage_c is not None:
            c = type(models.stage_c)(models.stage_c.config)
            cfg = c.config
            inputs = (torch.zeros(1, *shape_c), torch.zeros(1), torch.zeros(1, MAX_LENGTH, cfg.c_clip_text),
                      torch.zeros(1, 1, cfg.c_clip_text_pooled), torch.zeros(1, 1, cfg.c_clip_img))  # fmt: skip
            flops["stage_c"] = _count(lambda: c(*inputs))
        if models.stage_b is not None:
            b = type(models.stage_b)(models.stage_b.config)
            x, effnet = torch.zeros(1, *shape_b), torch.zeros(1, *shape_c)
            clip = torch.zeros(1, 1, b.config.c_clip)
            flops["stage_b"] = _count(lambda: b(x, torch.zeros(1), effnet=effnet, clip=clip))
        if models.stage_a is not None:
            a = type(models.stage_a)(models.stage_a.config)
            flops["stage_a"] = _count(lambda: a.decode(torch.zeros(1, *shape_b)))
    return flops


def sampling_flops(
    forward: dict[str, int], prior_steps: int, decoder_steps: int, prior_cfg: float = 4.0, decoder_cfg: float = 1.1
) -> dict[str, int]:
    """FLOPs per image of each stage's whole work in the pipeline (see the module docstring)."""
    passes = {
        "text": 2,
        "stage_c": prior_steps * (1 if prior_cfg == 1 else 2),
        "stage_b": decoder_steps * (1 if decoder_cfg == 1 else 2),
        "stage_a": 1,
    }
    return {stage: forward[stage] * passes[stage] for stage in forward}


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int | None = None, seconds: float = 1.0) -> float:
    """The device's measured rate of dense n x n matrix products in `dtype`, FLOP/s: the achievable peak that MFU is
    measured against (on an H100, bf16: about 790 TFLOP/s; its data sheet says 989)."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    runs, start = 0, None
    while True:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if start is None:
            start = time.perf_counter()
        elapsed = time.perf_counter() - start
        if runs and elapsed >= seconds:
            return 2 * n**3 * runs / elapsed
        for _ in range(10):
            a @ b
        runs += 10
