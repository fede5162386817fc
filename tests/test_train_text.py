"""The contrastive text-encoder trainer (the demo family's text stage): it learns to pick each caption's own image."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cascade.text import build_text_encoder
from cascade.train.demo import TEXT
from cascade.train.loop import RunConfig
from cascade.train.shapes import make_dataset
from cascade.train.text import ImageHead, clip_loss, retrieval_accuracy, train_text_encoder


def test_clip_loss_is_low_for_matched_pairs_and_counts_same_groups_as_positives():
    text = torch.eye(4)
    groups = torch.arange(4)
    scale = torch.tensor(4.0)
    assert clip_loss(text, text, scale, groups) < clip_loss(text, text.roll(1, 0), scale, groups)
    # Two captions of one combination: either image is right for either caption.
    same = torch.tensor([0, 0, 1, 2])
    swapped = text[[1, 0, 2, 3]]
    assert torch.isclose(clip_loss(text, swapped, scale, same), clip_loss(text, text, scale, same))


def test_contrastive_training_teaches_the_text_encoder_to_find_its_image():
    data = make_dataset(64, 64, seed=3, split="train")
    # Stand-in image latents that show colour, place, size and background: the images averaged down to 8 x 8.
    latents = F.interpolate(data.images, size=8, mode="area")
    encoder = build_text_encoder(TEXT, seed=0)
    unique = {a: i for i, a in enumerate(data.attributes)}  # one caption per combination, for a clean argmax
    idx = sorted(unique.values())
    captions, chosen = [data.captions[i] for i in idx], latents[idx]

    run = RunConfig(steps=120, batch_size=16, lr=2e-3, warmup=10, ema_beta=0.9)
    trained = train_text_encoder(encoder, data, latents, run, progress=False)
    assert trained.steps == 120 and trained.losses[-1] < trained.losses[0]
    encoder.model.load_state_dict(trained.ema["text_encoder"].state_dict())
    head: ImageHead = trained.ema["image_head"]
    accuracy = retrieval_accuracy(encoder, head, captions, chosen)
    assert accuracy > 5 / len(captions), accuracy  # chance is 1 / len(captions)
