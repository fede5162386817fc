"""A model family's geometry: how image sizes map to latent sizes, and which sizes it supports."""

from __future__ import annotations

import numbers
from dataclasses import dataclass


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
        if not _is_int(value) or not self.min_size <= value <= self.max_size or value % self.size_multiple:
            raise ValueError(
                f"{name}: {value!r} is not supported; use a multiple of {self.size_multiple} "
                f"from {self.min_size} to {self.max_size}"
            )


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


OFFICIAL = Geometry()
