"""Train a LoRA on a trained family (the reference's `train_c_lora.py`): Stage C's attention projections get
low-rank updates and new words get learned token rows, with the base weights frozen; optionally Stage B's attention
too (`decoder_rank`), trained by Stage B's own loss.

The demonstration: "[zorp]", a word the model has never seen, drawn as a shape no caption names (an arrow by
default; a star or a hexagon on request). The LoRA's data are that shape in random colours, positions, sizes and
backgrounds, captioned with "[zorp]" in the shape's place, plus (`with_regular`) images of the family's own shapes
and captions, so that the words the new one starts from keep their meaning; `shape_votes` judges which shape a
generated image shows by matching its foreground against every shape, fitted to it. A Stage C LoRA alone leaves the
drawing to a Stage B that met the shape only uncaptioned, from a 4 x 4 latent that hardly holds its outline: on the
demo it draws a third of "[zorp]" prompts as arrows; Stage B's updates raise that to most (docs/TRAINING.md).
"""

from __future__ import annotations

import functools
import math
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..lora import Adapter, attach
from .loop import RunConfig, fit
from .objective import AdaptiveLossWeights, diffusion_loss
from .shapes import (
    BACKGROUNDS,
    SHAPES,
    TEMPLATES,
    UNNAMED_SHAPES,
    Attributes,
    ShapesData,
    fill_shape,
    make_dataset,
    render,
    sample_attributes,
)
from .stages import CAPTION_DROPOUT, batched

NEW_SHAPE = "arrow"
WORD = "[zorp]"
ALL_SHAPES = (*SHAPES, *UNNAMED_SHAPES)  # what the votes choose among
INIT_FROM = list(SHAPES)  # the new word starts as the average shape word


def word_data(n: int, size: int = 64, seed: int = 0, shape: str = NEW_SHAPE, word: str = WORD) -> ShapesData:
    """n images of `shape` in random colours, positions, sizes and backgrounds, captioned with `word` for it."""
    rng = random.Random(f"lora:{seed}")
    attributes, captions, pixels = [], [], []
    for _ in range(n):
        a = sample_attributes(rng)
        a = Attributes(shape, a.colour, a.position, a.size, a.background)
        attributes.append(a)
        captions.append(TEMPLATES[rng.randrange(len(TEMPLATES))].format(**{**a.__dict__, "shape": word}))
        pixels.append(np.asarray(render(a, size, rng.randrange(2**31))))
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255
    return ShapesData(images, captions, attributes)


def with_regular(data: ShapesData, n: int, size: int = 64, seed: int = 0) -> ShapesData:
    """`data` plus `n` images of the family's own kind (named shapes, training combinations, their captions): prior
    preservation, so that the LoRA learns what sets the new word apart instead of moving the words it starts from."""
    if n == 0:
        return data
    regular = make_dataset(n, size, seed=seed + 7919)
    return ShapesData(
        torch.cat([data.images, regular.images]), data.captions + regular.captions, data.attributes + regular.attributes
    )


def train_lora(
    models,
    data: ShapesData,
    run: RunConfig,
    words: list[str] = [WORD],  # noqa: B006 (read only)
    init_from: list[str] = INIT_FROM,  # noqa: B006 (read only)
    rank: int = 4,
    checkpoint: Path | None = None,
    progress: bool = True,
    decoder_rank: int = 0,
) -> Adapter:
    """Fit a LoRA to `data` on `models` (a loaded family in float32 with its semantic encoder as `effnet`).

    With `decoder_rank` > 0, Stage B's attention gets low-rank updates too, trained by Stage B's own loss on the same
    images (their Stage A latents, from their semantic latents and the captions' pooled text, which the new words'
    rows reach as well); the report's loss stays Stage C's."""
    if models.effnet is None:
        raise ValueError("train_lora needs the family's semantic encoder: load the models with with_effnet=True")
    decoder = decoder_rank > 0
    with torch.no_grad():
        latents = batched(models.effnet.encode, data.images)
        if decoder:  # Stage B's targets: the images' Stage A latents, as Stage B was trained on
            pixels = batched(models.stage_a.encode, data.images)
    torch.manual_seed(run.seed)  # the LoRA's starting weights from the run's seed
    adapter = attach(models, words, init_from, rank=rank, decoder_rank=decoder_rank)
    if decoder:
        models.stage_b.eval()  # frozen but for the updates; eval as at inference
    clip_img = torch.zeros(run.batch_size, 1, models.clip_img_dim)

    def step(generator: torch.Generator, weights: AdaptiveLossWeights) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(data), (run.batch_size,), generator=generator)
        keep = torch.rand(run.batch_size, generator=generator) >= CAPTION_DROPOUT
        captions = [data.captions[i] if k else "" for i, k in zip(idx.tolist(), keep.tolist())]
        text = models.text_encoder(captions)
        conditions = {"clip_text": text.clip_text, "clip_text_pooled": text.clip_text_pooled, "clip_img": clip_img}
        mse, adjusted = diffusion_loss(models.stage_c, latents[idx], conditions, weights["stage_c"], generator)
        if decoder:
            conditions_b = {"effnet": latents[idx], "clip": text.clip_text_pooled}
            _, adjusted_b = diffusion_loss(models.stage_b, pixels[idx], conditions_b, weights["stage_b"], generator)
            adjusted = adjusted + adjusted_b
        return adjusted, mse.mean()

    weights = AdaptiveLossWeights("stage_c", "stage_b")
    fit({"lora": torch.nn.ModuleList(adapter.modules())}, step, run, checkpoint, weights, "LoRA", progress)
    models.stage_c.eval()
    return adapter


