"""Float8 linear layers on a GPU (sm_89+): a module of its own because its reference is the float32 emulation of the
arithmetic, not the CPU's torch._scaled_mm, which needs torch 2.13 (a device's torch may be older)."""

import pytest
import torch
from torch import nn

from cascade import gdf
from cascade.family import tiny_models
from cascade.float8 import Float8Linear, float8_linears, float8_supported
from cascade.pipeline import prior_conditions
from cascade.speed import compile_blocks
from tests.helpers import float8_reference


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.gpu
@pytest.mark.skipif(
    torch.cuda.is_available() and float8_supported(torch.device("cuda")) is not None,
    reason=str(torch.cuda.is_available() and float8_supported(torch.device("cuda"))),
)
def test_float8_on_a_gpu_matches_its_arithmetic_eager_and_compiled():
    """On a GPU: a layer's output is its e4m3 arithmetic's (emulated in float32), and a tiny Stage C in float8, eager
    and with compiled blocks (which fuse the scaling into other kernels and round on their own), samples close to
    the bf16 one."""
    torch.manual_seed(0)
    layer = nn.Linear(256, 128).to(torch.bfloat16).cuda()
    fast = Float8Linear.from_linear(layer)
    for rows in (300, 7):  # any number of rows, not only multiples of 16
        x = torch.randn(rows, 256, dtype=torch.bfloat16, device="cuda")
        assert relative_error(fast(x), float8_reference(fast, x)) < 0.01
    models = tiny_models(device=torch.device("cuda"), dtype=torch.bfloat16)
    cond, uncond = prior_conditions(models, models.text_encoder.encode(["a red circle", ""]), 1)

    def sample(model):
        with torch.inference_mode():
            denoiser = gdf.guided_denoiser(model, cond, uncond, 4.0)
            return gdf.sample(denoiser, [torch.Generator().manual_seed(3)], (16, 24, 24), steps=3, device="cuda")

    bf16 = sample(models.stage_c)
    float8_linears(models.stage_c)
    assert relative_error(sample(models.stage_c), bf16) < 0.1
    compile_blocks(models.stage_c)
    assert relative_error(sample(models.stage_c), bf16) < 0.1
