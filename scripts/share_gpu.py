"""Does one GPU shared by k pool actors give each 1/k of its time? `python scripts/share_gpu.py [--procs 1 2 3]`.

jobs.balance packs several actors to a GPU (`gpus: 1/k`) when whole GPUs would leave a pool idle, on the model that
k busy processes on one GPU share its time without losing any to switching between them (docs/PERFORMANCE.md). This
measures that model: for each k it starts k processes on the one GPU, each holding its own copy of one pool's stages
(as a packed actor does) and doing that pool's work (`run_prior`: text encoder + Stage C; `run_decoder`: Stage B +
Stage A, PNG-ready images) in a loop; they load and warm up, wait for each other, then count the images they finish
in `--seconds`. It prints the images/s of all k together and their ratio to one process alone: 1.0 means packing
loses nothing, above 1.0 means the processes fill each other's idle gaps, below means switching costs time.
One process alone is always measured first, the ratios' baseline. `--json` writes the figures. On a machine without
CUDA it runs on the CPU (to try the script only), each process on one thread.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jobs.argtypes import positive, rate

PARTS = {"decoder": "Stage B + Stage A (run_decoder)", "prior": "text encoder + Stage C (run_prior)"}


def work(models, part: str, batch: int, size: int, steps: int):
    """One pool's work for one batch, as its actor does it: a callable returning the number of images made."""
    import torch

    from cascade.pipeline import PriorOutput, run_decoder, run_prior
    from cascade.request import Request, latent_sizes

    kwargs = {"width": size, "height": size}
    kwargs["prior_steps" if part == "prior" else "decoder_steps"] = steps
    requests = [Request(f"a red circle number {i}", seed=i, **kwargs) for i in range(batch)]
    if part == "prior":
        return lambda: sum(p.error is None for p in run_prior(models, requests))
    shape_c, _ = latent_sizes(size, size, models.geometry)
    c_clip = models.stage_b.config.c_clip
    priors = [
        PriorOutput(r, torch.randn(*shape_c), torch.randn(1, c_clip), torch.randn(1, c_clip)) for r in requests
    ]  # values do not change the work
    return lambda: sum(r.error is None for r in run_decoder(models, priors))


def child(args) -> int:
    import torch

    from cascade.family import BUILTIN_MODELS

    cuda = torch.cuda.is_available()
    if not cuda:  # k processes on k cores, as k packed actors on a GPU: not k x torch's default threads on each
        torch.set_num_threads(1)
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    models = BUILTIN_MODELS[args.model](device=device, dtype=dtype, parts=(args.part,))  # one pool's stages
    call = work(models, args.part, args.batch, args.size, args.steps)
    call()  # warm-up: kernels chosen, workspaces allocated
    Path(args.sync, f"ready-{args.rank}").touch()
    while len(list(Path(args.sync).glob("ready-*"))) < args.procs[0]:  # start together (a child gets one count)
        time.sleep(0.01)
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        images += call()
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    Path(args.sync, f"done-{args.rank}.json").write_text(json.dumps({"images": images, "seconds": elapsed}))
    return 0


def run_shared(args, k: int) -> dict:
    """k processes on the GPU at once: their images/s together (each one's images over its own time)."""
    with tempfile.TemporaryDirectory() as sync:
        cmd = [sys.executable, __file__, "--child", "--sync", sync, "--procs", str(k)]
        cmd += ["--model", args.model, "--part", args.part, "--batch", str(args.batch), "--size", str(args.size)]
        cmd += ["--steps", str(args.steps), "--seconds", str(args.seconds)]
        procs = [subprocess.Popen([*cmd, "--rank", str(i)]) for i in range(k)]
        codes = [p.wait() for p in procs]
        if any(codes):
            raise RuntimeError(f"a worker process failed (exit codes {codes})")
        done = [json.loads(p.read_text()) for p in Path(sync).glob("done-*.json")]
    rate = sum(d["images"] / d["seconds"] for d in done)
    return {"processes": k, "images": sum(d["images"] for d in done), "images_per_s": rate}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random-big", choices=("random-big", "random-lite", "tiny"))
    p.add_argument("--part", choices=sorted(PARTS), default="decoder", help="which pool's work each process does")
    p.add_argument("--batch", type=positive, default=1)
    p.add_argument("--size", type=positive, default=1024)
    p.add_argument(
        "--steps",
        type=positive,
        default=10,
        help="sampling steps of the part's stage (the job's defaults: Stage C 20, Stage B 10)",
    )
    p.add_argument("--procs", type=positive, nargs="+", default=[1, 2], help="processes sharing the GPU, each run")
    p.add_argument("--seconds", type=rate, default=15.0, help="how long each process counts images")
    p.add_argument("--json", type=Path)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--sync", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    from cascade.geometry import family_geometry

    try:  # before any process starts: a size the model cannot take fails in each child
        family_geometry(args.model).check_size("--size", args.size)
    except ValueError as e:
        p.error(str(e))
    args.procs = [1, *(k for k in args.procs if k != 1)]  # one alone first: what the others are compared with
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
    print(f"[share-gpu] {PARTS[args.part]}, {args.model}, batch {args.batch}, {args.size} px, {args.steps} steps, "
          f"{args.seconds:g} s per run", flush=True)  # fmt: skip
    rows = []
    for k in args.procs:
        row = run_shared(args, k)
        row["vs_one"] = row["images_per_s"] / rows[0]["images_per_s"] if rows else 1.0  # (rows[0]: one alone)
        rows.append(row)
        print(f"  {k} process(es): {row['images_per_s']:.3f} images/s together ({row['images']} images), "
              f"{row['vs_one']:.2f}x one alone", flush=True)  # fmt: skip
        if args.json:
            args.json.write_text(json.dumps({"settings": vars(args), "runs": rows}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
