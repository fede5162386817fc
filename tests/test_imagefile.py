"""Encoded images carry their parameters: PNG text chunks, or an EXIF description that fits the format."""

import io
import json

import pytest
from PIL import Image

from cascade.imagefile import EXIF_IMAGE_DESCRIPTION, JPEG_DESCRIPTION_MAX, encode
from cascade.request import Request

PIXELS = Image.new("RGB", (64, 64), (200, 30, 30))


def read_back(data: bytes) -> tuple[str, dict]:
    image = Image.open(io.BytesIO(data))
    if image.format == "PNG":
        return image.format, dict(image.text)
    return image.format, json.loads(image.getexif()[EXIF_IMAGE_DESCRIPTION])


@pytest.mark.parametrize("fmt", ["png", "webp", "jpeg"])
def test_each_format_carries_the_prompts_seed_and_parameters(fmt):
    request = Request("a red circle \N{GRINNING FACE}", negative_prompt="blurry", seed=7, width=64, height=64)
    kind, fields = read_back(encode(PIXELS, request, "demo", fmt))
    assert kind == {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}[fmt]
    assert (fields["prompt"], fields["negative_prompt"], str(fields["seed"])) == (request.prompt, "blurry", "7")
    assert "model=demo size=64x64" in fields["parameters"] and "truncated" not in fields


@pytest.mark.parametrize("prompt", ["\N{GRINNING FACE}" * 6000, "a" * 70000])
def test_a_prompt_too_long_for_a_jpeg_s_exif_is_shortened_and_marked(prompt):
    """JPEG's EXIF segment holds 64 KiB, and the ASCII-escaped JSON takes 12 bytes for an emoji: the image is still
    written, with the prompts cut to fit and "truncated": true. Formats without the limit keep them whole."""
    request = Request(prompt, negative_prompt=prompt[:5000], seed=1, width=64, height=64)
    data = encode(PIXELS, request, "demo", "jpeg")
    _, fields = read_back(data)
    assert fields["truncated"] is True and fields["seed"] == 1
    assert 0 < len(fields["prompt"]) < len(prompt) and prompt.startswith(fields["prompt"])
    assert request.negative_prompt.startswith(fields["negative_prompt"])
    description = Image.open(io.BytesIO(data)).getexif()[EXIF_IMAGE_DESCRIPTION]
    assert JPEG_DESCRIPTION_MAX * 0.8 < len(description) <= JPEG_DESCRIPTION_MAX  # cut no more than it must
    _, whole = read_back(encode(PIXELS, request, "webp"))
    assert whole["prompt"] == prompt and "truncated" not in whole


def test_a_short_negative_prompt_beside_a_long_prompt_stays_whole_in_a_jpeg():
    """The long prompt is cut first: both used to be cut by the same share, so a 10-character negative prompt lost
    its end (a review, 2026-11-30) and a reader could not tell which field was cut."""
    request = Request("a" * 78000, negative_prompt="blurry <b>", seed=1, width=64, height=64)
    _, fields = read_back(encode(PIXELS, request, "demo", "jpeg"))
    assert fields["truncated"] is True and fields["negative_prompt"] == "blurry <b>"
    assert 60000 < len(fields["prompt"]) < 78000
    # Two long prompts: the longer is cut, then the other only if that is not enough; each stays a prefix.
    for prompt, negative in ((70000, 30000), (64000, 64000)):
        request = Request("b" * prompt, negative_prompt="n" * negative, seed=1, width=64, height=64)
        data = encode(PIXELS, request, "demo", "jpeg")
        _, fields = read_back(data)
        assert fields["truncated"] is True and len(fields["prompt"]) < prompt
        assert set(fields["prompt"]) == {"b"} and set(fields["negative_prompt"]) <= {"n"}
        assert len(Image.open(io.BytesIO(data)).getexif()[EXIF_IMAGE_DESCRIPTION]) <= JPEG_DESCRIPTION_MAX
        if prompt - negative > 30000:
            assert fields["negative_prompt"] == request.negative_prompt
        else:  # cut alike: neither is left much shorter than the other
            assert abs(len(fields["prompt"]) - len(fields["negative_prompt"])) < 2000
