"""In-process text-to-image generation: requests in, images out.

The two halves are separate so the distributed pipeline can run them on different GPU pools:
`run_prior` (text encoder + Stage C) turns requests into small `PriorOutput`s (the 16 x 24 x 24 latent and the pooled
text embeddings Stage B needs), and `run_decoder` (Stage B + Stage A) turns those into images. `generate` runs both in
one process, batching requests that share a shape and sampling parameters.

Determinism: each request's noise, initial and per step, comes from CPU generators seeded from its seed alone (one
for Stage C, one for Stage B), and guidance never mixes samples, so a request gives the same image alone or in any
batch. A result holding NaN or Inf is reported as an error for that request, never returned as a black image.
"""

from __future__ import annotations

import numbers
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import gdf
from .family import CascadeModels
from .request import Request, buckets, latent_sizes, validate, validate_strength

PRIOR_SHIFT, DECODER_SHIFT = 2.0, 1.0  # the reference notebook's values


def stage_generator(seed: int, stage: str) -> torch.Generator:
    """The CPU generator for one request's stage. Stage B's seed is derived, so its noise does not depend on how
    many draws Stage C made (the stages may run on different machines)."""
    seed = int(seed)  # numpy integers would overflow in the mixing below
    if stage == "stage_c":
        return torch.Generator().manual_seed(seed)
    z = (seed + 0x9E3779B97F4A7C15) % 2**64  # splitmix64: a well-mixed, fixed function of the seed
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return torch.Generator().manual_seed(z ^ (z >> 31))


def nonfinite(t: torch.Tensor) -> list[bool]:
    """Per sample: does it hold NaN or Inf?"""
    return (~torch.isfinite(t.float())).flatten(1).any(dim=1).tolist()


@dataclass
class PriorOutput:
    """What Stage C hands to Stage B for one request: small enough for a queue (16 x 24 x 24 at 1024 px)."""

    request: Request
    latent: torch.Tensor | None  # (16, h, w) Stage C's predicted clean latent
    clip_text_pooled: torch.Tensor | None  # (1, c_clip) prompt
    clip_text_pooled_negative: torch.Tensor | None  # (1, c_clip) negative prompt (Stage B's unconditional input)
    prompt_tokens: int = 0
    prompt_truncated: bool = False
    error: str | None = None
    seconds: float = 0.0


@dataclass
class Result:
    request: Request
    image: Image.Image | None
    error: str | None = None
    prompt_truncated: bool = False
    prompt_tokens: int = 0
    timings: dict[str, float] = field(default_factory=dict)


def _same_bucket(requests: Sequence[Request]) -> None:
    if len({r.bucket() for r in requests}) > 1:
        raise ValueError("a batch must share width, height, steps, cfg and sampler; use generate() to bucket requests")


def to_tensor(image: Image.Image | torch.Tensor) -> torch.Tensor:
    """A PIL image, or a (3, H, W) tensor in [0, 1] -> float32 (3, H, W) RGB in [0, 1]."""
    if isinstance(image, torch.Tensor):
        return image.float()
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)


def image_problem(image) -> str | None:
    """What is wrong with an img2img input image, or None: a PIL image, or a floating (3, H, W) or (1, 3, H, W)
    tensor of RGB values in [0, 1] (a uint8 tensor of 0 to 255 would be clamped to white)."""
    if isinstance(image, Image.Image):
        return None
    if not isinstance(image, torch.Tensor):
        return f"a {type(image).__name__} is not allowed; give a PIL image or a (3, H, W) tensor in [0, 1]"
    if not image.is_floating_point():
        return f"a {image.dtype} tensor is not allowed; give floating RGB values in [0, 1] (e.g. uint8 / 255)"
    shape = tuple(image.shape)
    if not (len(shape) == 3 and shape[0] == 3 or len(shape) == 4 and shape[:2] == (1, 3)):
        return f"shape {shape} is not allowed; give (3, H, W) or (1, 3, H, W), channels first"
    return None


def check_semantic_encoder(models: CascadeModels) -> None:
    """img2img encodes its images with the family's semantic encoder: ValueError naming what to load where it is not
    loaded."""
    if models.effnet is None:
        raise ValueError(
            "init_images: img2img needs the family's semantic encoder (effnet_encoder.safetensors, or "
            "semantic_encoder.safetensors in a family trained here); load the models with with_effnet=True"
        )


