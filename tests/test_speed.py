"""The fast path: attention computed as nn.MultiheadAttention does, compiled blocks and CUDA graphs (cascade/speed.py)
give the same results as eager mode."""

import pytest
import torch

from cascade import gdf
from cascade.blocks import AttnBlock, GlobalResponseNorm, ResBlock, TimestepBlock, hw_l2_norm, multihead_attention
from cascade.family import tiny_models
from cascade.pipeline import prior_conditions
from cascade.speed import CudaGraphed, channels_last, compile_blocks, cuda_graphs
from jobs.bench import main as bench


def stage_c_sample(models, device: str) -> torch.Tensor:
    cond, uncond = prior_conditions(models, models.text_encoder.encode(["a red circle", ""]), 1)
    denoiser = gdf.guided_denoiser(models.stage_c, cond, uncond, 4.0)
    with torch.inference_mode():
        return gdf.sample(denoiser, [torch.Generator().manual_seed(3)], (16, 4, 4), steps=3, device=device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_grn_norm_in_one_reduction_equals_the_sum_of_squares(dtype):
    """GRN's L2 norm over H and W as one float32-accumulating reduction (the GPU's default) equals the sum of squares
    (the CPU's): values in every dtype, float16 beyond its square's range (|x| > 256) included, and gradients, a zero
    image-channel's 0 included (torch.norm's, not NaN)."""
    x = torch.randn(3, 5, 7, 16) * torch.tensor([1.0, 300.0, 0.01])[:, None, None, None]
    x[0, :, :, 2] = 0
    x = x.to(dtype)
    fused, squares = hw_l2_norm(x, fused=True), hw_l2_norm(x, fused=False)
    assert fused.dtype == dtype and fused.shape == (3, 1, 1, 16) and torch.isfinite(fused).all()
    torch.testing.assert_close(fused, squares, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=0)
    grads = []
    for flag in (True, False):
        leaf = x.float().requires_grad_()
        hw_l2_norm(leaf, fused=flag).sum().backward()
        grads.append(leaf.grad)
    assert torch.isfinite(grads[0]).all() and (grads[0][0, :, :, 2] == 0).all()
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def squares_calls(monkeypatch) -> list:
    """Record each call of GRN's sum-of-squares norm (the CPU's way; a GPU takes the one-reduction norm)."""
    import cascade.blocks as blocks

    calls, real = [], blocks.hw_l2_norm_by_squares
    monkeypatch.setattr(blocks, "hw_l2_norm_by_squares", lambda x: calls.append(x.device.type) or real(x))
    return calls


def test_grn_on_a_cpu_takes_the_sum_of_squares_by_default(monkeypatch):
    calls = squares_calls(monkeypatch)
    GlobalResponseNorm(8)(torch.randn(1, 4, 4, 8))
    assert calls == ["cpu"]


def grn_within_bfloat16(grn: GlobalResponseNorm, x: torch.Tensor, got: torch.Tensor) -> float:
    """The largest error of a bf16 GRN's output `got` in units of what bf16 allows: against float32 arithmetic on the
    input and parameters as bf16 holds them, each element may be off by 2^-6 of the magnitudes it is made from,
    x * (gamma * nx) and x and the output (a few roundings of 2^-9 each; an output that nearly cancels keeps its
    terms' error, so a bound relative to the output alone fails for a correct bf16 GRN)."""
    xb = x.bfloat16().float()
    gamma, beta = (p.detach().bfloat16().float() for p in (grn.gamma, grn.beta))
    gx = xb.square().sum(dim=(1, 2), keepdim=True).sqrt()
    scaled = gamma * gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)  # gamma * nx
    expected = beta + xb * (scaled + 1)
    allowed = 2**-6 * (xb.abs() * (scaled.abs() + (scaled + 1).abs()) + expected.abs())
    return ((got.float().cpu() - expected).abs() / allowed).max().item()