def _foreground(image: np.ndarray, background: str) -> np.ndarray:
    distance = np.abs(image.astype(np.float32) - np.array(BACKGROUNDS[background], np.float32)).sum(axis=-1)
    return distance > 90


@functools.cache
def _area_at_quarter(shape: str, size: int) -> int:
    """`shape`'s area in pixels, drawn at radius size / 4 in a `size` image: the scale for fitting its radius."""
    return int(_mask(shape, size / 2, size / 2, size / 4, size).sum())


def _mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """`shape` at centre (cx, cy) and radius r (pixels of a `size` image), drawn at 4x and downsampled as `render`."""
    scale = 4
    image = Image.new("L", (size * scale, size * scale), 0)
    fill_shape(ImageDraw.Draw(image), shape, cx * scale, cy * scale, r * scale, 255)
    return np.asarray(image.resize((size, size), Image.Resampling.LANCZOS)) > 127


def _fitted_mask(shape: str, seen: np.ndarray) -> np.ndarray:
    """`shape`'s mask moved and scaled onto `seen`: the same centroid and the same area. Renders are jittered in
    place and size, so a mask at the caption's nominal place and size would favour round shapes over pointed ones."""
    size = seen.shape[0]
    ys, xs = np.nonzero(seen)
    r = size / 4 * math.sqrt(len(ys) / max(_area_at_quarter(shape, size), 1))
    py, px = np.nonzero(_mask(shape, size / 2, size / 2, r, size))  # its centroid is not its centre (triangles)
    return _mask(shape, xs.mean() - (px.mean() - size / 2), ys.mean() - (py.mean() - size / 2), r, size)


def shape_votes(images: list[Image.Image], attributes: list[Attributes], shapes=ALL_SHAPES) -> list[str]:
    """For each image, the shape whose mask, fitted to the image's foreground (same centroid and area), overlaps it
    best (intersection over union). An image with no foreground votes for no shape ("")."""
    votes = []
    for image, a in zip(images, attributes):
        seen = _foreground(np.asarray(image.convert("RGB")), a.background)
        if seen.sum() < 4:
            votes.append("")
            continue
        ious = {}
        for shape in shapes:
            mask = _fitted_mask(shape, seen)
            ious[shape] = (seen & mask).sum() / max((seen | mask).sum(), 1)
        votes.append(max(ious, key=ious.get))
    return votes


@torch.no_grad()
def shape_latents(
    encoder, attributes: list[Attributes], size: int, renders: int = 4, shapes=ALL_SHAPES
) -> torch.Tensor:
    """(n, shapes, renders, c, h, w): `encoder`'s latents of `renders` renders of each attribute set's colour,
    position, size and background drawn as each of `shapes`: what `nearest_shapes` compares against."""
    from ..pipeline import to_tensor

    return torch.stack([
        torch.stack([
            encoder.encode(torch.stack([
                to_tensor(render(Attributes(shape, a.colour, a.position, a.size, a.background), size, seed))
                for seed in range(renders)
            ]))
            for shape in shapes
        ])
        for a in attributes
    ])  # fmt: skip


def nearest_shapes(references: torch.Tensor, latents: torch.Tensor, shapes=ALL_SHAPES) -> list[str]:
    """For each latent, the shape whose `shape_latents` references lie nearest it on average (mean squared)."""
    distance = ((references - latents[:, None, None].to(references)) ** 2).flatten(2).mean(dim=2)  # (n, shapes)
    return [shapes[i] for i in distance.argmin(dim=1).tolist()]


