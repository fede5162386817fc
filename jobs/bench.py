"""The benchmark: `python -m jobs.bench [--model tiny|FOLDER] [--size 1024] [--batch 1 4] [--dtype bf16] [--json F]`.

Measures in one run, per batch size, in images/s:
- each stage alone: the text encoder, Stage C's sampling loop, Stage B's sampling loop, Stage A's decode;
- the in-process pipeline (text encoder + Stage C, then Stage B + Stage A, as a pool actor runs them);
- the Ray pipeline: the real job on a local Ray, in its steady state (jobs/bench_ray.py), against its bound: the
  bottleneck pool's work done alone where each pool has its own GPU, or every stage's where the pools share one
  device;
- diffusers' prior + decoder pipelines on the same weights (jobs/bench_diffusers.py), the baseline.

Every timing has warm-up runs first, synchronises the device around the timed call, and reports the median of
`--repeats` runs. Model-FLOPs utilisation (MFU) is the model FLOPs done per second (counted per stage by
`cascade.flops`) over the device's measured dense matmul rate in the same dtype, measured in the same run (or
`--peak-tflops`). Prints a table (each stage's rate, the pipeline's and its MFU, the slowest stage, the sum of the
stages' times over the pipeline's, and the speed-up over diffusers); `--json` writes the same figures with the
machine, the date, the settings, the FLOPs per image and the matmul rate. Numbers live in docs/PERFORMANCE.md, not
in tests: CI only runs a tiny smoke of this command.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

STAGES = ("text", "stage_c", "stage_b", "stage_a")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """The median wall time of fn() over `repeats` runs after `warmup` runs, the device synchronised around each."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def stage_conditions(models, batch: int, size: int, prompt: str, negative_prompt: str) -> dict[str, tuple]:
    """Stage C's and Stage B's inputs for `batch` images as the pipeline gives them: per stage (conditions,
    unconditional conditions, latent shape); Stage B's Stage C latent is random (values do not change the work)."""
    from cascade.pipeline import prior_conditions
    from cascade.request import latent_sizes

    device = models.device
    text = models.text_encoder.encode([prompt] * batch + [negative_prompt] * batch)
    cond_c, uncond_c = prior_conditions(models, text, batch)
    shape_c, shape_b = latent_sizes(size, size, models.geometry)
    dtype_b = next(models.stage_b.parameters()).dtype
    pooled = text.clip_text_pooled.to(device, dtype_b)
    effnet = torch.randn(batch, *shape_c, device=device, dtype=dtype_b)
    cond_b = {"effnet": effnet, "clip": pooled[:batch]}
    uncond_b = {"effnet": torch.zeros_like(effnet), "clip": pooled[batch:]}
    return {"stage_c": (cond_c, uncond_c, shape_c), "stage_b": (cond_b, uncond_b, shape_b)}


def stage_calls(models, batch: int, size: int, prior_steps: int, decoder_steps: int) -> dict[str, Callable[[], object]]:
    """One callable per stage, on inputs of the shapes the pipeline gives it (prepared once, outside the timing)."""
    from cascade import gdf
    from cascade.pipeline import DECODER_SHIFT, PRIOR_SHIFT, decode_latents, stage_generator
    from cascade.request import Request

    device = models.device
    request = Request("a red circle on a blue background", width=size, height=size)
    prompts = [request.prompt] * batch + [request.negative_prompt] * batch
    inputs = stage_conditions(models, batch, size, request.prompt, request.negative_prompt)
    (cond_c, uncond_c, shape_c), (cond_b, uncond_b, shape_b) = inputs["stage_c"], inputs["stage_b"]
    latents_b = torch.randn(batch, *shape_b, device=device, dtype=next(models.stage_a.parameters()).dtype)

    def generators(stage: str):
        return [stage_generator(seed, stage) for seed in range(batch)]

    def run(model, cond, uncond, cfg, shape, steps, shift, stage):
        def call():
            with torch.inference_mode():
                return gdf.sample(
                    gdf.guided_denoiser(model, cond, uncond, cfg),
                    generators(stage),
                    shape,
                    steps=steps,
                    shift=shift,
                    sampler=request.sampler,
                    device=device,
                )

        return call

    def decode():
        with torch.inference_mode():
            return decode_latents(models, latents_b)

    def encode():
        with torch.inference_mode():
            return models.text_encoder.encode(prompts)

    return {
        "text": encode,
        "stage_c": run(
            models.stage_c, cond_c, uncond_c, request.prior_cfg, shape_c, prior_steps, PRIOR_SHIFT, "stage_c"
        ),
        "stage_b": run(
            models.stage_b, cond_b, uncond_b, request.decoder_cfg, shape_b, decoder_steps, DECODER_SHIFT, "stage_b"
        ),
        "stage_a": decode,
    }


