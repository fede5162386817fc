"""Where a guided denoising step's time goes, per stage: `python scripts/profile_stages.py [--model random-big]`.

Runs one guided forward pass (conditional + unconditional in one batch, as the sampler does) of Stage C and of
Stage B under torch.profiler after warm-up, and prints per stage: the wall time of one pass, the number of device
kernels it launched, the device time by kind of kernel (matrix products, attention, convolutions, normalisation,
the rest: elementwise and copies), and the heaviest kernels. Used to decide which part of the fast path to build
next (docs/PERFORMANCE.md); `--json` writes the same figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

from cascade.blocks import AttnBlock, GlobalResponseNorm, ResBlock
from jobs.argtypes import official_size, positive

# The blocks' forward passes as cascade.blocks has them: the `mha` and `fold` variants swap in their own for a while.
ATTN_BLOCK_FORWARD, RES_BLOCK_FORWARD = AttnBlock.forward, ResBlock.forward

KINDS = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "efficient_attention")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "matmul", "cublas", "sm90_", "wgmma")),
    ("conv", ("conv", "implicit", "winograd", "depthwise", "cudnn")),
    ("norm", ("layer_norm", "layernorm", "norm_kernel", "reduce", "welford")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, marks in KINDS:
        if any(m in low for m in marks):
            return kind
    return "other"


def guided_inputs(models, stage: str, batch: int, size: int):
    """One guided forward pass's inputs: the noised latents, conditional and unconditional in one batch, as
    cascade.gdf.guided_denoiser passes them, at noise level 0.5."""
    from jobs.bench import stage_conditions

    cond, uncond, shape = stage_conditions(models, batch, size, "a red circle on a blue background", "")[stage]
    model = getattr(models, stage)
    both = {k: torch.cat([cond[k], uncond[k]]) for k in cond}
    x = torch.randn(2 * batch, *shape, device=models.device, dtype=next(model.parameters()).dtype)
    r = torch.full((2 * batch,), 0.5, device=models.device)
    return x, r, both


def folded_res_block_forward(self, x, cond=None, skip=None):
    """ResBlock with GRN folded into the product after it, where that moves fewer bytes, for the `fold` variants.
    GRN is h * s + beta with s per (image, channel), so down(GRN(h)) = h @ (W * s)^T + (W @ beta + b): one batched
    product with each image's own scaled weight in place of a pass that reads and writes the hidden state h. On an
    H200 (2026-11-30, docs/PERFORMANCE.md) it saved 1 % of a compiled Stage B pass, as much as two runs of the same
    code differ, so the blocks do not do it."""
    residual = x
    x = self.norm(self.depthwise(x))
    if skip is not None:
        x = torch.cat([x, skip], dim=1)
    x = x.permute(0, 2, 3, 1)  # (B, H, W, c)
    up, act, grn, _, down = self.channelwise
    if x.shape[1] * x.shape[2] < 4 * down.out_features:  # a (c, 4c) weight per image would move more than h
        return self.channelwise(x).permute(0, 3, 1, 2) + residual
    h = act(up(x))  # (B, H, W, 4c)
    b, height, width, hidden = h.shape
    weight = down.weight * grn.scale(h).view(b, 1, hidden)  # (B, c, 4c)
    bias = torch.addmv(down.bias, down.weight, grn.beta.view(hidden))  # (c,)
    out = torch.baddbmm(bias, h.reshape(b, height * width, hidden), weight.transpose(1, 2))
    return out.view(b, height, width, -1).permute(0, 3, 1, 2) + residual


def module_attention_block_forward(self, x, cond, skip=None):
    """AttnBlock as before 2026-11-27, for the `mha` variant: the condition tokens mapped at every step and attention
    through nn.MultiheadAttention's own forward."""
    kv = self.kv_mapper(cond.clip)
    b, c, h, w = x.shape
    tokens = self.norm(x).view(b, c, h * w).permute(0, 2, 1)
    if self.self_attn:
        kv = torch.cat([tokens, kv], dim=1)
    return x + self.attention.attn(tokens, kv, kv, need_weights=False)[0].permute(0, 2, 1).reshape(b, c, h, w)


