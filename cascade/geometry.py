"""A model family's geometry: how image sizes map to latent sizes, and which sizes it supports; and which family
is the default. Pure Python (no torch): the job checks sizes before any model loads."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import WeightsError


@dataclass(frozen=True)
class Geometry:
    """How a model family maps image sizes to latent sizes, and the sizes it supports.

    The official family: Stage C works at a 42.67x compression (1024 px -> 24 latent pixels), Stage A at 4x
    (the reference's calculate_latent_sizes), 256 to 2048 px in multiples of 32. A family trained at other sizes
    (the small demo family) brings its own.
    """

    stage_c_compression: float = 42.67
    stage_a_compression: int = 4
    min_size: int = 256
    max_size: int = 2048
    size_multiple: int = 32
    default_size: int = 1024

    def check_size(self, name: str, value) -> None:
        if not is_int(value) or not self.min_size <= value <= self.max_size or value % self.size_multiple:
            raise ValueError(
                f"{name}: {value!r} is not supported; use an integer multiple of {self.size_multiple} "
                f"from {self.min_size} to {self.max_size}"
            )


def is_int(v) -> bool:
    """An integer, numpy's included (values from Parquet), and not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


OFFICIAL = Geometry()


# A family folder of our own (not an official one) may carry family.json: {"geometry": {...Geometry fields...}}.
FAMILY_FILE = "family.json"
DEMO_FOLDER = Path(__file__).parent / "assets" / "demo"
DEMO_SHIPPED = (DEMO_FOLDER / FAMILY_FILE).is_file()  # the trained demo family, where this version ships it
DEFAULT_MODEL = "demo" if DEMO_SHIPPED else "tiny"


def family_file(model: str | os.PathLike) -> tuple[Path | None, dict]:
    """The family.json of a built-in model or a weights folder, parsed: (its path, its contents); (None, {}) where
    there is none (the official architecture's built-ins, an official layout)."""
    if str(model) in ("tiny", "random-big", "random-lite"):
        return None, {}
    path = (DEMO_FOLDER if str(model) == "demo" else Path(model)) / FAMILY_FILE
    if not path.is_file():
        return None, {}
    try:
        spec = json.loads(path.read_text())
    except ValueError as e:
        raise WeightsError(f"{path}: not a valid family file: {e}") from None
    if not isinstance(spec, dict):
        raise WeightsError(f"{path}: not a valid family file: it must hold a JSON object")
    return path, spec


def family_geometry(model: str | os.PathLike) -> Geometry:
    """The geometry of a built-in model or a weights folder, without loading any weights."""
    path, spec = family_file(model)
    if path is None:
        return OFFICIAL  # the official architecture's geometry
    given, fields = spec.get("geometry", {}), [f.name for f in dataclasses.fields(Geometry)]
    unknown = [k for k in given if k not in fields] if isinstance(given, dict) else []
    if unknown:
        raise WeightsError(
            f"{path}: not a valid family file: geometry: {unknown[0]!r} is not a setting; "
            f"use some of {', '.join(fields)}"
        )
    try:
        geometry = Geometry(**given)
    except (ValueError, TypeError, AttributeError) as e:
        raise WeightsError(f"{path}: not a valid family file: {e}") from None
    # Each value's type and range, then how they fit together: a bad one would otherwise surface later as a
    # TypeError, a division by zero after the models load, or as a refusal of a --width the user never gave.
    for name in fields:
        value = getattr(geometry, name)
        number = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        if not (number and value > 0 and (name == "stage_c_compression" or is_int(value))):
            kind = "a number above 0" if name == "stage_c_compression" else "an integer above 0"
            raise WeightsError(f"{path}: not a valid family file: geometry: {name}: {value!r}; use {kind}")
    if not geometry.min_size <= geometry.default_size <= geometry.max_size:
        raise WeightsError(f"{path}: geometry {geometry} is inconsistent (default size outside min..max)")
    try:
        geometry.check_size("default_size", geometry.default_size)
    except ValueError as e:
        raise WeightsError(f"{path}: not a valid family file: geometry: {e}") from None
    return geometry