def test_a_bfloat16_grn_is_as_close_as_bfloat16_allows_either_way():
    """The bound the GPU test uses holds for a correct bf16 GRN on the CPU, by either norm, with room to spare, and
    a wrong norm (one spatial dimension, not both) is far outside it."""
    for seed in range(20):
        torch.manual_seed(seed)
        grn = GlobalResponseNorm(64)
        with torch.no_grad():
            grn.gamma.normal_()
            grn.beta.normal_()
        x = torch.randn(2, 24, 24, 64)
        low = GlobalResponseNorm(64).to(torch.bfloat16)
        low.load_state_dict(grn.state_dict())
        for fused in (True, False):
            low.fused = fused
            assert grn_within_bfloat16(grn, x, low(x.bfloat16())) < 0.75
    wrong = torch.linalg.vector_norm(x.bfloat16().float(), dim=1, keepdim=True)[:, :, :1]
    nx = wrong / wrong.mean(dim=-1, keepdim=True)
    assert grn_within_bfloat16(grn, x, grn.beta + x * (grn.gamma * nx + 1)) > 5


@pytest.mark.gpu
def test_grn_on_a_gpu_computes_what_it_does_on_the_cpu(monkeypatch):
    """On a GPU GRN takes the one-reduction norm; in bf16 it matches float32 arithmetic to bf16's precision.
    (Until 2026-11-29 this compared against float32 from float32 inputs with rtol = atol = 2e-2, which a correct bf16
    GRN fails where the output nearly cancels: it failed on an H200, and on the CPU for 135 of 200 seeds.)"""
    torch.manual_seed(0)
    grn = GlobalResponseNorm(64)
    with torch.no_grad():
        grn.gamma.normal_()
        grn.beta.normal_()
    x = torch.randn(2, 24, 24, 64)
    calls = squares_calls(monkeypatch)
    gpu = GlobalResponseNorm(64).to("cuda", torch.bfloat16)
    gpu.load_state_dict(grn.state_dict())
    got = gpu(x.to("cuda", torch.bfloat16))
    assert calls == []  # the one-reduction norm, not the sum of squares
    assert grn_within_bfloat16(grn, x, got) < 1