def conversions(variant: str) -> list:
    """What a variant timed on a converted copy of ours does to that copy, in order (cascade.speed, cascade.float8);
    [] for the variants that time ours or diffusers' as they are."""
    from cascade.float8 import float8_linears
    from cascade.speed import channels_last, compile_blocks, cuda_graphs

    def wide_float8(model):  # float8 in the blocks of c >= 1024 only: Stage B's 1280-channel levels (80 % of its FLOPs)
        for block in model.modules():
            width = block.channelwise[4].out_features if isinstance(block, ResBlock) else None
            width = block.attention.attn.embed_dim if isinstance(block, AttnBlock) else width
            if width is not None and width >= 1024:
                float8_linears(block)

    def autotuned(model):  # Inductor's own matrix-product kernels, tried against cuBLAS, with epilogues fused in
        return compile_blocks(model, mode="max-autotune-no-cudagraphs")

    def tuned(model):  # the fused kernels' block sizes tuned by measuring them (GRN's ran at 1.9 TB/s, 2026-11-30)
        return compile_blocks(model, options={"coordinate_descent_tuning": True})

    return {
        "cl": [channels_last],
        "fp8": [float8_linears],
        "compiled": [compile_blocks],
        "compiled-cl": [channels_last, compile_blocks],
        "compiled-fp8": [float8_linears, compile_blocks],
        "compiled-fp8-wide": [wide_float8, compile_blocks],
        "compiled-graphs": [compile_blocks, cuda_graphs],
        "compiled-fold": [compile_blocks],
        "autotune": [autotuned],
        "tuned": [tuned],
    }.get(variant, [])


# The variants that time a pass as a sampling run makes it: the step-invariant conditioning done beforehand, once.
PRECOMPUTED = (
    *("ours", "squares", "fold", "cl", "fp8"),
    *("compiled", "compiled-cl", "compiled-fp8", "compiled-fp8-wide", "compiled-graphs", "compiled-fold"),
    *("autotune", "tuned"),
)
VARIANTS = ("ours", "raw", "squares", "mha", "diffusers", *PRECOMPUTED[2:])
FOLDED = ("fold", "compiled-fold")  # the variants run with folded_res_block_forward


COPIES: dict[tuple[str, str], torch.nn.Module] = {}  # (stage, variant): the converted copy a variant times


def variant_model(models, stage: str, variant: str, twin):
    """The forward pass `(x, r, **conditions)` a variant times: ours (also for `mha`), a copy of ours converted as
    `conversions` says (channels-last memory, float8 linear layers, compiled blocks, CUDA graphs), or diffusers'
    (same weights)."""
    model = getattr(models, stage)
    if conversions(variant):
        if (stage, variant) not in COPIES:
            import copy

            COPIES.clear()  # one copy at a time: a full-size Stage C is 7 GB in bf16
            COPIES[stage, variant] = copy.deepcopy(model)
            for convert in conversions(variant):
                convert(COPIES[stage, variant])
        return COPIES[stage, variant]
    if variant != "diffusers":
        return model
    unet = twin.prior.prior if stage == "stage_c" else twin.decoder.decoder

    def call(x, r, **cond):
        r = r.to(x.dtype)  # diffusers' pipelines pass the noise level in the model's dtype
        if stage == "stage_c":
            return unet(x, r, clip_text_pooled=cond["clip_text_pooled"], clip_text=cond["clip_text"],
                        clip_img=cond["clip_img"], return_dict=False)[0]  # fmt: skip
        return unet(x, r, clip_text_pooled=cond["clip"], effnet=cond["effnet"], return_dict=False)[0]

    return call


