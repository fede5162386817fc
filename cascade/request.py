"""What one image asks for, checked: the request, its validation, its latent sizes and its batch bucket.

Pure Python (no torch), so the pipeline's CPU tasks (reading prompts, writing images) import it without the models.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import WeightsError
from .geometry import OFFICIAL, Geometry, family_file, is_int

MAX_STEPS = 1000
MAX_SEED = 2**63 - 1
SAMPLER_NAMES = ("ddpm", "ddim")  # gdf.SAMPLERS' keys (a test keeps them equal)


@dataclass(frozen=True)
class Request:
    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    width: int = 1024
    height: int = 1024
    prior_steps: int = 20
    prior_cfg: float = 4.0
    decoder_steps: int = 10
    decoder_cfg: float = 1.1
    sampler: str = "ddpm"

    def bucket(self) -> tuple:
        """Requests with equal buckets can share a batch."""
        return (
            self.width,
            self.height,
            self.prior_steps,
            self.prior_cfg,
            self.decoder_steps,
            self.decoder_cfg,
            self.sampler,
        )


def validate(request: Request, geometry: Geometry = OFFICIAL) -> None:
    """Raise ValueError naming the field, the value and what is allowed (sizes: those `geometry` supports)."""
    r = request
    for name in ("prompt", "negative_prompt"):
        if not isinstance(getattr(r, name), str):
            raise ValueError(f"{name}: must be a string, got {type(getattr(r, name)).__name__}")
    for name in ("width", "height"):
        geometry.check_size(name, getattr(r, name))
    for name in ("prior_steps", "decoder_steps"):
        v = getattr(r, name)
        if not is_int(v) or not 1 <= v <= MAX_STEPS:
            raise ValueError(f"{name}: {v!r} is not allowed; use an integer from 1 to {MAX_STEPS}")
    for name in ("prior_cfg", "decoder_cfg"):
        v = getattr(r, name)
        if not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(v) or not 0 <= v <= 100:
            raise ValueError(f"{name}: {v!r} is not allowed; use a finite number from 0 to 100")
    if not is_int(r.seed) or not 0 <= r.seed <= MAX_SEED:
        raise ValueError(f"seed: {r.seed!r} is not allowed; use an integer from 0 to 2**63 - 1")
    if r.sampler not in SAMPLER_NAMES:
        raise ValueError(f"sampler: {r.sampler!r} is not known; allowed are {sorted(SAMPLER_NAMES)}")


SAMPLING = ("prior_steps", "prior_cfg", "decoder_steps", "decoder_cfg")  # what a family may choose its defaults for
REFERENCE_SAMPLING = {key: getattr(Request, key) for key in SAMPLING}  # the reference notebook's: 20, 4.0, 10, 1.1


def family_sampling(model) -> dict[str, int | float]:
    """A family's own sampling defaults, from its family.json's "sampling" (e.g. {"decoder_cfg": 1.5}): what its
    evaluation found best, for the CLI and the job to use where they are not given a value. The rest keep Request's
    defaults (the reference's). {} for the official families and any family that sets none."""
    path, spec = family_file(model)
    sampling = spec.get("sampling", {})
    if not isinstance(sampling, dict) or set(sampling) - set(SAMPLING):
        allowed = f"a mapping of some of {', '.join(SAMPLING)}"
        raise WeightsError(f"{path}: sampling: {sampling!r} is not allowed; use {allowed}")
    try:
        validate(Request("-", **sampling))
    except ValueError as e:
        raise WeightsError(f"{path}: sampling: {e}") from None
    return dict(sampling)


def sampling_defaults(model) -> dict[str, int | float]:
    """The steps and guidance a user of `model` gets unless they choose: the family's own, else the reference's."""
    return {**REFERENCE_SAMPLING, **family_sampling(model)}


def validate_strength(strength: float) -> None:
    """img2img's noise level t_start: in (0, 1]."""
    if not isinstance(strength, numbers.Real) or isinstance(strength, bool) or not 0 < strength <= 1:
        raise ValueError(f"strength: {strength!r} is not allowed; use a number in (0, 1]")


def latent_sizes(
    width: int, height: int, geometry: Geometry = OFFICIAL
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(Stage C latent shape, Stage B latent shape) per image, as the reference's calculate_latent_sizes."""
    fc, fa = geometry.stage_c_compression, geometry.stage_a_compression
    c = (16, math.ceil(height / fc), math.ceil(width / fc))
    b = (4, math.ceil(height / fa), math.ceil(width / fa))
    return c, b


def buckets(requests: Sequence[Request], batch_size: int) -> list[list[int]]:
    """Indices of requests grouped by shape and parameters, in batches of at most batch_size, in input order."""
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault(r.bucket(), []).append(i)
    return [idx[k : k + batch_size] for idx in groups.values() for k in range(0, len(idx), batch_size)]
