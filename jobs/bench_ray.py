"""The Ray pipeline part of `jobs.bench`: the real job (`jobs.generate`) on a local Ray, timed from its manifests.

The job renders `prompts` prompts into a temporary folder with both pools at the benchmark's batch size (and compiled
blocks with the benchmark's `--compile`, float8 Stage C with its `--fp8`; the job has no CUDA graphs and no eager
float8, so with `--graphs`, or `--fp8` without `--compile`, the benchmark leaves this part out). Its rate is taken
in the steady state: the images written after the first block (a pool's block carries whole batches and at least 4
images, `jobs.generate.block_rows`, and its images are written together), over the time from that block's last
write to the last write, so the actors' start (model loading) is left out. It is compared with its bound on this
machine:
- pools on devices of their own (two or more GPUs: `gpus: auto` gives each pool's actor one): the bottleneck pool's
  work done alone, text encoder + Stage C for the Stage C pool, Stage B + Stage A for the Stage B/A pool;
- pools sharing one device (one GPU, half each, or the CPU's cores): that device doing every stage's work, one after
  another, as the benchmark timed them alone on all of it. The bottleneck pool alone is not reachable there: while
  it works, the other pool's work takes the same device.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path


def ray_pipeline(args, batch: int, stage_seconds: dict[str, float], devices: int) -> dict:
    """devices: the GPUs the local Ray has (0 on a CPU machine)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from workers.storage import LocalStorage

    from .generate import block_rows
    from .generate import main as generate
    from .manifest import read_manifests

    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        work = Path(tmp)
        prompts = [f"a red circle number {i}" for i in range(args.ray_prompts)]
        pq.write_table(pa.table({"prompt": prompts}), work / "prompts.parquet")
        argv = ["--prompts", str(work / "prompts.parquet"), "--out", str(work / "out"), "--model", args.model]
        argv += ["--width", str(args.size), "--height", str(args.size), "--dtype", args.dtype]
        argv += ["--prior-steps", str(args.prior_steps), "--decoder-steps", str(args.decoder_steps)]
        argv += ["--prior-pool-batch-size", str(batch), "--decoder-pool-batch-size", str(batch)]
        argv += ["--no-report", "--progress-seconds", "3600"] + (["--compile"] if args.compile else [])
        argv += ["--fp8"] if args.fp8 else []  # (with --compile: main leaves this part out otherwise)
        code = generate(argv)
        if code == 130:  # (the job's exit for an interrupt: it stopped cleanly, and so does the benchmark)
            raise KeyboardInterrupt
        if code != 0:
            raise RuntimeError(f"the Ray pipeline's job failed with exit code {code}")
        ends = sorted(read_manifests(LocalStorage(work / "out"), ["write_end"]).column("write_end").to_pylist())
    steady = steady_rate(ends, block_rows(batch))
    pools = pool_seconds(stage_seconds)
    bottleneck, bound, bound_s = ray_bound(pools, devices)
    return {
        "ray_images_per_s": steady,
        "ray_bottleneck_pool": bottleneck,
        "ray_bottleneck_alone_images_per_s": batch / pools[bottleneck],
        "ray_bound": bound,
        "ray_bound_images_per_s": batch / bound_s,
        "ray_vs_bound": steady * bound_s / batch,
    }


def steady_rate(ends: list[float], first: int) -> float:
    """Images per second after the first block of `first` images, from the sorted write times: that block's images
    are written together, so counting them as made after the first write would overstate the rate."""
    start = ends[first - 1]
    return (len(ends) - first) / (ends[-1] - start) if ends[-1] > start else float("nan")


# Blocks the Ray part renders at least: its rate is timed after the first, between block writes, and two blocks timed
# one interval (two runs of batch 4 on 8 prompts read 2.73 and 0.51 of their bound).
MIN_RAY_BLOCKS = 4


def min_prompts(batches: list[int]) -> int:
    """The fewest prompts that leave a steady state to time at each batch size: MIN_RAY_BLOCKS blocks of the
    largest."""
    from .generate import block_rows

    return MIN_RAY_BLOCKS * max(block_rows(b) for b in batches)


def pool_seconds(stage_seconds: dict[str, float]) -> dict[str, float]:
    """Each pool's work for one batch: text encoder + Stage C, Stage B + Stage A."""
    return {
        "Stage C pool": stage_seconds["text"] + stage_seconds["stage_c"],
        "Stage B/A pool": stage_seconds["stage_b"] + stage_seconds["stage_a"],
    }


def ray_bound(pools: dict[str, float], devices: int) -> tuple[str, str, float]:
    """pools: `pool_seconds`. (the bottleneck pool, what bounds the Ray pipeline here, that bound's seconds per
    batch): the bottleneck pool alone where each pool has a GPU of its own (devices >= 2), else the one device doing
    every stage."""
    bottleneck = max(pools, key=pools.get)
    if devices >= 2:
        return bottleneck, f"{bottleneck} alone", pools[bottleneck]
    return bottleneck, "one device, every stage", sum(pools.values())


if __name__ == "__main__":  # a part of the benchmark, not a command of its own
    sys.exit("this module is a part of python -m jobs.bench (see docs/PERFORMANCE.md): run that")