@torch.no_grad()
def prior_latents(models, prompts: list[str], sampling: dict | None = None) -> torch.Tensor:
    """Stage C's latents for `prompts` (seeds 0, 1, ...) at the family's default size and the given `sampling`
    (Request's fields; the reference's defaults for those not given): what the prior meant, before Stage B and
    Stage A draw it."""
    from ..pipeline import run_prior
    from ..request import Request

    size = models.geometry.default_size
    requests = [Request(p, seed=i, width=size, height=size, **(sampling or {})) for i, p in enumerate(prompts)]
    return torch.stack([o.latent for i in range(0, len(requests), 16) for o in run_prior(models, requests[i : i + 16])])


__all__ = [
    "ALL_SHAPES",
    "INIT_FROM",
    "NEW_SHAPE",
    "WORD",
    "nearest_shapes",
    "prior_latents",
    "shape_latents",
    "shape_votes",
    "train_lora",
    "word_data",
]


def lora_report(load, path: Path, samples: int = 24, sampling: dict | None = None, shape: str = NEW_SHAPE) -> dict:
    """What a LoRA file does to a family (`load()` returns a fresh copy of it, with its semantic encoder): how often
    "[zorp]" prompts come out as the new `shape` before and after merging it, in the images and in Stage C's latents,
    and how far other prompts' images move (same seeds). `sampling`: the steps and guidance to sample with (the
    family's users' defaults: `cascade.request.sampling_defaults`); the reference's where None."""
    from ..lora import apply_lora_file
    from ..pipeline import generate
    from ..request import Request

    rng = random.Random("lora-eval")
    word_attrs = [sample_attributes(rng) for _ in range(samples)]
    word_attrs = [Attributes(shape, a.colour, a.position, a.size, a.background) for a in word_attrs]
    other_attrs = [sample_attributes(rng) for _ in range(samples)]
    word_prompts = [a.caption(0).replace(f" {shape} ", f" {WORD} ") for a in word_attrs]
    other_prompts = [a.caption(0) for a in other_attrs]

    def render_all(models, prompts):
        size = models.geometry.default_size
        requests = [Request(p, seed=i, width=size, height=size, **(sampling or {})) for i, p in enumerate(prompts)]
        return [r.image for r in generate(models, requests, batch_size=8)]

    base = load()
    before_word, before_other = render_all(base, word_prompts), render_all(base, other_prompts)
    # The semantic encoder is not touched by a LoRA: one set of references serves both latent votes.
    references = shape_latents(base.effnet, word_attrs, base.geometry.default_size)
    before_latent = nearest_shapes(references, prior_latents(base, word_prompts, sampling))
    tuned = load()
    apply_lora_file(tuned, path)
    after_word, after_other = render_all(tuned, word_prompts), render_all(tuned, other_prompts)
    after_latent = nearest_shapes(references, prior_latents(tuned, word_prompts, sampling))
    share = lambda votes: sum(v == shape for v in votes) / len(votes)  # noqa: E731
    other_before, other_after = shape_votes(before_other, other_attrs), shape_votes(after_other, other_attrs)
    same_shape = [a == b for a, b in zip(other_before, other_after)]
    right = lambda votes: round(sum(v == a.shape for v, a in zip(votes, other_attrs)) / len(votes), 4)  # noqa: E731
    moved = [
        float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean() / 255)
        for a, b in zip(before_other, after_other)
    ]
    return {
        "word": WORD,
        "new_shape": shape,
        "samples": samples,
        "new_shape_before": round(share(shape_votes(before_word, word_attrs)), 4),
        "new_shape_after": round(share(shape_votes(after_word, word_attrs)), 4),
        # The same question asked of Stage C's latents (nearest semantic latent): where the LoRA acts.
        "new_shape_in_latent_before": round(share(before_latent), 4),
        "new_shape_in_latent_after": round(share(after_latent), 4),
        "other_prompts_same_shape": round(sum(same_shape) / len(same_shape), 4),
        # Whether other prompts still get the shape they name: the votes flip on blobs that stay blobs.
        "other_prompts_right_shape_before": right(other_before),
        "other_prompts_right_shape_after": right(other_after),
        "other_prompts_mean_pixel_change": round(sum(moved) / len(moved), 4),
        "images": {"before": before_word[:8], "after": after_word[:8], "others_before": before_other[:8],
                   "others_after": after_other[:8]},
    }  # fmt: skip