def effnet_latents(
    models: CascadeModels, images: Sequence[Image.Image | torch.Tensor], size: tuple[int, int]
) -> torch.Tensor:
    """Encode images into Stage C's latent space with the family's semantic encoder: (B, 16, *size).

    Each image is resized to the encoder's stride times the latent grid first (the EfficientNet's 32: 768 px for a
    1024 px image, as the reference's img2img).
    """
    check_semantic_encoder(models)
    stride = models.effnet.stride
    pixel_size = (size[0] * stride, size[1] * stride)
    pixels = torch.cat(
        [
            F.interpolate(to_tensor(im)[None], size=pixel_size, mode="bilinear", antialias=True, align_corners=False)
            for im in images
        ]
    ).clamp(0, 1)  # (B, 3, 32h, 32w)
    effnet_dtype = next(models.effnet.parameters()).dtype
    return models.effnet.encode(pixels.to(models.device, effnet_dtype)).float()


@torch.inference_mode()
def prior_conditions(models: CascadeModels, text, n: int) -> tuple[dict, dict]:
    """Stage C's conditions for n prompts and their n negative prompts (encoded together, prompts first); the image
    embedding is zeros, as the reference's text-to-image."""
    device = models.device
    clip_text, pooled = text.clip_text.to(device), text.clip_text_pooled.to(device)
    clip_img = torch.zeros(n, 1, models.clip_img_dim, device=device, dtype=clip_text.dtype)
    cond = {"clip_text": clip_text[:n], "clip_text_pooled": pooled[:n], "clip_img": clip_img}
    uncond = {"clip_text": clip_text[n:], "clip_text_pooled": pooled[n:], "clip_img": clip_img}
    return cond, uncond


def img2img_steps(prior_steps: int, strength: float) -> int:
    """Stage C's steps from t = strength: the reference notebook's int(20 * noise_level), at least 1."""
    return max(1, int(prior_steps * strength))


def run_prior(
    models: CascadeModels,
    requests: Sequence[Request],
    init_images: Sequence[Image.Image] | torch.Tensor | None = None,
    strength: float = 0.8,
) -> list[PriorOutput]:
    """Text encoder + Stage C for one bucket of requests.

    With `init_images` (img2img, one per request), Stage C starts from the images' EfficientNet latents noised to
    t = strength (at shift 1) and denoises from there (t_start = strength) in int(prior_steps * strength) steps (at
    least 1), as the reference notebook: the same step size as a whole run of prior_steps. A request
    that is not valid for the family (`validate`) raises ValueError naming it, before any work.
    """
    if not requests:
        return []
    _same_bucket(requests)
    for r in requests:
        validate(r, models.geometry)
    start = time.perf_counter()
    n, first = len(requests), requests[0]
    device = models.device
    text = models.text_encoder.encode([r.prompt for r in requests] + [r.negative_prompt for r in requests])
    cond, uncond = prior_conditions(models, text, n)
    pooled = text.clip_text_pooled
    shape_c, _ = latent_sizes(first.width, first.height, models.geometry)
    generators = [stage_generator(r.seed, "stage_c") for r in requests]
    x_init, t_start, steps = None, 1.0, first.prior_steps
    if init_images is not None:
        validate_strength(strength)
        if len(init_images) != n:
            raise ValueError(f"init_images: {len(init_images)} images for {n} requests; give one per request")
        x0 = effnet_latents(models, init_images, shape_c[1:])
        x_init = gdf.diffuse(x0, strength, gdf.randn(shape_c, generators, device), shift=1.0)
        t_start = float(strength)
        steps = img2img_steps(first.prior_steps, strength)
    latents = gdf.sample(
        gdf.guided_denoiser(models.stage_c, cond, uncond, first.prior_cfg),
        generators,
        shape_c,
        steps=steps,
        shift=PRIOR_SHIFT,
        t_start=t_start,
        sampler=first.sampler,
        x_init=x_init,
        device=device,
    )
    bad = nonfinite(latents)
    seconds = (time.perf_counter() - start) / n
    return [
        PriorOutput(
            request=r,
            latent=None if bad[i] else latents[i].cpu(),
            clip_text_pooled=pooled[i].cpu(),
            clip_text_pooled_negative=pooled[n + i].cpu(),
            prompt_tokens=text.num_tokens[i],
            prompt_truncated=text.truncated[i],
            error="Stage C produced NaN/Inf in the latent" if bad[i] else None,
            seconds=seconds,
        )
        for i, r in enumerate(requests)
    ]