def pipeline_call(models, batch: int, size: int, prior_steps: int, decoder_steps: int) -> Callable[[], object]:
    from cascade.pipeline import run_decoder, run_prior
    from cascade.request import Request

    requests = [
        Request(f"a red circle number {i}", seed=i, width=size, height=size, prior_steps=prior_steps,
                decoder_steps=decoder_steps)
        for i in range(batch)
    ]  # fmt: skip

    def call():
        results = run_decoder(models, run_prior(models, requests))
        errors = [r.error for r in results if r.error]
        if errors:
            raise RuntimeError(f"the pipeline failed during the benchmark: {errors[0]}")
        return results

    return call


def measure(
    models,
    batch: int,
    args,
    twin=None,
    flops: dict | None = None,
    peak: float | None = None,
    progress: Callable[[dict, str], None] = lambda row, figure: None,
) -> dict:
    """One batch size's figures. flops: model FLOPs per image per stage (cascade.flops.sampling_flops); peak: the
    FLOP/s that MFU divides by; progress(row so far, figure): called as each figure is measured (a stage, "pipeline",
    "diffusers", "ray"), so that a run stopped part-way keeps what it has."""
    calls = stage_calls(models, batch, args.size, args.prior_steps, args.decoder_steps)
    device = models.device
    row: dict = {"batch": batch}
    mfu = lambda flop_per_image, images_per_s: flop_per_image * images_per_s / peak  # noqa: E731
    for stage in STAGES:
        seconds = median_seconds(calls[stage], device, args.warmup, args.repeats)
        row[f"{stage}_s"] = seconds
        row[f"{stage}_images_per_s"] = batch / seconds
        if flops:
            row[f"{stage}_mfu"] = mfu(flops[stage], batch / seconds)
        progress(row, stage)
    call = pipeline_call(models, batch, args.size, args.prior_steps, args.decoder_steps)
    row["pipeline_s"] = median_seconds(call, device, args.warmup, args.repeats)
    row["pipeline_images_per_s"] = batch / row["pipeline_s"]
    if flops:
        row["pipeline_mfu"] = mfu(sum(flops.values()), row["pipeline_images_per_s"])
    progress(row, "pipeline")
    if twin is not None:
        try:
            call = twin.call(batch, args.size, args.prior_steps, args.decoder_steps)
            row["diffusers_s"] = median_seconds(call, device, args.warmup, args.repeats)
        except Exception as e:  # the baseline's own failure (diffusers' releases change) costs only its column
            row["diffusers_error"] = f"{type(e).__name__}: {e}"
            print(
                f"[bench] batch {batch}: diffusers failed, no baseline figure: {row['diffusers_error']}",
                file=sys.stderr,
            )
        else:
            row["diffusers_images_per_s"] = batch / row["diffusers_s"]
            row["speedup_vs_diffusers"] = row["diffusers_s"] / row["pipeline_s"]
            if flops:
                row["diffusers_mfu"] = mfu(sum(flops.values()), row["diffusers_images_per_s"])
            progress(row, "diffusers")
    if args.ray_prompts:
        from .bench_ray import ray_pipeline

        devices = torch.cuda.device_count() if device.type == "cuda" else 0
        row.update(ray_pipeline(args, batch, {s: row[f"{s}_s"] for s in STAGES}, devices))
        progress(row, "ray")
    slowest = max(STAGES, key=lambda s: row[f"{s}_s"])
    row["slowest_stage"] = slowest
    # In one process the stages run one after another: the pipeline's time is their sum plus the glue between them.
    row["stages_sum_s"] = sum(row[f"{s}_s"] for s in STAGES)
    return row


