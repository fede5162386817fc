"""Float8 linear layers (cascade/float8.py): the arithmetic (on the CPU, torch._scaled_mm runs it as a GPU would),
which layers a Stage B / Stage C swaps, the error it costs, and the devices it refuses."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cascade import gdf
from cascade.blocks import Attention2D, ResBlock
from cascade.family import tiny_models
from cascade.float8 import E4M3, E4M3_MAX, Float8Linear, float8_linears, float8_supported, scale_rows
from cascade.pipeline import prior_conditions
from jobs.bench import stage_conditions
from tests.helpers import float8_reference, load_script

# Every test here checks against the CPU's arithmetic, which needs torch 2.13 (cascade.float8.MIN_TORCH).
pytestmark = pytest.mark.skipif(
    float8_supported(torch.device("cpu")) is not None, reason=str(float8_supported(torch.device("cpu")))
)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_rows_are_scaled_to_the_float8_range_each_by_its_own_maximum():
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [1e-3, 3e-3, -2e-3], [900.0, 1.0, 0.0]])
    q, scale = scale_rows(x)
    assert q.dtype == E4M3 and scale.shape == (4, 1) and scale.dtype == torch.float32
    assert q.float().abs().amax(dim=1).tolist() == [E4M3_MAX, 0.0, E4M3_MAX, E4M3_MAX]  # each row uses the range
    assert torch.isfinite(scale).all() and (q[1].float() == 0).all()  # a zero row stays zeros, no 0 / 0
    torch.testing.assert_close(q.float() * scale, x, rtol=0.07, atol=0)  # e4m3: 3 mantissa bits
    bf16 = x.to(torch.bfloat16)  # in bf16 the factor is rounded to bf16: the scale is its inverse, not 448's
    q16, scale16 = scale_rows(bf16)
    assert q16.float().abs().amax(dim=1).tolist() == [E4M3_MAX, 0.0, E4M3_MAX, E4M3_MAX]
    torch.testing.assert_close(q16.float() * scale16, bf16.float(), rtol=0.07, atol=0)


@pytest.mark.parametrize("bias", [True, False])
def test_a_float8_linear_layer_computes_the_layer_to_float8_precision(bias):
    torch.manual_seed(0)
    layer = nn.Linear(128, 96, bias=bias).to(torch.bfloat16)
    fast = Float8Linear.from_linear(layer)
    assert fast.weight.dtype == E4M3 and fast.weight_scale.shape == (1, 96)
    for shape in [(2, 40, 128), (7, 128), (1, 1, 128)]:  # 80, 7 and 1 rows: any number of rows
        x = torch.randn(*shape, dtype=torch.bfloat16) * 3
        y, ref = fast(x), F.linear(x.float(), layer.weight.float(), None if layer.bias is None else layer.bias.float())
        assert y.shape == (*shape[:-1], 96) and y.dtype == torch.bfloat16
        err = relative_error(y, ref)
        assert 0.005 < err < 0.08, err  # float8's error (bf16's own is about 0.004), not more
        # ... and exactly its e4m3 arithmetic (the GPU test's reference, emulated without torch._scaled_mm)
        assert relative_error(y, float8_reference(fast, x)) < 0.01


def test_a_permuted_input_is_scaled_where_it_lies_and_gives_what_its_contiguous_copy_gives():
    """A ResBlock's MLP input is a channels-last view of an NCHW map: it is read in place, not copied first."""
    layer = Float8Linear.from_linear(nn.Linear(64, 32).to(torch.bfloat16))
    nchw = torch.randn(2, 64, 5, 7, dtype=torch.bfloat16)
    view = nchw.permute(0, 2, 3, 1)  # (B, H, W, C), not contiguous
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        q, scale = scale_rows(view)
    assert q.is_contiguous() and q.shape == (2, 5, 7, 64) and scale.shape == (2, 5, 7, 1)
    ops = [e.name for e in prof.events()]
    assert "aten::clone" not in ops and "aten::contiguous" not in ops, ops  # the one copy is the cast to e4m3
    assert torch.equal(layer(view), layer(view.contiguous()))


def test_feature_sizes_that_are_not_multiples_of_16_are_refused():
    with pytest.raises(ValueError, match="40 -> 24 features; both must be multiples of 16"):
        Float8Linear.from_linear(nn.Linear(40, 24))


