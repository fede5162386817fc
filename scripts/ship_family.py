"""Copy a trained family into a folder to ship (e.g. cascade/assets/demo), its large files in float16.

    .venv/bin/python scripts/ship_family.py runs/run6 cascade/assets/demo

Stage B, Stage C and the text encoder (most of the bytes; the text encoder's 49,408-token embedding alone is 12 MB in
float32) are stored in float16, which halves the package and every clone's history; loading casts them back to the
dtype asked for. float16 rather than the official files' bfloat16: its rounding error is 8 times smaller (at most
about 0.05 % of a tensor's largest value, printed), and these small weights are far inside its range. Stage A, the
semantic encoder and the previewer (3 MB) are copied as they are, float32, as the reference keeps Stage A, and so is
family.json; nothing else (checkpoints, logs). Then judge what ships, and keep its verdict beside it:

    .venv/bin/python -m cascade.train eval --model cascade/assets/demo --out runs/eval-shipped
    cp runs/eval-shipped/eval.json cascade/assets/demo/
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from safetensors import safe_open

from cascade.weights import save_safetensors

HALF = ("stage_b.safetensors", "stage_c.safetensors", "text_encoder/model.safetensors")
AS_IS = (
    "stage_a.safetensors",
    "semantic_encoder.safetensors",
    "previewer.safetensors",
    "text_encoder/config.json",
    "family.json",
)


def to_half(src: Path, dst: Path) -> float:
    """src's tensors in float16 at dst, its metadata kept; returns the largest error relative to a tensor's range."""
    with safe_open(src, "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safe_open is not iterable)
    half = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    worst = max(
        ((half[k].float() - v).abs().max() / v.abs().max().clamp_min(1e-12)).item()
        for k, v in tensors.items()
        if v.is_floating_point()
    )
    save_safetensors(half, dst, metadata=metadata)
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="a trained family folder (python -m cascade.train all --out SRC)")
    parser.add_argument("dst", type=Path, help="the folder to write (its files are replaced)")
    args = parser.parse_args()
    missing = [name for name in (*HALF, *AS_IS) if not (args.src / name).is_file()]
    if missing:  # before anything is written
        raise SystemExit(f"{args.src / missing[0]} not found: is {args.src} a trained family?")
    (args.dst / "text_encoder").mkdir(parents=True, exist_ok=True)
    for name in HALF:
        print(f"{name}: float16, largest relative error {to_half(args.src / name, args.dst / name):.1e}")
    for name in AS_IS:
        shutil.copy(args.src / name, args.dst / name)
        print(f"{name}: copied")


if __name__ == "__main__":
    main()
