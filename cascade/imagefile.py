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


def parameters(request: Request, model: str) -> str:
    return (
        f"model={model} size={request.width}x{request.height} prior_steps={request.prior_steps} "
        f"prior_cfg={request.prior_cfg} decoder_steps={request.decoder_steps} decoder_cfg={request.decoder_cfg} "
        f"sampler={request.sampler}"
    )


def _text(value: str) -> str:
    return value.replace("\0", "")  # PNG text chunks cannot hold NUL


def png_info(request: Request, model: str) -> PngInfo:
    info = PngInfo()
    info.add_text("prompt", _text(request.prompt))
    info.add_text("negative_prompt", _text(request.negative_prompt))
    info.add_text("seed", str(request.seed))
    info.add_text("parameters", parameters(request, model))
    return info


def encode(image: Image.Image, request: Request, model: str, fmt: str = "png", quality: int = 95) -> bytes:
    """The image as PNG (lossless, compress level 6), WEBP or JPEG at `quality`, with its parameters embedded."""
    if fmt not in FORMATS:
        raise ValueError(f"image_format: {fmt!r} is not known; use one of {', '.join(FORMATS)}")
    out = io.BytesIO()
    if fmt == "png":
        image.save(out, format="PNG", pnginfo=png_info(request, model))
    else:
        exif = Image.Exif()
        # EXIF text is ASCII: the JSON escapes everything else.
        exif[EXIF_IMAGE_DESCRIPTION] = json.dumps(
            {
                "prompt": request.prompt,
                "negative_prompt": request.negative_prompt,
                "seed": request.seed,
                "parameters": parameters(request, model),
            },
            ensure_ascii=True,
        )
        image.save(out, format=FORMATS[fmt], quality=quality, exif=exif.tobytes())
    return out.getvalue()
