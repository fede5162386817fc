"""argparse types for the benchmark and measurement scripts, with messages that say what is allowed. Free of torch,
so that scripts measuring the job's driver (its memory, its CPU) do not load it."""

from __future__ import annotations

import argparse


def positive(text: str) -> int:
    """argparse type for counts (batch sizes, repeats, rows): an integer of 1 or more."""
    value = int(text)  # (a ValueError: argparse says "invalid positive value")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed; use 1 or more")
    return value


def rate(text: str) -> float:
    """argparse type for rates and bandwidths: a number above 0."""
    value = float(text)
    if not value > 0:  # (NaN too)
        raise argparse.ArgumentTypeError(f"{value} is not allowed; use a number above 0")
    return value


def official_size(text: str) -> int:
    """argparse type for image sizes of the official architecture (multiples of 32 from 256 to 2048)."""
    from cascade.geometry import OFFICIAL

    value = int(text)
    try:
        OFFICIAL.check_size("size", value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).partition(": ")[2]) from None  # (argparse names the flag)
    return value