def profile(models, stage: str, batch: int, size: int, top: int, variant: str = "ours", twin=None) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from jobs.bench import median_seconds, synchronize

    x, r, cond = guided_inputs(models, stage, batch, size)
    raw = cond
    model = variant_model(models, stage, variant, twin)
    if variant in PRECOMPUTED:
        with torch.inference_mode():
            cond = model.precompute(x, **cond)

    def step():
        with torch.inference_mode():
            return model(x, r, **cond)

    error = None
    if conversions(variant) or variant in FOLDED:  # what a change costs in accuracy: its output against ours's
        ours, forward = getattr(models, stage), ResBlock.forward
        with torch.inference_mode():
            ResBlock.forward = RES_BLOCK_FORWARD
            try:
                reference = ours(x, r, **ours.precompute(x, **raw)).float()
            finally:
                ResBlock.forward = forward
            error = ((step().float() - reference).norm() / reference.norm()).item()
    on_gpu = x.is_cuda
    wall = median_seconds(step, x.device, warmup=3, repeats=5)
    with torch_profile(
        activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA] if on_gpu else [ProfilerActivity.CPU]
    ) as prof:
        step()
        synchronize(x.device)
    # On a CPU (only to try the script) the CPU events stand in for kernels, nested ones counted twice.
    wanted = torch.autograd.DeviceType.CUDA if on_gpu else torch.autograd.DeviceType.CPU
    by_kind: dict[str, float] = defaultdict(float)
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    launches = 0
    for event in prof.events():
        if event.device_type != wanted:
            continue
        us = (event.device_time if hasattr(event, "device_time") else event.cuda_time) if on_gpu else event.cpu_time
        launches += 1
        by_kind[kind_of(event.name)] += us / 1e3
        kernels[event.name][0] += us / 1e3
        kernels[event.name][1] += 1
    device_ms = sum(by_kind.values())
    heaviest = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "stage": stage,
        "variant": variant,
        "res_block_forward": ResBlock.forward.__name__,  # forward, or folded_res_block_forward for the fold variants
        "batch": batch,
        "wall_ms_per_pass": wall * 1e3,
        "device_ms_per_pass": device_ms,
        "kernels_per_pass": launches,
        "device_ms_by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
        "heaviest": [{"kernel": name[:110], "ms": ms, "calls": n} for name, (ms, n) in heaviest],
        **({} if error is None else {"relative_error_vs_ours": error}),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random-big", choices=("random-big", "random-lite", "tiny"))
    p.add_argument("--size", type=official_size, default=1024)
    p.add_argument("--batch", type=positive, nargs="+", default=[1, 4])
    p.add_argument("--top", type=positive, default=12)
    p.add_argument("--json", type=Path)
    p.add_argument("--stages", nargs="+", choices=("stage_c", "stage_b"), default=["stage_c", "stage_b"])
    p.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        default=["ours"],
        help="ours (the step-invariant conditioning precomputed, as sampling does); raw: ours, that conditioning done "
        "in the pass (before 2026-11-29); squares: ours, GRN's norm as a float32 sum of squares (the GPU's before "
        "2026-11-28); mha: raw, attention through nn.MultiheadAttention's forward (before 2026-11-27); diffusers: "
        "its UNet, same weights; fold: ours, GRN folded into the product after it where that moves fewer bytes. "
        "On a copy of ours, each with its output's relative error against ours: cl, on channels-last memory; fp8, "
        "with float8 linear layers (cascade.float8); compiled, its blocks compiled as the job's `compile: true` "
        "does (cascade.speed); compiled-cl, compiled-fp8, compiled-graphs and compiled-fold, compiled on "
        "channels-last memory, with float8 linear layers, run as CUDA graphs (CUDA only), and with fold; "
        "compiled-fp8-wide, compiled with float8 in the blocks of c >= 1024 only; autotune, compiled in "
        "max-autotune-no-cudagraphs mode (Inductor's matrix-product kernels tried against cuBLAS: minutes); tuned, "
        "compiled with Inductor's coordinate_descent_tuning (its fused kernels' block sizes tuned by timing them)",
    )
    args = p.parse_args(argv)
    if args.json:  # written after each row: a missing folder would lose the first one's work
        args.json.parent.mkdir(parents=True, exist_ok=True)
    from cascade.family import BUILTIN_MODELS, liven

    if torch.cuda.is_available():
        models = BUILTIN_MODELS[args.model](device=torch.device("cuda"), dtype=torch.bfloat16)
    else:
        print("[profile] no CUDA device: profiling on the CPU in fp32, to try the script only", file=sys.stderr)
        models = BUILTIN_MODELS[args.model](device=torch.device("cpu"), dtype=torch.float32)
    # Every --model choice is random, and the reference's initialisation zeroes each stage's output layer (and the
    # modulation and GRN parameters): a pass returned exactly 0 and float8's error against it was 0 / 0, NaN on the
    # H200 (2026-11-29). Values do not change the work: give those weights small random ones (before diffusers' copy).
    for model in (models.stage_c, models.stage_b):
        liven(model, torch.Generator().manual_seed(0))
    twin = None
    if "diffusers" in args.variants:
        from jobs.bench_diffusers import DiffusersTwin, available

        try:
            twin = DiffusersTwin(models) if available() else None
            why = "diffusers is not installed"
        except Exception as e:  # a diffusers that imports but cannot build its pipelines
            why = f"diffusers failed to build its pipelines: {type(e).__name__}: {e}"
        if twin is None:  # the other variants still run
            print(f"[profile] {why}: no diffusers variant", file=sys.stderr)
            args.variants = [v for v in args.variants if v != "diffusers"]
    report = []
    for stage in args.stages:
        for batch in args.batch:
            for variant in args.variants:
                AttnBlock.forward = module_attention_block_forward if variant == "mha" else ATTN_BLOCK_FORWARD
                GlobalResponseNorm.fused = False if variant == "squares" else None
                ResBlock.forward = folded_res_block_forward if variant in FOLDED else RES_BLOCK_FORWARD
                try:
                    row = profile(models, stage, batch, args.size, args.top, variant, twin)
                except Exception as e:  # one variant failing (a kernel a new card refuses) must not lose the rest
                    failed = {"stage": stage, "variant": variant, "batch": batch, "error": f"{type(e).__name__}: {e}"}
                    report.append(failed)
                    print(f"\n## {stage}, {variant}, batch {batch}: failed: {failed['error']}", flush=True)
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    continue
                finally:
                    AttnBlock.forward, ResBlock.forward = ATTN_BLOCK_FORWARD, RES_BLOCK_FORWARD
                    GlobalResponseNorm.fused = None
                report.append(row)
                if args.json:  # after every row: a run stopped at its time limit keeps what it measured
                    args.json.write_text(json.dumps(report, indent=2))
                kinds = ", ".join(f"{k} {ms:.2f}" for k, ms in row["device_ms_by_kind"].items())
                print(
                    f"\n## {stage}, {variant}, batch {batch} (x2 for guidance): {row['wall_ms_per_pass']:.2f} ms wall "
                    f"per pass, {row['device_ms_per_pass']:.2f} ms on the device, {row['kernels_per_pass']} kernels; "
                    f"ms by kind: {kinds}"
                    + (
                        f"; output's relative error vs ours {row['relative_error_vs_ours']:.3g}"
                        if "relative_error_vs_ours" in row
                        else ""
                    )
                )
                for k in row["heaviest"]:
                    print(f"  {k['ms']:8.3f} ms  {k['calls']:4d}x  {k['kernel']}")
                sys.stdout.flush()
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 1 if any("error" in row for row in report) else 0


if __name__ == "__main__":
    sys.exit(main())
