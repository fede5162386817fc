"""The generated shapes data set and the independent checker that judges generated images."""

import random

import numpy as np
import pytest

from cascade.train.checker import HEADS, judge, train_checker
from cascade.train.shapes import COLOURS, HELDOUT, SHAPES, Attributes, make_dataset, render, sample_attributes


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
