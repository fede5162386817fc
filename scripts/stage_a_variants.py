"""Stage A's decode, timed in the ways it has been written: `python scripts/stage_a_variants.py [--size 1024]`.

Variants: `ours` (the decoder as it is: its ResBlocks' gamma modulation folded into the LayerNorms' affine and the
residual adds done as one `addcmul` each, on channels-last memory), `nchw` (ours on NCHW memory, as before
2026-11-29), `before` (NCHW and the ResBlocks' forward as written before 2026-11-29: separate multiply and add
passes) and, on a GPU, `autocast` (ours under bfloat16 autocast, as the pipeline decodes when its generators run
in bfloat16, cascade.pipeline.decode_latents). Full-size Stage A (random weights: the values do not change the
work), float32 weights, median of `--repeats` decodes after warm-up, alternated; prints ms per image and each
variant's time over `before`'s, and checks the variants' images agree. It also counts each variant's memory-bound
bytes per image on the `meta` device (scripts/memory_traffic.py's count, float32; a LayerNorm's hidden copy of a
permuted input is not seen, so `nchw` counts as `ours`). On a GPU it is part of scripts/gpu_session.sh; on a CPU it
runs as it is.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from jobs.argtypes import positive


def before_forward(self, x):
    """cascade.stage_a.ResBlock.forward before 2026-11-29: the reference's expression, term by term."""
    g = self.gammas
    x_norm = self.norm1(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) * (1 + g[0]) + g[1]
    x = x + self.depthwise(x_norm) * g[2]
    x_norm = self.norm2(x.permute(0, 2, 3, 1)) * (1 + g[3]) + g[4]
    return x + self.channelwise(x_norm).permute(0, 3, 1, 2) * g[5]


def memory_bound_bytes(model_config, size: int) -> int:
    """Bytes in and out of the memory-bound operations of one image's decode, counted on the meta device."""
    if str(Path(__file__).parent) not in sys.path:  # memory_traffic.py sits beside this script
        sys.path.insert(0, str(Path(__file__).parent))
    from memory_traffic import Traffic

    from cascade.stage_a import StageA

    with torch.device("meta"), torch.inference_mode():
        model = StageA(model_config).eval()
        latents = torch.zeros(1, model_config.c_latent, size // 4, size // 4)
        with Traffic() as traffic:
            model.decode(latents)
    return sum(traffic.bytes.values())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=positive, default=1024, help="pixels, a multiple of 4 (its latent: a quarter)")
    p.add_argument("--batch", type=positive, default=1)
    p.add_argument("--repeats", type=positive, default=5)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.size % 4:
        p.error(f"--size: {args.size} is not a multiple of 4 (Stage A decodes a latent of a quarter of the size)")
    if args.json:  # written after each round of timings: a missing folder would lose the first one's work
        args.json.parent.mkdir(parents=True, exist_ok=True)

    from cascade.stage_a import STAGE_A, ResBlock, StageA
    from jobs.bench import synchronize

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = StageA(STAGE_A)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.05)  # every path live (the gammas start at zero)
    model = model.to(device).eval()
    latents = torch.randn(args.batch, STAGE_A.c_latent, args.size // 4, args.size // 4, device=device)
    ours_forward, ours_decode = ResBlock.forward, StageA.decode

    def nchw_decode(self, z):  # ours, without the conversion to channels-last
        return self.out_block(self.up_blocks(z.contiguous() * self.config.scale_factor))

    variants = {"ours": (ours_forward, ours_decode, False), "nchw": (ours_forward, nchw_decode, False)}
    variants["before"] = (before_forward, nchw_decode, False)
    if device.type == "cuda":
        variants["autocast"] = (ours_forward, ours_decode, True)
    times: dict[str, list[float]] = {name: [] for name in variants}
    images, moved = {}, {}

    def summary() -> dict:  # from the rounds timed so far
        base = statistics.median(times["before"])
        report = {"device": str(device), "size": args.size, "batch": args.batch, "rounds": len(times["before"])}
        report["variants"] = {}
        for name in variants:
            seconds = statistics.median(times[name])
            diff = (images[name] - images["before"]).abs().max().item()
            report["variants"][name] = {
                "ms_per_image": seconds * 1e3 / args.batch,
                "vs_before": seconds / base,
                "max_abs_diff": diff,
                "memory_bound_gb_per_image": moved[name] / 1e9,
            }
        return report

    try:
        with torch.inference_mode():
            for name, (forward, decode, mixed) in variants.items():  # warm-up, each variant's image and bytes
                ResBlock.forward, StageA.decode = forward, decode
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed):
                    images[name] = model.decode(latents).float().cpu()
                moved[name] = memory_bound_bytes(STAGE_A, args.size)
            for i in range(args.repeats):
                for name, (forward, decode, mixed) in variants.items() if i % 2 == 0 else reversed(variants.items()):
                    ResBlock.forward, StageA.decode = forward, decode
                    synchronize(device)
                    start = time.perf_counter()
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed):
                        model.decode(latents)
                    synchronize(device)
                    times[name].append(time.perf_counter() - start)
                if args.json:  # each round: a run stopped part-way (a GPU session's time limit) keeps what it timed
                    args.json.write_text(json.dumps(summary(), indent=2))
    finally:
        ResBlock.forward, StageA.decode = ours_forward, ours_decode
    report = summary()
    for name, v in report["variants"].items():
        ms, ratio, diff, gb = v["ms_per_image"], v["vs_before"], v["max_abs_diff"], v["memory_bound_gb_per_image"]
        print(f"{name:7s} {ms:9.1f} ms per image  {ratio:5.3f}x  max |diff| {diff:.2g}  {gb:.1f} GB moved")
    scale = max(images["before"].abs().max().item(), 1.0)
    # float32 variants agree to rounding; bfloat16 has 8 bits of mantissa, through 13 blocks.
    if any(v["max_abs_diff"] > (0.1 if name == "autocast" else 1e-2) * scale for name, v in report["variants"].items()):
        print("the variants' images differ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
