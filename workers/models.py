"""Which models a job uses, loaded where the actor runs, and a digest that identifies their weights in manifests."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from cascade.family import BUILTIN_MODELS, load_models, locate_stage, locate_text_encoder
from cascade.geometry import DEMO_FOLDER

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def device() -> torch.device:
    """The GPU Ray assigned to this actor (it sets CUDA_VISIBLE_DEVICES), else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def torch_dtype(dtype: str, on: torch.device) -> torch.dtype:
    """auto: bf16 on a GPU (the reference's precision), fp32 on a CPU (bf16 matmuls are slow there)."""
    if dtype == "auto":
        return torch.bfloat16 if on.type == "cuda" else torch.float32
    return DTYPES[dtype]


def load_part(model: str, lite: bool, dtype: str, part: str):
    """The prior ("prior") or decoder ("decoder") half of a built-in model or an official-layout weights folder."""
    on = device()
    if part == "prior":  # (the decoder half loads no transformers) the job logs its own progress, in images: a
        # loading bar from every Stage C actor in the driver's log is noise
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    if model in BUILTIN_MODELS:
        return BUILTIN_MODELS[model](device=on, dtype=torch_dtype(dtype, on), parts=(part,))
    return load_models(model, lite=lite, dtype=torch_dtype(dtype, on), device=on, parts=(part,))


def pool_dtype(dtype: str, gpus: float) -> str:
    """The dtype a pool's actors load with `gpus` GPUs each: `auto` as torch_dtype resolves it on the device Ray gives
    them (a GPU when gpus > 0), so the driver can name the files they read."""
    if dtype == "auto":
        return "bf16" if gpus > 0 else "fp32"
    return dtype


def weight_files(model: str, lite: bool, dtype: str, decoder_dtype: str | None = None) -> list[Path]:
    """The files a weights folder's load reads: dtype decides between the fp32 and bf16 files (auto: as on a GPU),
    for Stage C, and for Stage B and A as well unless decoder_dtype is given (the pools may differ)."""
    folder = Path(model)
    files: list[Path] = []
    for stage in ("stage_c", "stage_b", "stage_a"):
        chosen = dtype if stage == "stage_c" or decoder_dtype is None else decoder_dtype
        found = locate_stage(folder, stage, lite, torch_dtype(chosen, torch.device("cuda")))
        files += [found] if found.is_file() else sorted(found.glob("*"))
    files += sorted(locate_text_encoder(folder).glob("*"))
    return [f for f in files if f.is_file()]


def model_digest(
    model: str, lite: bool, dtype: str, progress=None, lora: str = "", decoder_dtype: str | None = None
) -> str:
    """sha256 over the weights' files (the shipped demo's too; `weight_files`), in a fixed order, and the LoRA file's
    when there is one; 16 hex digits. A seeded built-in model (tiny, random-*) is identified by its name."""
    h = hashlib.sha256()
    if lora:
        h.update(b"lora")
        h.update(file_sha256(Path(lora), progress).encode())
    if model == "demo":
        model = str(DEMO_FOLDER)  # the shipped demo: its files, like any weights folder
    if model in BUILTIN_MODELS:
        # tiny, random-*: drawn from a fixed seed by this code, so the name is the identity. Building them to hash
        # their tensors would cost the driver seconds of imports (transformers) before every job.
        h.update(model.encode())
    else:
        for path in weight_files(model, lite, dtype, decoder_dtype):
            h.update(path.name.encode())
            h.update(file_sha256(path, progress).encode())
    return h.hexdigest()[:16]


def _cache_path() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cascade-batch" / "sha256.json"


def file_sha256(path: Path, progress=None) -> str:
    """A file's sha256, cached by (path, size, mtime): the official weights are GBs, hashed once per machine."""
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    cache_file = _cache_path()
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    if progress is not None:
        progress(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    cache[key] = h.hexdigest()
    try:  # a read-only home only costs the next job another hash
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_file)
    except OSError:
        pass
    return cache[key]