@pytest.mark.parametrize("training", [False, True])
def test_multihead_attention_computes_what_the_module_does(training):
    """Our attention on nn.MultiheadAttention's parameters equals the module's own forward (image tokens over image
    + condition tokens, batch first), in eval and in training mode (dropout 0), gradients included."""
    attn = torch.nn.MultiheadAttention(32, 4, bias=True, batch_first=True).train(training)
    with torch.no_grad():
        attn.in_proj_bias.normal_()
        attn.out_proj.bias.normal_()
    queries = torch.randn(3, 10, 32, requires_grad=True)
    keys = torch.cat([queries, torch.randn(3, 4, 32)], dim=1)
    expected = attn(queries, keys, keys, need_weights=False)[0]
    got = multihead_attention(attn, queries, keys)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    grad_expected = torch.autograd.grad(expected.square().sum(), [queries, attn.in_proj_weight])
    grad_got = torch.autograd.grad(got.square().sum(), [queries, attn.in_proj_weight])
    for a, b in zip(grad_got, grad_expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def raw_conditions(models, stage: str, batch: int = 3):
    """Random inputs for one forward pass of a tiny stage: (x, r, its conditions as forward takes them raw)."""
    torch.manual_seed(11)
    if stage == "stage_c":
        cfg = models.stage_c.config
        conditions = {
            "clip_text": torch.randn(batch, 77, cfg.c_clip_text),
            "clip_text_pooled": torch.randn(batch, 1, cfg.c_clip_text_pooled),
            "clip_img": torch.randn(batch, 1, cfg.c_clip_img),
        }
        conditions.update(sca=torch.rand(batch), crp=torch.rand(batch))  # zero in the releases; here they count
        return torch.randn(batch, 16, 6, 5), torch.rand(batch), conditions
    conditions = {"effnet": torch.randn(batch, 16, 6, 5), "clip": torch.randn(batch, 1, models.stage_b.config.c_clip)}
    conditions.update(pixels=torch.rand(batch, 3, 8, 8), sca=torch.rand(batch))
    return torch.randn(batch, 4, 48, 40), torch.rand(batch), conditions


@pytest.mark.parametrize("stage", ["stage_c", "stage_b"])
def test_precomputed_conditions_give_the_same_forward_pass_as_the_raw_ones(stage):
    """`precompute` does a sampling run's step-invariant conditioning once (the CLIP tokens as every attention
    block's kv_mapper maps them; Stage B's effnet and pixel maps; the TimestepBlocks' modulation by `sca` and `crp`):
    a forward pass on its result is the one on the raw inputs, at every noise level, and it no longer reads what it
    replaced."""
    models = tiny_models()
    model = getattr(models, stage)
    x, r, conditions = raw_conditions(models, stage)
    with torch.inference_mode():
        prepared = model.precompute(x, **conditions)
        assert not set(conditions) & set(prepared) and {"clip_kv", "t_bias"} <= set(prepared)
        widths = sum(block.attention.attn.embed_dim for block in model.attention_blocks)
        assert len(model.attention_blocks) > 0 and prepared["clip_kv"].shape[-1] == widths
        widths = sum(block.mapper.out_features for block in model.timestep_blocks)
        assert len(model.timestep_blocks) > 0 and prepared["t_bias"].shape == (x.shape[0], widths)
        without = model.precompute(x, **{k: v for k, v in conditions.items() if k not in ("sca", "crp")})
        assert not torch.allclose(without["t_bias"], prepared["t_bias"])  # the extra conditions are in it
        for level in (r, 1 - r):
            expected = model(x, level, **conditions)
            assert expected.abs().max() > 0.1  # the tiny stages' weights are live: a real comparison
            torch.testing.assert_close(model(x, level, **prepared), expected, rtol=1e-5, atol=1e-5)
        other = {k: v + 1 for k, v in prepared.items()}  # the pass depends on what it was given
        assert not torch.allclose(model(x, r, **other), expected, rtol=1e-3, atol=1e-3)


def test_a_forward_pass_with_both_or_neither_of_raw_and_precomputed_conditions_is_refused():
    models = tiny_models()
    x, r, conditions = raw_conditions(models, "stage_b")
    with torch.inference_mode():
        prepared = models.stage_b.precompute(x, **conditions)
        with pytest.raises(ValueError, match="effnet and clip, or effnet_map and clip_kv"):
            models.stage_b(x, r, **conditions, clip_kv=prepared["clip_kv"])
        with pytest.raises(ValueError, match="effnet and clip, or effnet_map and clip_kv"):
            models.stage_b(x, r)
        x_c, r_c, conditions_c = raw_conditions(models, "stage_c")
        with pytest.raises(ValueError, match="clip_kv"):
            models.stage_c(x_c, r_c, clip_text=conditions_c["clip_text"])
        with pytest.raises(ValueError, match="clip_kv: 10 channels"):
            models.stage_c(x_c, r_c, clip_kv=torch.zeros(3, 85, 10))
        prepared_c = models.stage_c.precompute(x_c, **conditions_c)
        with pytest.raises(ValueError, match="sca: given with t_bias"):
            models.stage_c(x_c, r_c, **prepared_c, sca=conditions_c["sca"])


def test_compile_blocks_compiles_every_block_and_keeps_the_key_names():
    models = tiny_models(parts=("prior",))
    keys = list(models.stage_c.state_dict())
    blocks = [m for m in models.stage_c.modules() if isinstance(m, (ResBlock, TimestepBlock, AttnBlock))]
    assert compile_blocks(models.stage_c) == len(blocks) > 0
    assert all(m._compiled_call_impl is not None for m in blocks)
    assert list(models.stage_c.state_dict()) == keys  # official checkpoints and LoRA still find their tensors


def test_channels_last_samples_what_nchw_samples_under_the_same_key_names():
    """Stage C and Stage B on channels-last memory: the same samples (to float rounding), the same parameters."""
    models = tiny_models()
    before_c = stage_c_sample(models, "cpu")
    cond = {"effnet": torch.randn(2, 16, 4, 4), "clip": torch.randn(2, 1, models.stage_b.config.c_clip)}
    x, r = torch.randn(2, 4, 32, 32), torch.tensor([0.3, 0.8])
    with torch.inference_mode():
        before_b = models.stage_b(x, r, **cond)
    state = {k: v.clone() for k, v in models.stage_b.state_dict().items()}
    channels_last(models.stage_c)
    channels_last(models.stage_b)
    seen = []  # the memory layout each ResBlock's depthwise convolution gets
    for block in models.stage_b.modules():
        if isinstance(block, ResBlock):
            block.depthwise.register_forward_pre_hook(
                lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
            )
    # NHWC convolutions sum in another order: one pass differs by float rounding, three guided steps at cfg 4 by ~1e-4
    torch.testing.assert_close(stage_c_sample(models, "cpu"), before_c, rtol=1e-4, atol=5e-4)
    with torch.inference_mode():
        torch.testing.assert_close(models.stage_b(x, r, **cond), before_b, rtol=1e-5, atol=1e-5)
    assert seen and all(seen), seen
    assert models.stage_b.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in models.stage_b.state_dict().items())