def test_the_generators_token_layers_are_swapped_and_their_output_stays_close():
    torch.manual_seed(0)
    models = tiny_models(dtype=torch.bfloat16)
    for name in ("stage_c", "stage_b"):
        model = getattr(models, name)
        fast = copy.deepcopy(model)
        count = float8_linears(fast)
        res = sum(isinstance(m, ResBlock) for m in fast.modules())
        attn = sum(isinstance(m, Attention2D) for m in fast.modules())
        assert count == 2 * res + 3 * attn > 0
        assert sum(isinstance(m, Float8Linear) for m in fast.modules()) == 2 * res + 3 * attn  # q, kv, out
        assert not any(isinstance(m, nn.Linear) for block in fast.modules() if isinstance(block, ResBlock)
                       for m in block.modules())  # fmt: skip
        assert all(m.attn.in_proj_weight is None for m in fast.modules() if isinstance(m, Attention2D))
        assert float8_linears(fast) == 0  # a second call finds nothing left to swap
        cond, _, shape = stage_conditions(models, 2, 512, "a red circle", "")[name]
        x, r = torch.randn(2, *shape, dtype=torch.bfloat16), torch.full((2,), 0.5)
        with torch.inference_mode():
            err = relative_error(fast(x, r, **cond), model(x, r, **cond))
        assert 0.005 < err < 0.1, (name, err)


def test_a_float8_stage_c_samples_finite_latents_near_bf16s():
    models = tiny_models(dtype=torch.bfloat16)
    cond, uncond = prior_conditions(models, models.text_encoder.encode(["a red circle", ""]), 1)
    latents = []
    for convert in (False, True):
        model = copy.deepcopy(models.stage_c)
        if convert:
            float8_linears(model)
        with torch.inference_mode():
            denoiser = gdf.guided_denoiser(model, cond, uncond, 4.0)
            latents.append(gdf.sample(denoiser, [torch.Generator().manual_seed(3)], (16, 6, 6), steps=4))
    assert torch.isfinite(latents[1]).all()
    assert relative_error(latents[1], latents[0]) < 0.1


def test_devices_without_float8_products_are_refused_with_the_reason():
    assert float8_supported(torch.device("cpu")) is None
    assert float8_supported(torch.device("cuda"), capability=(9, 0)) is None  # Hopper, bf16
    assert float8_supported(torch.device("cuda"), capability=(8, 9)) is None  # Ada
    # Row-wise scaled products came to Ada in torch 2.7 and to the CPU in 2.13 (Hopper's are older than the floor).
    assert float8_supported(torch.device("cuda"), capability=(8, 9), version="2.6.0+cu124") == (
        "float8 products on an Ada GPU need torch 2.7 or later (row-wise scaled products); this is torch 2.6.0+cu124"
    )
    assert float8_supported(torch.device("cuda"), capability=(9, 0), version="2.5.1") is None
    assert "on a CPU need torch 2.13 or later" in float8_supported(torch.device("cpu"), version="2.12.0+cpu")
    assert float8_supported(torch.device("cpu"), version="2.14.0.dev20261101+cpu") is None
    message = float8_supported(torch.device("cuda"), capability=(8, 0))  # A100
    assert message == "float8 products need a GPU of compute capability 8.9 or later (Ada, Hopper); this one is 8.0"
    assert "NVIDIA GPU" in float8_supported(torch.device("mps"))
    message = float8_supported(torch.device("cuda"), torch.float16, capability=(9, 0))
    assert message == "float8 products on a GPU need the model in bfloat16; this one is in torch.float16"
    model = nn.Sequential(nn.Linear(16, 16)).to("meta")
    with pytest.raises(RuntimeError, match="float8 products need an NVIDIA GPU; this device is meta"):
        float8_linears(model)


