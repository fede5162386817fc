"""A generated, captioned data set: one coloured shape per image, at a position and size, on a background.

"a small red circle in the top left on a white background". Every attribute is in the caption, so a model that
follows its prompt can be checked attribute by attribute (see `checker`). Some (colour, shape) pairs are held out:
they never appear in the training split, so an evaluation on them measures composition, not memory. Each colour and
each shape still appears in training with other partners.

Rendering is deterministic for a seed: drawn at 4x with PIL, then downsampled (antialiased edges), with a small
jitter of position and size so images of one caption differ.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 135, 30),
    "pink": (245, 130, 190),
    "cyan": (40, 200, 210),
}
POSITIONS = {  # centre of the shape as a fraction of the image side
    "in the top left": (0.27, 0.27),
    "in the top right": (0.73, 0.27),
    "in the bottom left": (0.27, 0.73),
    "in the bottom right": (0.73, 0.73),
    "in the center": (0.5, 0.5),
}
SIZES = {"small": 0.26, "large": 0.42}  # the shape's extent as a fraction of the image side
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128), "beige": (225, 210, 180)}
TEMPLATES = (
    "a {size} {colour} {shape} {position} on a {background} background",
    "a {colour} {shape}, {size}, {position} on a {background} background",
    "{position}: a {size} {colour} {shape} on {background}",
)


def heldout_pairs() -> frozenset[tuple[str, str]]:
    """(colour, shape) pairs never shown in training: colour i with shape i mod 5, so 8 of 40 pairs, each colour
    held out once and each shape once or twice."""
    return frozenset((colour, SHAPES[i % len(SHAPES)]) for i, colour in enumerate(COLOURS))


HELDOUT = heldout_pairs()


@dataclass(frozen=True)
class Attributes:
    shape: str
    colour: str
    position: str
    size: str
    background: str

    @property
    def heldout(self) -> bool:
        return (self.colour, self.shape) in HELDOUT

    def caption(self, template: int = 0) -> str:
        return TEMPLATES[template % len(TEMPLATES)].format(**self.__dict__)


def sample_attributes(rng: random.Random, split: str = "train") -> Attributes:
    """A random combination from `split`: "train" (no held-out pair) or "heldout" (only held-out pairs)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split: {split!r} is not known; use 'train' or 'heldout'")
    while True:
        colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
        if ((colour, shape) in HELDOUT) == (split == "heldout"):
            break
    return Attributes(
        shape=shape,
        colour=colour,
        position=rng.choice(sorted(POSITIONS)),
        size=rng.choice(sorted(SIZES)),
        background=rng.choice(sorted(BACKGROUNDS)),
    )


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        r *= 0.86  # the same visual weight as the circle
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if shape == "star":  # not in SHAPES: the new shape a LoRA teaches ("a [zorp]")
        return [
            (cx + (r if k % 2 == 0 else r * 0.45) * math.sin(math.pi * k / 5),
             cy - (r if k % 2 == 0 else r * 0.45) * math.cos(math.pi * k / 5))
            for k in range(10)
        ]  # fmt: skip
    if shape == "hexagon":
        return [(cx + r * math.cos(math.pi * k / 3), cy + r * math.sin(math.pi * k / 3)) for k in range(6)]
    if shape == "arrow":  # pointing right
        a, b = r * 0.35, r * 0.1
        return [(cx - r, cy - a), (cx + b, cy - a), (cx + b, cy - r), (cx + r, cy), (cx + b, cy + r), (cx + b, cy + a),
                (cx - r, cy + a)]  # fmt: skip
    if shape == "cross":
        a, b = r, r * 0.36
        return [
            (cx - b, cy - a), (cx + b, cy - a), (cx + b, cy - b), (cx + a, cy - b), (cx + a, cy + b), (cx + b, cy + b),
            (cx + b, cy + a), (cx - b, cy + a), (cx - b, cy + b), (cx - a, cy + b), (cx - a, cy - b), (cx - b, cy - b),
        ]  # fmt: skip
    raise ValueError(f"shape: {shape!r} is not known; use one of {', '.join(SHAPES)}")


def fill_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    """`shape` filled with `fill`, centred at (cx, cy) with radius r, in `draw`'s pixels."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=fill)


def render(
    attributes: Attributes,
    size: int = 64,
    seed: int = 0,
    jitter: float = 0.04,
    fill: tuple[int, int, int] | None = None,
) -> Image.Image:
    """The image of `attributes`, `size` pixels square; `seed` picks the jitter. `fill` replaces the colour's RGB."""
    rng = random.Random(seed)
    scale = 4
    side = size * scale
    image = Image.new("RGB", (side, side), BACKGROUNDS[attributes.background])
    draw = ImageDraw.Draw(image)
    fx, fy = POSITIONS[attributes.position]
    cx = (fx + rng.uniform(-jitter, jitter)) * side
    cy = (fy + rng.uniform(-jitter, jitter)) * side
    r = SIZES[attributes.size] * rng.uniform(0.9, 1.1) * side / 2
    fill_shape(draw, attributes.shape, cx, cy, r, fill or COLOURS[attributes.colour])
    return image.resize((size, size), Image.Resampling.LANCZOS)


