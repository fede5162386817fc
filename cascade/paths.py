"""Checks on output paths that the command-line tools share, made before any work."""

from __future__ import annotations

from pathlib import Path


def blocked_by_a_file(out: Path) -> str | None:
    """Why `out` cannot be written because a folder it needs is a file ('--out: ... is a file, not a folder'), or
    None: found before training or sampling, not when the result is saved."""
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is None:
        return None
    return f"--out: {out} cannot be written: {blocking} is a file, not a folder"
