"""The generated shapes data set and the independent checker that judges generated images."""

import math
import random

import numpy as np
import pytest

from cascade.train.checker import HEADS, judge, train_checker
from cascade.train.shapes import (
    ATTRIBUTES,
    BACKGROUNDS,
    COLOURS,
    HELDOUT,
    HELDOUT_MARGIN,
    SHAPES,
    UNNAMED_SHAPES,
    Attributes,
    colourless_captions,
    free_colour,
    make_dataset,
    make_general,
    render,
    sample_attributes,
)


def test_heldout_pairs_leave_every_colour_and_shape_in_training():
    assert len(HELDOUT) == len(COLOURS)
    train_pairs = {(c, s) for c in COLOURS for s in SHAPES} - HELDOUT
    assert {c for c, _ in train_pairs} == set(COLOURS) and {s for _, s in train_pairs} == set(SHAPES)


def test_splits_never_mix():
    train = make_dataset(300, size=32, seed=1, split="train")
    heldout = make_dataset(100, size=32, seed=1, split="heldout")
    assert not any(a.heldout for a in train.attributes) and all(a.heldout for a in heldout.attributes)
    with pytest.raises(ValueError, match="split"):
        sample_attributes(random.Random(0), "test")


def test_captions_name_every_attribute_and_renders_are_deterministic():
    data = make_dataset(20, size=48, seed=3)
    for caption, a in zip(data.captions, data.attributes):
        for value in (a.shape, a.colour, a.position, a.size, a.background):
            assert value in caption
    again = make_dataset(20, size=48, seed=3)
    assert data.captions == again.captions and bool((data.images == again.images).all())
    assert data.images.shape == (20, 3, 48, 48) and data.images.min() >= 0 and data.images.max() <= 1


def test_general_images_keep_away_from_every_heldout_pair():
    rng = random.Random(0)
    for shape in SHAPES:
        near = [COLOURS[c] for c, s in HELDOUT if s == shape]
        colours = [free_colour(rng, shape, "white") for _ in range(2000)]
        assert min(math.dist(rgb, c) for rgb in colours for c in near) >= HELDOUT_MARGIN
        assert min(math.dist(rgb, BACKGROUNDS["white"]) for rgb in colours) >= 60
        # Only a ball around the held-out colour is left out: the colours just beyond it are drawn.
        assert any(math.dist(rgb, c) < 2 * HELDOUT_MARGIN for rgb in colours for c in near)

    images, targets = make_general(64, size=32, seed=2)
    again, _ = make_general(64, size=32, seed=2)
    assert images.shape == (64, 3, 32, 32) and bool((images == again).all())
    assert set(targets) == set(ATTRIBUTES) and bool((targets["colour"] == -100).all())
    assert int(targets["shape"].min()) >= 0 and len(set(targets["shape"].tolist())) == len(SHAPES)
    # The pixels have colours off the palette: the set is not the captioned data set again.
    centre_pixels = images.permute(0, 2, 3, 1).reshape(-1, 3) * 255
    palette = [c for c in COLOURS.values()] + list(BACKGROUNDS.values())
    far = [min(math.dist(p.tolist(), c) for c in palette) for p in centre_pixels[::97]]
    assert max(far) > 40


def test_general_images_may_hold_shapes_no_caption_names():
    images, targets = make_general(60, size=32, seed=4, unnamed=("star", "hexagon"))
    unnamed = targets["shape"] == -100
    assert 0 < int(unnamed.sum()) < 60 and images.shape == (60, 3, 32, 32)
    plain, plain_targets = make_general(60, size=32, seed=4)  # without: the same call as before there were any
    assert bool((plain_targets["shape"] >= 0).all())
    with pytest.raises(ValueError, match="general shape: 'blob' is not known"):
        make_general(4, size=32, unnamed=("blob",))
    for shape in UNNAMED_SHAPES:  # each is drawn, filled, where it was asked
        a = Attributes(shape, "red", "in the top left", "large", "white")
        pixels = np.asarray(render(a, 64, seed=0)).astype(int)
        red = (pixels[..., 0] > 180) & (pixels[..., 1] < 90)
        ys, xs = np.nonzero(red)
        assert xs.mean() < 32 and ys.mean() < 32 and red.sum() > 60, shape


def test_general_images_of_named_shapes_are_captioned_with_all_but_their_colour():
    images, targets = make_general(60, size=32, seed=4, unnamed=("star", "arrow"))
    named, captions = colourless_captions(targets, seed=4)
    assert named.tolist() == (targets["shape"] >= 0).nonzero().flatten().tolist() and 0 < len(named) < 60
    assert len(captions) == len(named) and len(set(captions)) > 1
    for i, caption in zip(named.tolist(), captions):
        for name in ("shape", "position", "size", "background"):
            assert ATTRIBUTES[name][int(targets[name][i])] in caption, (name, caption)
        assert not any(colour in caption.split() for colour in COLOURS), caption
    assert colourless_captions(targets, seed=4)[1] == captions  # reproducible from the seed ...
    assert colourless_captions(targets, seed=5)[1] != captions  # ... and the seed chooses the templates


def test_render_puts_the_shape_where_the_caption_says():
    a = Attributes("square", "red", "in the top left", "large", "white")
    pixels = np.asarray(render(a, 64, seed=0)).astype(int)
    red = (pixels[..., 0] > 180) & (pixels[..., 1] < 90)
    ys, xs = np.nonzero(red)
    assert xs.mean() < 32 and ys.mean() < 32 and red.sum() > 100


@pytest.mark.slow
def test_checker_learns_the_ground_truth():
    checker = train_checker(size=32, steps=150, batch=48, seed=0)
    data = make_dataset(120, size=32, seed=9, split="heldout")
    verdict = judge(checker, data.images, data.attributes)
    assert set(verdict.accuracy) == set(HEADS)
    assert min(verdict.accuracy.values()) > 0.9, verdict.accuracy
