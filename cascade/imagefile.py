"""Encoded image files that carry their generation parameters: PNG text chunks, or an EXIF description (WEBP, JPEG)."""

from __future__ import annotations

import io
import json

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .request import Request

FORMATS = {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}
CONTENT_TYPES = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}
EXIF_IMAGE_DESCRIPTION = 0x010E


def parameters(request: Request, model: str, extra: str = "") -> str:
    """The settings that made the image, as `key=value` words; `extra` adds more (img2img's strength and image)."""
    return (
        f"model={model} size={request.width}x{request.height} prior_steps={request.prior_steps} "
        f"prior_cfg={request.prior_cfg} decoder_steps={request.decoder_steps} decoder_cfg={request.decoder_cfg} "
        f"sampler={request.sampler}" + (f" {extra}" if extra else "")
    )


def _text(value: str) -> str:
    return value.replace("\0", "")  # PNG text chunks cannot hold NUL


def png_info(request: Request, model: str, extra: str = "") -> PngInfo:
    info = PngInfo()
    info.add_text("prompt", _text(request.prompt))
    info.add_text("negative_prompt", _text(request.negative_prompt))
    info.add_text("seed", str(request.seed))
    info.add_text("parameters", parameters(request, model, extra))
    return info


def encode(
    image: Image.Image, request: Request, model: str, fmt: str = "png", quality: int = 95, extra: str = ""
) -> bytes:
    """The image as PNG (lossless, compress level 6), WEBP or JPEG at `quality`, with its parameters embedded
    (`extra`: more `key=value` words for them)."""
    if fmt not in FORMATS:
        raise ValueError(f"image_format: {fmt!r} is not known; use one of {', '.join(FORMATS)}")
    out = io.BytesIO()
    if fmt == "png":
        image.save(out, format="PNG", pnginfo=png_info(request, model, extra))
    else:
        exif = Image.Exif()
        limit = JPEG_DESCRIPTION_MAX if fmt == "jpeg" else None
        exif[EXIF_IMAGE_DESCRIPTION] = description(request, model, limit, extra)
        image.save(out, format=FORMATS[fmt], quality=quality, exif=exif.tobytes())
    return out.getvalue()


# A JPEG holds its EXIF in one segment of at most 64 KiB; a little is left for the rest of the EXIF structure.
JPEG_DESCRIPTION_MAX = 65000


def description(request: Request, model: str, limit: int | None = None, extra: str = "") -> str:
    """The EXIF description: JSON with the prompts, the seed and the parameters. EXIF text is ASCII, so the JSON
    escapes everything else (up to 12 bytes for a character such as an emoji). Over `limit` characters, the longer
    prompt is shortened first, down to the other's length at most, then both alike, until it fits (a short negative
    prompt beside a long prompt stays whole), and "truncated": true says so (the manifest keeps them whole)."""
    fields = {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "seed": request.seed,
        "parameters": parameters(request, model, extra),
    }
    text = json.dumps(fields, ensure_ascii=True)
    while limit is not None and len(text) > limit and (fields["prompt"] or fields["negative_prompt"]):
        over = len(text) - limit
        encoded = {name: len(json.dumps(fields[name], ensure_ascii=True)) for name in ("prompt", "negative_prompt")}
        longer, shorter = sorted(encoded, key=encoded.get, reverse=True)
        if encoded[longer] - encoded[shorter] > over:  # the longer alone, by its share of what is over (a margin)
            kept = {longer: (1 - over / encoded[longer]) * 0.95}
        elif encoded[longer] > encoded[shorter]:  # the longer down to the shorter's length first
            kept = {longer: encoded[shorter] / encoded[longer]}
        else:  # as long as each other: both, by the same share
            kept = {name: (1 - over / (2 * encoded[name])) * 0.95 for name in encoded}
        for name, share in kept.items():
            fields[name] = fields[name][: int(len(fields[name]) * max(0.0, share))]
        fields["truncated"] = True
        text = json.dumps(fields, ensure_ascii=True)
    return text
