"""What float8 linear layers (cascade/float8.py) cost in the images of a trained family:
`python scripts/float8_quality.py [--model demo] [--samples 200]`.

Renders the same requests (the evaluation's prompts, seeds and sampling: cascade/train/evaluate.py) three ways: the
family in float32 (the reference), in bfloat16 (what a GPU runs), and in bfloat16 with Stage C's and Stage B's token
linear layers as float8 products (`--fp8`). Prints, per way, how far its images are from float32's (PSNR over 8-bit
pixels, mean and worst image) and, for a family trained on the shapes data set (the built-in `demo`), what the
independent checker reads off them (colour, shape, position, all three). On a CPU the float8 products run as
torch._scaled_mm's reference arithmetic: the same numbers a GPU computes, slowly. `--json` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cascade.family import BUILTIN_MODELS, load_family  # noqa: E402
from cascade.float8 import float8_linears  # noqa: E402
from cascade.geometry import family_file, family_geometry  # noqa: E402
from cascade.pipeline import generate, to_tensor  # noqa: E402
from cascade.request import Request, sampling_defaults  # noqa: E402
from cascade.train.checker import HEADS, judge  # noqa: E402
from cascade.train.evaluate import SPLITS, checker_for  # noqa: E402
from cascade.train.shapes import sample_attributes  # noqa: E402
from jobs.argtypes import positive  # noqa: E402

WAYS = ("fp32", "bf16", "bf16+fp8")


def load_way(model: str, way: str, device: torch.device):
    """The family as a run in that way loads it (in bf16, Stage A stays float32, as the pipeline has it on a GPU),
    with float8 layers for bf16+fp8."""
    models = load_family(model, dtype=torch.float32 if way == "fp32" else torch.bfloat16, device=device)
    if way == "bf16+fp8":
        float8_linears(models.stage_c)
        float8_linears(models.stage_b)
    return models


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image, in dB, of images in [0, 1] (inf where identical)."""
    mse = (a - b).square().flatten(1).mean(1)
    return 10 * torch.log10(1 / mse)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo", help="a family folder or a built-in model (default demo)")
    p.add_argument("--samples", type=positive, default=200, help="requests per split (held-out, training combinations)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=positive, default=16)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.model not in BUILTIN_MODELS and not Path(args.model).is_dir():
        p.error(f"--model: {args.model} is neither a built-in model ({', '.join(sorted(BUILTIN_MODELS))}) nor a folder")
    size = family_geometry(args.model).default_size
    sampling = sampling_defaults(args.model)
    trained_here = "recipe" in family_file(args.model)[1]  # by cascade.train, on the shapes data set: judge it
    checker = checker_for(Path("runs") / "checkers", size, 600, args.seed) if trained_here else None
    report: dict = {"model": args.model, "size": size, "samples": args.samples, **sampling, "ways": {}}
    images: dict[str, dict[str, torch.Tensor]] = {}
    for way in WAYS:
        models = load_way(args.model, way, device)
        started = time.perf_counter()
        row: dict = {}
        for split in SPLITS:
            rng = random.Random(f"eval:{split}:{args.seed}")
            attributes = [sample_attributes(rng, split) for _ in range(args.samples)]
            requests = [
                Request(a.caption(0), seed=args.seed + i, width=size, height=size, **sampling)
                for i, a in enumerate(attributes)
            ]
            results = generate(models, requests, batch_size=args.batch)
            images.setdefault(way, {})[split] = torch.stack([to_tensor(r.image) for r in results])
            if checker is not None:
                verdict = judge(checker, images[way][split], attributes)
                row[split] = {**{h: round(verdict.accuracy[h], 4) for h in HEADS}, "all": round(verdict.all_correct, 4)}
        scores = torch.cat([psnr(images[way][s], images["fp32"][s]) for s in SPLITS])
        finite = scores[torch.isfinite(scores)]
        row["psnr_vs_fp32_db"] = {
            "mean": round(finite.mean().item(), 2) if len(finite) else None,  # None: every image identical
            "worst": round(scores.min().item(), 2) if len(finite) else None,
            "identical": int((~torch.isfinite(scores)).sum()),
        }
        row["seconds"] = round(time.perf_counter() - started, 1)
        report["ways"][way] = row
        accuracy = "; ".join(
            f"{s}: " + ", ".join(f"{h} {row[s][h]:.1%}" for h in (*HEADS, "all")) for s in SPLITS if s in row
        )
        distance = row["psnr_vs_fp32_db"]
        distance = (
            "the reference"
            if distance["mean"] is None
            else f"PSNR vs fp32 mean {distance['mean']} dB, worst {distance['worst']} dB"
        )
        print(f"{way}: {distance}{'; ' + accuracy if accuracy else ''} ({row['seconds']} s)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