# Each attribute's classes, in the order classifiers (the judge's heads, the semantic encoder's probe) index them.
ATTRIBUTES = {
    "shape": list(SHAPES),
    "colour": sorted(COLOURS),
    "position": sorted(POSITIONS),
    "size": sorted(SIZES),
    "background": sorted(BACKGROUNDS),
}


def labels(attributes: Sequence[Attributes], names: Iterable[str] = ATTRIBUTES) -> dict[str, torch.Tensor]:
    """(N,) class indices of each named attribute."""
    return {name: torch.tensor([ATTRIBUTES[name].index(getattr(a, name)) for a in attributes]) for name in names}


@dataclass
class ShapesData:
    """A materialised split: images (N, 3, S, S) float in [0, 1], captions, attributes."""

    images: torch.Tensor
    captions: list[str]
    attributes: list[Attributes]

    def __len__(self) -> int:
        return len(self.captions)


def make_dataset(n: int, size: int = 64, seed: int = 0, split: str = "train") -> ShapesData:
    """n samples of `split`, reproducible from `seed` (attributes, caption templates and jitter)."""
    rng = random.Random(f"{split}:{seed}")
    attributes = [sample_attributes(rng, split) for _ in range(n)]
    captions = [a.caption(rng.randrange(len(TEMPLATES))) for a in attributes]
    pixels = np.stack([np.asarray(render(a, size, rng.randrange(2**31))) for a in attributes])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    return ShapesData(images, captions, attributes)


# Shapes no caption names: the general images may include them (a recipe's `general_shapes`), so that the image
# models (Stage A, the semantic encoder, Stage B) can draw a shape that only a LoRA will give a word to.
UNNAMED_SHAPES = ("star", "hexagon", "arrow")

# Uncaptioned shapes in any colour: the image models' "general images" (below), kept this far (RGB distance)
# from each held-out pair's colour on that pair's shape, and from the background so the shape shows.
HELDOUT_MARGIN = 80.0
BACKGROUND_MARGIN = 60.0


def free_colour(rng: random.Random, shape: str, background: str) -> tuple[int, int, int]:
    """A uniformly random RGB colour that is not near a held-out pair's colour for `shape`, nor the background."""
    near = [COLOURS[c] for c, s in HELDOUT if s == shape]
    while True:
        rgb = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        if math.dist(rgb, BACKGROUNDS[background]) < BACKGROUND_MARGIN:
            continue
        if all(math.dist(rgb, c) >= HELDOUT_MARGIN for c in near):
            return rgb


# Stage C's general images (a recipe's opt-in) are captioned with everything they show but their colour, which has
# no name: the data set's templates without the colour word. The idea: in the captioned set each shape comes in its
# training colours only, so a shape's words may carry colour; beside these, the colour must come from the colour
# word, as it must for a held-out pair. Measured (docs/TRAINING.md): inside the evaluation's noise.
COLOURLESS_TEMPLATES = tuple(t.replace("{colour} ", "") for t in TEMPLATES)


def colourless_captions(targets: dict[str, torch.Tensor], seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """For general images' labels (`make_general`): the indices of those with a named shape, and their captions
    without a colour (a template at random, reproducible from `seed`)."""
    rng = random.Random(f"colourless:{seed}")
    named = (targets["shape"] >= 0).nonzero().flatten()
    captions = []
    for i in named.tolist():
        words = {k: ATTRIBUTES[k][int(targets[k][i])] for k in ("shape", "position", "size", "background")}
        captions.append(rng.choice(COLOURLESS_TEMPLATES).format(**words))
    return named, captions


def make_general(
    n: int, size: int = 64, seed: int = 0, unnamed: Sequence[str] = ()
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """n uncaptioned images of the data set's shapes, places, sizes and backgrounds in random colours (`free_colour`),
    with their labels (colour: -100, no class). The official semantic encoder is an ImageNet classifier, a general
    image model that has seen every shape in every colour; this set is what makes the demo's encoder read a shape's
    outline apart from its colour. No image is near a held-out pair: each pair's colour is kept `HELDOUT_MARGIN` away
    on its shape, so held-out pairs stay unseen by every stage. `unnamed`: shapes of `UNNAMED_SHAPES` drawn as
    often as each named one (shape label -100 too)."""
    for shape in unnamed:
        if shape not in UNNAMED_SHAPES:
            raise ValueError(f"general shape: {shape!r} is not known; use some of {', '.join(UNNAMED_SHAPES)}")
    rng = random.Random(f"general:{seed}" + (":" + ",".join(unnamed) if unnamed else ""))
    shapes = (*SHAPES, *unnamed)
    attributes, pixels, named = [], [], []
    for _ in range(n):
        a = sample_attributes(rng, "train")
        shape = rng.choice(shapes) if unnamed else a.shape
        fill = free_colour(rng, shape, a.background)
        attributes.append(dataclasses.replace(a, shape=shape if shape in SHAPES else a.shape))
        named.append(shape in SHAPES)
        pixels.append(np.asarray(render(dataclasses.replace(a, shape=shape), size, rng.randrange(2**31), fill=fill)))
    targets = labels(attributes)
    targets["colour"] = torch.full((n,), -100)
    targets["shape"] = torch.where(torch.tensor(named), targets["shape"], -100)
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255
    return images, targets
