"""Evaluate a family trained on the shapes data set: does each generated image show what its prompt asked for?

Prompts are captions of random attribute combinations from two splits: held-out (colour, shape) pairs never seen in
training, and training combinations. Each goes through the real pipeline (`cascade.pipeline.generate`, the sampler
and guidance a user gets), and the independent checker (`checker.py`, trained only on ground-truth renders) reads
colour, shape and position off the image. The checker's score on ground-truth renders of the same combinations is
reported beside it: the ceiling a perfect generator would reach under this judge.
"""

from __future__ import annotations

import json
import random
import textwrap
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from ..family import BUILTIN_MODELS, load_family
from ..geometry import family_geometry
from ..pipeline import generate, to_tensor
from ..request import Request, sampling_defaults
from ..weights import save_safetensors
from .checker import HEADS, Checker, judge, train_checker
from .shapes import render, sample_attributes

SPLITS = ("heldout", "train")
IMAGE_SEED_STRIDE = 1_000_000  # evaluation seed s draws image seeds s * this + i (seed 0: 0, 1, 2, ... as always)
CHECKER_VERSION = 2  # part of the cached judge's file name: a change to how the judge trains must not reuse an old one


# Judges trained by `checker_for` and shipped, so every evaluation of the demo (the command's default and the test
# suite's small version) reads its images with the same instrument, without minutes of training first.
SHIPPED_CHECKERS = Path(__file__).resolve().parents[1] / "assets" / "checkers"


def checker_for(folder: Path, size: int, steps: int, seed: int = 0) -> Checker:
    """The judge for (size, steps, seed): the shipped one if there is one, else one trained once and kept in `folder`
    (it does not depend on the model)."""
    name = f"checker-v{CHECKER_VERSION}-{size}px-{steps}steps-seed{seed}.safetensors"
    checker = Checker()
    for path in (SHIPPED_CHECKERS / name, folder / name):
        if path.is_file():
            checker.load_state_dict(load_file(str(path)))
            return checker.eval()
    checker = train_checker(size=size, steps=steps, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors({k: v.contiguous() for k, v in checker.state_dict().items()}, folder / name)
    return checker


def contact_sheet(images: list[Image.Image], labels: list[str], columns: int = 8, cell: int = 128) -> Image.Image:
    """A grid of images, each shown at `cell` pixels (nearest-neighbour: small images stay crisp) over its label."""
    lines = 4
    cell_h = cell + 11 * lines + 4
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * cell, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (image, label) in enumerate(zip(images, labels)):
        x, y = (i % columns) * cell, (i // columns) * cell_h
        sheet.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        for k, line in enumerate(textwrap.wrap(label, width=cell // 6)[:lines]):
            draw.text((x + 2, y + cell + 2 + 11 * k), line, fill=(0, 0, 0))
    return sheet


MAX_SIZE = 256  # the largest size of the shapes families (cascade.train.demo.GEOMETRY)


def check_shapes_family(model: Path | str, command: str) -> None:
    """ValueError for a `model` beyond the shapes families' sizes, which `command` renders and judges at its default
    size (the official architecture's 1024 px: the judge and its data would take many GB, and its prompts are not the
    shapes' captions)."""
    size = family_geometry(model).default_size
    if size > MAX_SIZE and (str(model) in BUILTIN_MODELS or Path(model).is_dir()):  # (a missing folder: load says)
        raise ValueError(
            f"--model: {model} renders {size} px by default; {command} is for families trained on the shapes data "
            f"(python -m cascade.train, at most {MAX_SIZE} px), such as demo"
        )


def evaluate(
    model: Path | str,
    out: Path,
    samples: int = 80,
    checker_steps: int = 600,
    seed: int = 0,
    batch_size: int = 16,
    checker_seed: int = 0,
    log=print,
    prior_steps: int | None = None,
    prior_cfg: float | None = None,
    decoder_steps: int | None = None,
    decoder_cfg: float | None = None,
) -> dict:
    """Generate `samples` images per split, judge them, write eval.json and contact-sheet.png to `out`. Sampling
    (prior_steps, prior_cfg, decoder_steps, decoder_cfg) is what a user of the family gets unless given here: the
    family's own defaults, else the reference's. `seed` picks the prompts and the images' noise: each seed its own,
    image seeds seed * IMAGE_SEED_STRIDE + i never overlapping another seed's; the judge is `checker_seed`'s (the
    shipped one by default) whatever `seed` is, so evaluations at several seeds read with one instrument."""
    if samples < 1:
        raise ValueError(f"samples: {samples} is not allowed; use 1 or more")
    check_shapes_family(model, "eval")
    started = time.perf_counter()
    models = load_family(model, dtype=torch.float32)
    size = models.geometry.default_size
    given = dict(prior_steps=prior_steps, prior_cfg=prior_cfg, decoder_steps=decoder_steps, decoder_cfg=decoder_cfg)
    sampling = {k: v if given[k] is None else given[k] for k, v in sampling_defaults(model).items()}
    checker = checker_for(out, size, checker_steps, checker_seed)
    report: dict = {"model": str(model), "size": size, "samples": samples, **sampling}
    report.update(checker_steps=checker_steps, checker_seed=checker_seed, seed=seed, accuracy={}, prompts={})
    sheet_images, sheet_labels = [], []
    for split in SPLITS:
        rng = random.Random(f"eval:{split}:{seed}")
        attributes = [sample_attributes(rng, split) for _ in range(samples)]
        prompts = [a.caption(0) for a in attributes]
        first = seed * IMAGE_SEED_STRIDE
        requests = [Request(p, seed=first + i, width=size, height=size, **sampling) for i, p in enumerate(prompts)]
        results = generate(models, requests, batch_size=batch_size)
        images = torch.stack([to_tensor(r.image) for r in results])
        renders = torch.stack([to_tensor(render(a, size, seed=i)) for i, a in enumerate(attributes)])
        verdict, ceiling = judge(checker, images, attributes), judge(checker, renders, attributes)
        report["accuracy"][split] = {
            **{head: round(verdict.accuracy[head], 4) for head in HEADS},
            "all_three": round(verdict.all_correct, 4),
            "checker_on_renders": {head: round(ceiling.accuracy[head], 4) for head in HEADS},
        }
        report["prompts"][split] = prompts
        log(f"{split}: " + ", ".join(f"{h} {verdict.accuracy[h]:.0%}" for h in HEADS))
        sheet_images += [r.image for r in results[:16]]
        sheet_labels += [f"{split}: {p}" for p in prompts[:16]]
    report["seconds"] = round(time.perf_counter() - started, 1)
    out.mkdir(parents=True, exist_ok=True)
    contact_sheet(sheet_images, sheet_labels).save(out / "contact-sheet.png")
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