def test_cuda_graphs_leave_a_cpu_stage_as_it_was():
    models = tiny_models()
    before = stage_c_sample(models, "cpu")
    cuda_graphs(models.stage_c)
    cuda_graphs(models.stage_c)  # twice is once
    assert isinstance(models.stage_c.forward, CudaGraphed) and not isinstance(
        models.stage_c.forward.forward, CudaGraphed
    )
    torch.testing.assert_close(stage_c_sample(models, "cpu"), before, rtol=0, atol=0)
    assert models.stage_c.forward.graphs == {}  # CPU tensors run eagerly: nothing captured


def test_bench_graphs_need_a_cuda_device(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    assert bench(["--size", "256", "--batch", "1", "--graphs", "--ray-prompts", "0", "--no-diffusers"]) == 2
    assert "--graphs needs a CUDA device" in capsys.readouterr().err


@pytest.mark.gpu
def test_cuda_graphs_sample_what_eager_mode_samples():
    """On a GPU: Stage C's guided loop replayed from CUDA graphs matches the eager loop, and nothing fell back."""
    models = tiny_models(device="cuda")
    eager = stage_c_sample(models, "cuda")
    cuda_graphs(models.stage_c)
    graphed = stage_c_sample(models, "cuda")
    again = stage_c_sample(models, "cuda")  # replays the captured graph with new inputs
    assert models.stage_c.forward.failed is None and len(models.stage_c.forward.graphs) == 1
    torch.testing.assert_close(graphed, eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, eager, rtol=1e-4, atol=1e-4)


def test_a_job_with_compile_compiles_its_actors_stage_after_loading():
    """`compile: true` in a job: each pool actor compiles the blocks of the stage it runs (Stage C or Stage B)."""
    from workers.stages import DecoderStage, PriorStage

    prior = PriorStage("tiny", False, "fp32", "fp32", compile=True)
    decoder = DecoderStage("tiny", False, "fp32", "fp32", compile=True)
    plain = PriorStage("tiny", False, "fp32", "fp32")

    def compiled(model):
        blocks = [m for m in model.modules() if isinstance(m, (ResBlock, TimestepBlock, AttnBlock))]
        return len(blocks) > 0 and all(m._compiled_call_impl is not None for m in blocks)

    assert compiled(prior.models.stage_c) and compiled(decoder.models.stage_b)
    assert not any(m._compiled_call_impl is not None for m in plain.models.stage_c.modules())


def test_a_job_with_fp8_runs_compiled_float8_blocks_in_its_stage_c_actors(monkeypatch):
    """`fp8: true` (which needs `compile: true`): the Stage C actor's compiled blocks hold float8 layers, swapped in
    before compiling, and render a finite latent. The one test here that compiles: tiny blocks, about 20 s cold on
    the 2-core CPU."""
    import threading

    import numpy as np

    import workers.stages
    from cascade.float8 import Float8Linear
    from cascade.speed import RECOMPILE_LIMIT
    from tests.jobhelpers import stage_block
    from workers.stages import PriorStage

    prior = PriorStage("tiny", False, "fp32", "fp32", compile=True, fp8=True)
    blocks = [m for m in prior.models.stage_c.modules() if isinstance(m, ResBlock)]
    assert blocks and all(m._compiled_call_impl is not None for m in blocks)
    assert all(isinstance(m.channelwise[0], Float8Linear) for m in blocks)
    # Called on another thread than the one that built it, as Ray Data does: Dynamo's recompile limit, a per-thread
    # setting in torch 2.13, is raised there too (it was 8 there, and blocks of a ninth shape ran eagerly).
    limits, run_prior = [], workers.stages.run_prior
    monkeypatch.setattr(
        workers.stages, "run_prior", lambda *a: limits.append(torch._dynamo.config.recompile_limit) or run_prior(*a)
    )
    result = []
    worker = threading.Thread(target=lambda: result.append(prior(stage_block(1))))
    worker.start()
    worker.join()
    assert limits == [RECOMPILE_LIMIT] and torch._dynamo.config.recompile_limit == RECOMPILE_LIMIT
    out = result[0]
    assert out.column("error").to_pylist() == [None]
    assert np.isfinite(np.frombuffer(out.column("latent")[0].as_py(), np.float32)).all()


@pytest.mark.gpu
def test_compiled_blocks_sample_what_eager_mode_samples():
    """On a GPU: Stage C's guided loop with compiled blocks matches the eager loop."""
    models = tiny_models(device="cuda")
    eager = stage_c_sample(models, "cuda")
    compile_blocks(models.stage_c)
    torch.testing.assert_close(stage_c_sample(models, "cuda"), eager, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_stage_a_on_a_gpu_decodes_in_bfloat16_autocast_on_channels_last_memory_as_the_cpu_does():
    """On a GPU with bfloat16 generators, the decode runs under bfloat16 autocast (float32 weights) on channels-last
    memory, and gives the CPU's float32 image to bfloat16 precision."""
    from cascade.pipeline import decode_latents

    cpu = tiny_models(parts=("decoder",))
    gpu = tiny_models(device="cuda", dtype=torch.bfloat16, parts=("decoder",))
    assert next(gpu.stage_a.parameters()).dtype == torch.float32
    seen = []
    gpu.stage_a.out_block[0].register_forward_hook(lambda module, args, out: seen.append((args[0], out.dtype)))
    latents = torch.randn(2, 4, 16, 12)
    with torch.inference_mode():
        expected = decode_latents(cpu, latents)
        got = decode_latents(gpu, latents.cuda())
    ((features, dtype),) = seen
    assert dtype == torch.bfloat16 and features.is_contiguous(memory_format=torch.channels_last)
    assert got.dtype == torch.float32 and expected.abs().max() > 0.1
    torch.testing.assert_close(got.cpu(), expected, rtol=0.05, atol=0.05)


def test_the_profile_times_the_experiments_with_their_error_against_ours(tmp_path):
    """scripts/profile_stages.py's `fold` variants (GRN folded into the next product, measured on an H200 and kept
    out of the blocks) compute what ours computes, compiled too; --stages limits the stages; and the blocks' own
    forward pass is back afterwards."""
    import json

    from tests.helpers import load_script

    script = load_script("profile_stages")
    out = tmp_path / "profile.json"
    args = ["--model", "tiny", "--size", "256", "--batch", "1", "--top", "2", "--stages", "stage_b"]
    variants = ["ours", "fold", "compiled-fold"]
    assert script.main([*args, "--variants", *variants, "--json", str(out)]) == 0
    rows = {r["variant"]: r for r in json.loads(out.read_text())}
    assert {r["stage"] for r in rows.values()} == {"stage_b"} and set(rows) == set(variants)
    assert rows["ours"]["wall_ms_per_pass"] > 0 and "relative_error_vs_ours" not in rows["ours"]
    for variant in ("fold", "compiled-fold"):  # float32 on the CPU: the same up to the order of the sums
        assert 0 < rows[variant]["relative_error_vs_ours"] < 1e-5
    # Folded, the pass runs other operations (the batched product with each image's weight), and compiled the
    # blocks were traced through the folded forward.
    assert rows["fold"]["kernels_per_pass"] != rows["ours"]["kernels_per_pass"]
    assert rows["ours"]["res_block_forward"] == "forward"
    assert rows["fold"]["res_block_forward"] == rows["compiled-fold"]["res_block_forward"] == "folded_res_block_forward"
    assert ResBlock.forward is script.RES_BLOCK_FORWARD and AttnBlock.forward is script.ATTN_BLOCK_FORWARD


def test_the_folded_res_block_computes_what_the_block_does_with_and_without_a_skip():
    """The fold rewrites GRN + the last product as one batched product with each image's own weight: the same
    function of the block's parameters, with a skip input too, and where folding would not pay (H * W < 4c) the
    block's own channel MLP runs."""
    from tests.helpers import load_script, randomize

    script = load_script("profile_stages")
    torch.manual_seed(0)
    for c, c_skip, side in ((8, 0, 16), (8, 8, 16), (16, 0, 4)):  # the last: 4 x 4 < 4c, not folded
        block = randomize(ResBlock(c, c_skip), scale=0.3).eval()
        x, skip = torch.randn(3, c, side, side), (torch.randn(3, c_skip, side, side) if c_skip else None)
        with torch.no_grad():
            expected, got = block(x, None, skip), script.folded_res_block_forward(block, x, None, skip)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