def table(rows: list[dict]) -> str:
    baseline = all("diffusers_s" in r for r in rows)
    head = ["batch", *[f"{s} img/s" for s in STAGES], "pipeline img/s", "pipeline MFU", "slowest", "stages/pipeline"]
    head += ["diffusers img/s", "vs diffusers"] if baseline else []
    ray = "ray_images_per_s" in rows[0]
    head += ["Ray pipeline img/s", "Ray / its bound", "bound"] if ray else []
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        cells = [str(r["batch"]), *[f"{r[f'{s}_images_per_s']:.2f}" for s in STAGES]]
        cells += [f"{r['pipeline_images_per_s']:.2f}", f"{r.get('pipeline_mfu', float('nan')):.1%}"]
        cells += [r["slowest_stage"], f"{r['stages_sum_s'] / r['pipeline_s']:.2f}"]
        if baseline:
            cells += [f"{r['diffusers_images_per_s']:.2f}", f"{r['speedup_vs_diffusers']:.2f}x"]
        if ray:
            cells += [f"{r['ray_images_per_s']:.2f}", f"{r['ray_vs_bound']:.2f}", r["ray_bound"]]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default, where its help does not say it already (no default, or a flag)."""

    def _get_help_string(self, action):
        default = action.default
        return action.help if default is None or isinstance(default, bool) else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=_Help,
        allow_abbrev=False,  # a prefix (--prior-step) is refused, not taken for a flag
    )
    p.add_argument(
        "--model",
        default="tiny",
        help="a built-in model (tiny, random-big, random-lite, demo) or a weights folder (official layout or a family)",
    )
    p.add_argument("--size", type=int, default=None, help="image width and height (default: the family's size)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="batch sizes to measure")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto", help="auto: bf16 on CUDA")
    p.add_argument("--prior-steps", type=int, default=20, help="Stage C sampling steps")
    p.add_argument("--decoder-steps", type=int, default=10, help="Stage B sampling steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before each timing")
    p.add_argument("--repeats", type=int, default=3, help="timed runs, of which the median counts")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument(
        "--peak-tflops",
        type=float,
        help="the device's FLOP/s that MFU divides by, in TFLOP/s (default: its dense matmul rate, measured now)",
    )
    p.add_argument(
        "--ray-prompts",
        type=int,
        default=32,
        help="prompts for the Ray pipeline's run per batch size (the real job on a local Ray); 0 skips it",
    )
    p.add_argument(
        "--diffusers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time diffusers' pipelines on the same weights (needs diffusers; default on)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile Stage C's and Stage B's blocks (cascade.speed.compile_blocks) before timing",
    )
    p.add_argument(
        "--fp8",
        action="store_true",
        help="Stage C's token linear layers as float8 products, as the job's fp8 setting (cascade.float8; Ada/Hopper "
        "GPUs; on a CPU the same arithmetic, slowly); Stage B stays in the model's dtype (in float8 it measured 2 %% "
        "slower on an H200); MFU stays against the matmul rate of the model's dtype",
    )
    p.add_argument(
        "--graphs",
        action="store_true",
        help="run Stage C's and Stage B's forward passes as CUDA graphs (cascade.speed.cuda_graphs; CUDA only)",
    )
    return p


def cpu_name() -> str:
    """The CPU's model name (platform.processor() is empty on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def check_arguments(args) -> str | None:
    """What is wrong with the arguments that need no model (the message), or None: checked before the model loads
    (the full-size ones take minutes)."""
    from cascade.request import MAX_STEPS

    from .bench_ray import MIN_RAY_BLOCKS, min_prompts

    for name, least in (("batch", 1), ("prior_steps", 1), ("decoder_steps", 1), ("repeats", 1), ("warmup", 0)):
        for value in getattr(args, name) if name == "batch" else [getattr(args, name)]:
            if value < least:
                return f"--{name.replace('_', '-')}: {value} is not allowed; use {least} or more"
    for name in ("prior_steps", "decoder_steps"):
        if getattr(args, name) > MAX_STEPS:
            return f"--{name.replace('_', '-')}: {getattr(args, name)} is not allowed; use 1 to {MAX_STEPS}"
    if args.size is not None and args.size < 1:
        return f"--size: {args.size} is not allowed; use a size the model supports (omit it for the family's own)"
    if args.peak_tflops is not None and not 0 < args.peak_tflops < math.inf:
        return f"--peak-tflops: {args.peak_tflops} is not allowed; use a finite rate above 0 (omit it to measure one)"
    least = min_prompts(args.batch)
    if args.ray_prompts and not args.ray_prompts >= least:
        batches = ", ".join(map(str, args.batch))
        return (
            f"--ray-prompts: {args.ray_prompts} leaves no steady state to time at batch {batches}; "
            f"use 0 (no Ray part) or at least {least} ({MIN_RAY_BLOCKS} blocks)"
        )
    if args.json is not None:
        if args.json.is_dir():
            return f"--json: {args.json} is a folder; give a file name"
        try:  # a file made and removed beside it: the figures are written as they come, from minutes in
            args.json.parent.mkdir(parents=True, exist_ok=True)
            tempfile.NamedTemporaryFile(dir=args.json.parent, prefix=".bench-probe-").close()
        except OSError as e:
            return f"--json: {args.json} cannot be written: {e.strerror or e}"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = check_arguments(args)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from cascade.family import BUILTIN_MODELS, load_models
    from workers.models import device, torch_dtype

    on = device()
    dtype = torch_dtype(args.dtype, on)
    if args.graphs and on.type != "cuda":
        print("error: --graphs needs a CUDA device", file=sys.stderr)
        return 2
    if args.model in BUILTIN_MODELS:
        models = BUILTIN_MODELS[args.model](device=on, dtype=dtype)
    else:
        from cascade.errors import WeightsError

        try:
            models = load_models(args.model, dtype=dtype, device=on)
        except WeightsError as e:  # as the job: a weights folder that cannot be used is exit 3, named
            print(f"error: {e}", file=sys.stderr)
            return 3
    args.size = models.geometry.default_size if args.size is None else args.size
    try:
        models.geometry.check_size("--size", args.size)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.fp8:
        from cascade.float8 import float8_supported

        reason = float8_supported(on, dtype)
        if reason is not None:
            print(f"error: --fp8: {reason}", file=sys.stderr)
            return 2
    # The Ray part's bound would come from stages the job does not run so: it has no CUDA graphs, and its fp8 setting
    # needs compile (eager float8 measured slower, so the job refuses it; the bench still times it).
    without = None
    if args.graphs:
        without = "--graphs: the job has no such setting"
    elif args.fp8 and not args.compile:
        without = "--fp8 without --compile: the job's fp8 setting needs compile: true"
    if without and args.ray_prompts:
        print(f"[bench] no Ray pipeline figure with {without} (--ray-prompts 0)", file=sys.stderr)
        args.ray_prompts = 0
    twin = None
    if args.diffusers:  # first: the baseline copies our weights as loaded, in the dtype the run uses
        from .bench_diffusers import DiffusersTwin, available

        if not available():
            print("[bench] diffusers is not installed: no baseline (pip install diffusers)", file=sys.stderr)
        else:
            try:
                twin = DiffusersTwin(models)
            except Exception as e:  # a diffusers that imports but cannot build its pipelines: our figures still count
                print(
                    f"[bench] diffusers failed to build its pipelines, no baseline: {type(e).__name__}: {e}",
                    file=sys.stderr,
                )
    if args.fp8:
        from cascade.float8 import float8_linears

        count = float8_linears(models.stage_c)  # as the job's Stage C actors (workers.stages)
        kept = str(dtype).removeprefix("torch.")
        print(f"[bench] {count} linear layers of Stage C as float8 products (Stage B stays in {kept})", file=sys.stderr)
    if args.compile:
        from cascade.speed import compile_blocks

        count = sum(compile_blocks(m) for m in (models.stage_c, models.stage_b))
        print(f"[bench] compiling {count} blocks of Stage C and Stage B (during the warm-up runs)", file=sys.stderr)
    if args.graphs:
        from cascade.speed import cuda_graphs

        cuda_graphs(models.stage_c)
        cuda_graphs(models.stage_b)
    from cascade.flops import forward_flops, matmul_rate, sampling_flops

    flops = sampling_flops(forward_flops(models, args.size), args.prior_steps, args.decoder_steps)
    peak = args.peak_tflops * 1e12 if args.peak_tflops is not None else matmul_rate(on, dtype)
    print(
        f"[bench] model TFLOP per image: {sum(flops.values()) / 1e12:.4g} "
        f"({', '.join(f'{s} {f / 1e12:.3g}' for s, f in flops.items())}); "
        f"MFU against {peak / 1e12:.3g} TFLOP/s ({'given' if args.peak_tflops else 'measured dense matmul'})",
        file=sys.stderr,
    )
    rows: list[dict] = []

    def write_json(partial: dict | None = None) -> None:
        report = {
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {
                "device": torch.cuda.get_device_name(on) if on.type == "cuda" else cpu_name(),
                "cpus": torch.get_num_threads(),
                "torch": torch.__version__,
            },
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "dtype": str(dtype),
            "flops_per_image": flops,
            "mfu_peak_flops_per_s": peak,
            "mfu_peak_source": "given" if args.peak_tflops else "measured dense matmul",
            "rows": rows if partial is None else [*rows, {**partial, "partial": True}],
        }
        if args.graphs:  # None where every forward pass ran as a graph, else why capture failed
            report["graphs_failed"] = {
                s: getattr(m.forward, "failed", None)
                for s, m in (("stage_c", models.stage_c), ("stage_b", models.stage_b))
            }
        args.json.write_text(json.dumps(report, indent=2))

    def progress(row: dict, figure: str) -> None:  # each figure as it comes: a run stopped part-way keeps them
        rate, mfu = row[f"{figure}_images_per_s"], row.get(f"{figure}_mfu")
        line = f"[bench] batch {row['batch']}: {figure} {rate:.4g} images/s"
        print(line + (f", MFU {mfu:.1%}" if mfu is not None else ""), file=sys.stderr)
        if args.json:
            write_json(partial=row)

    try:
        for batch in args.batch:
            rows.append(measure(models, batch, args, twin, flops, peak, progress))
            if args.json:
                write_json()
    except KeyboardInterrupt:  # (Ctrl-C: the figures so far are in --json, the last row marked partial)
        kept = f": the figures so far are in {args.json}" if args.json else ""
        print(f"[bench] interrupted{kept}", file=sys.stderr)
        if rows:
            print(table(rows))
        return 130
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