def test_the_benchmark_and_the_profile_run_with_float8_layers(tmp_path, capsys, monkeypatch):
    """`jobs.bench --fp8` and scripts/profile_stages.py's `fp8` variant (parts of the GPU session) run, and the
    profile reports the float8 pass's error against ours. The bench converts Stage C only, as the job's fp8 setting
    does (Stage B in float8 measured 2 % slower on an H200), and without --compile, which the job's fp8 needs, it
    leaves the Ray pipeline's figure out."""
    import json

    import jobs.bench
    from jobs.bench import main as bench

    measured, real_measure = [], jobs.bench.measure

    def measure(models, *rest):
        measured.append(models)
        return real_measure(models, *rest)

    monkeypatch.setattr(jobs.bench, "measure", measure)
    args = ["--size", "256", "--batch", "1", "--prior-steps", "1", "--decoder-steps", "1", "--repeats", "1"]
    assert bench([*args, "--warmup", "0", "--no-diffusers", "--fp8"]) == 0  # (--ray-prompts: its default, 32)
    err = capsys.readouterr().err
    assert "linear layers of Stage C as float8 products (Stage B stays in float32)" in err
    assert "no Ray pipeline figure with --fp8 without --compile: the job's fp8 setting needs compile" in err
    (models,) = measured
    stage_c, stage_b = (
        [m for m in s.modules() if isinstance(m, Float8Linear)] for s in (models.stage_c, models.stage_b)
    )
    assert len(stage_c) > 0 and stage_b == []
    script = load_script("profile_stages")
    out = tmp_path / "profile.json"
    args = ["--model", "tiny", "--size", "256", "--batch", "1", "--top", "2", "--variants", "ours", "fp8"]
    assert script.main([*args, "--json", str(out)]) == 0
    rows = {(r["stage"], r["variant"]): r for r in json.loads(out.read_text())}
    for stage in ("stage_c", "stage_b"):
        assert "relative_error_vs_ours" not in rows[stage, "ours"]
        assert 0.005 < rows[stage, "fp8"]["relative_error_vs_ours"] < 0.1

    # A variant that fails (a kernel a new card refuses) is recorded with its error, and the others still run.
    real = script.profile

    def profile(models, stage, batch, size, top, variant, twin):
        if variant == "fp8":
            raise RuntimeError("CUBLAS_STATUS_NOT_SUPPORTED")
        return real(models, stage, batch, size, top, variant, twin)

    script.profile = profile
    args = ["--model", "tiny", "--size", "256", "--batch", "1", "--top", "2", "--variants", "fp8", "ours"]
    assert script.main([*args, "--json", str(out)]) == 1
    rows = {(r["stage"], r["variant"]): r for r in json.loads(out.read_text())}
    assert rows["stage_b", "fp8"]["error"] == "RuntimeError: CUBLAS_STATUS_NOT_SUPPORTED"
    assert rows["stage_b", "ours"]["wall_ms_per_pass"] > 0


def test_the_quality_script_judges_the_demo_in_float32_bf16_and_float8(tmp_path):
    """scripts/float8_quality.py: the same requests rendered three ways, each way's distance from float32's images
    and the checker's reading of them (a small run; docs/PERFORMANCE.md has the figures at 400 per split)."""
    import json

    script = load_script("float8_quality")
    out = tmp_path / "quality.json"
    assert script.main(["--samples", "4", "--json", str(out)]) == 0
    ways = json.loads(out.read_text())["ways"]
    assert list(ways) == ["fp32", "bf16", "bf16+fp8"]
    assert ways["fp32"]["psnr_vs_fp32_db"]["identical"] == 8  # 4 per split, the reference itself
    assert ways["bf16"]["psnr_vs_fp32_db"]["identical"] < 8 and ways["bf16"]["psnr_vs_fp32_db"]["mean"] > 35
    assert 20 < ways["bf16+fp8"]["psnr_vs_fp32_db"]["mean"] < ways["bf16"]["psnr_vs_fp32_db"]["mean"]
    for way in ways.values():
        assert set(way["heldout"]) == {"colour", "shape", "position", "all"}


def test_the_byte_count_sees_float8_s_scaling_passes_and_not_its_products():
    """scripts/memory_traffic.py --fp8 counts on the meta device: the row maxima, the product by the factor and the
    cast are memory-bound bytes added to the pass; the float8 products themselves are compute, counted as none."""

    traffic = load_script("memory_traffic")
    with torch.device("meta"):
        plain = traffic.StageC(traffic.STAGE_C_TINY).to(torch.bfloat16).eval()
        fast = copy.deepcopy(plain)
        assert float8_linears(fast, check_device=False) > 0  # on meta: only for counting
        before, after = (traffic.count(s, 1, 256, torch.bfloat16, True) for s in (plain, fast))
    assert "_scaled_mm" not in after.bytes and after.bytes["gelu"] == before.bytes["gelu"]
    assert after.bytes["mul"] > before.bytes["mul"] and after.bytes["linalg_vector_norm"] > before.bytes[
        "linalg_vector_norm"]  # fmt: skip
    assert sum(after.bytes.values()) > sum(before.bytes.values()) and after.operations > before.operations