def decode_latents(models: CascadeModels, latents: torch.Tensor, autocast: bool | None = None) -> torch.Tensor:
    """Stage A's decode of Stage B's latents, as the reference runs it: float32 weights, and under bfloat16 autocast
    where the generators run in bfloat16 on a GPU (the official notebook decodes inside the `autocast(bfloat16)`
    block it samples in, so its convolutions and matrix products run in bfloat16, its LayerNorms in float32).
    autocast None: by that rule; True or False forces it. Returns float32 images."""
    stage_a = models.stage_a
    latents = latents.to(next(stage_a.parameters()).dtype)
    if autocast is None:
        generators = models.stage_b if models.stage_b is not None else models.stage_c
        autocast = latents.is_cuda and next(generators.parameters()).dtype == torch.bfloat16
    if not autocast:  # (autocast is not entered at all: some torch releases refuse devices such as mps even disabled)
        return stage_a.decode(latents).float()
    with torch.autocast(latents.device.type, dtype=torch.bfloat16):
        return stage_a.decode(latents).float()


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> 8-bit RGB."""
    array = (image.clamp(0, 1).permute(1, 2, 0).float().cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


@torch.inference_mode()
def run_decoder(models: CascadeModels, priors: Sequence[PriorOutput]) -> list[Result]:
    """Stage B + Stage A for one bucket of prior outputs; those that already failed pass through as errors."""
    results: dict[int, Result] = {}
    ok = []
    for i, p in enumerate(priors):
        if p.error is not None:
            results[i] = Result(p.request, None, p.error, p.prompt_truncated, p.prompt_tokens, {"prior_s": p.seconds})
        else:
            ok.append(i)
    if ok:
        start = time.perf_counter()
        batch = [priors[i] for i in ok]
        _same_bucket([p.request for p in batch])
        first, device = batch[0].request, models.device
        dtype = next(models.stage_b.parameters()).dtype
        effnet = torch.stack([p.latent for p in batch]).to(device=device, dtype=dtype)
        cond = {"effnet": effnet, "clip": torch.stack([p.clip_text_pooled for p in batch]).to(device, dtype)}
        uncond = {
            "effnet": torch.zeros_like(effnet),
            "clip": torch.stack([p.clip_text_pooled_negative for p in batch]).to(device, dtype),
        }
        _, shape_b = latent_sizes(first.width, first.height, models.geometry)
        latents = gdf.sample(
            gdf.guided_denoiser(models.stage_b, cond, uncond, first.decoder_cfg),
            [stage_generator(p.request.seed, "stage_b") for p in batch],
            shape_b,
            steps=first.decoder_steps,
            shift=DECODER_SHIFT,
            sampler=first.sampler,
            device=device,
        )
        images = decode_latents(models, latents)
        bad_latent, bad_image = nonfinite(latents), nonfinite(images)
        seconds = (time.perf_counter() - start) / len(batch)
        for j, i in enumerate(ok):
            p = priors[i]
            error = None
            if bad_latent[j]:
                error = "Stage B produced NaN/Inf in the latent"
            elif bad_image[j]:
                error = "Stage A produced NaN/Inf in the image"
            image = None if error else to_pil(images[j])
            timings = {"prior_s": p.seconds, "decoder_s": seconds}
            results[i] = Result(p.request, image, error, p.prompt_truncated, p.prompt_tokens, timings)
    return [results[i] for i in range(len(priors))]


def generate(
    models: CascadeModels,
    requests: Sequence[Request],
    batch_size: int = 4,
    progress: Callable[[int, int], None] | None = None,
    init_images: Sequence[Image.Image | torch.Tensor] | None = None,
    strength: float = 0.8,
) -> list[Result]:
    """Generate one image per request, in request order. Invalid requests raise ValueError before any work.

    init_images (img2img): one image per request; Stage C starts from it noised to t = strength.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size: {batch_size!r} is not allowed; use a whole number, 1 or more")
    if isinstance(requests, (Request, str)) or not isinstance(requests, Sequence):
        what = type(requests).__name__
        raise ValueError(f"requests: a {what} is not allowed; give a list of Request, e.g. [Request('a prompt')]")
    for i, r in enumerate(requests):
        if not isinstance(r, Request):
            what = type(r).__name__
            raise ValueError(f"request {i}: a {what} is not allowed; give a Request, e.g. Request('a prompt')")
        try:
            validate(r, models.geometry)
        except ValueError as e:
            raise ValueError(f"request {i}: {e}") from None
    missing = [name for name in ("text_encoder", "stage_c", "stage_b", "stage_a") if getattr(models, name) is None]
    if missing and requests:
        raise ValueError(
            f"models: {', '.join(missing)} not loaded; generate needs both halves (load with the default parts)"
        )
    if init_images is not None:
        if len(init_images) != len(requests):
            raise ValueError(
                f"init_images: {len(init_images)} images for {len(requests)} requests; give one per request"
            )
        for i, image in enumerate(init_images):
            problem = image_problem(image)
            if problem is not None:
                raise ValueError(f"init_images[{i}]: {problem}")
        validate_strength(strength)
        if requests:
            check_semantic_encoder(models)
    results: list[Result | None] = [None] * len(requests)
    done = 0
    for idx in buckets(requests, batch_size):
        batch = [requests[i] for i in idx]
        images = None if init_images is None else [init_images[i] for i in idx]
        for i, result in zip(idx, run_decoder(models, run_prior(models, batch, images, strength))):
            results[i] = result
        done += len(idx)
        if progress is not None:
            progress(done, len(requests))
    return results  # type: ignore[return-value]
