"""Loading and saving stage weights: Stability's single files and diffusers' model folders, safetensors only.

`load_stage(path)` detects what the file or folder holds (Stage A/B/C, the EfficientNet encoder, the previewer), picks
its configuration (explicit `config=`, our own metadata, or the official preset whose shapes match), checks every key
and shape before reading any data, then reads tensor by tensor straight into the requested dtype and device on a
model built on the `meta` device, so no full float32 copy is ever made in host memory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .convert import (
    assemble,
    diffusers_key_plan,
    to_diffusers_state_dict,
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    unet_kind_from_diffusers_config,
)
from .effnet import EFFNET_ENCODER, EfficientNetEncoder, EfficientNetEncoderConfig
from .errors import WeightsError
from .previewer import PREVIEWER, Previewer, PreviewerConfig
from .semantic import SemanticEncoder, SemanticEncoderConfig
from .stage_a import STAGE_A, StageA, StageAConfig, stage_a_diffusers_config, stage_a_from_diffusers_config
from .stage_b import STAGE_B_3B, STAGE_B_700M, StageB, StageBConfig
from .stage_c import STAGE_C_1B, STAGE_C_3B, StageC, StageCConfig


@dataclass(frozen=True)
class StageKind:
    name: str
    model: type[nn.Module]
    config: type
    presets: dict[str, Any]  # preset name -> config, for official files that carry no configuration
    signature: tuple[str, ...]  # keys only this kind's Stability files hold


KINDS = {
    k.name: k
    for k in (
        StageKind(
            "stage_c", StageC, StageCConfig, {"big": STAGE_C_3B, "lite": STAGE_C_1B}, ("clip_txt_mapper.weight",)
        ),
        StageKind(
            "stage_b", StageB, StageBConfig, {"big": STAGE_B_3B, "lite": STAGE_B_700M}, ("effnet_mapper.0.weight",)
        ),
        StageKind(
            "stage_a", StageA, StageAConfig, {"big": STAGE_A}, ("vquantizer.codebook.weight", "in_block.1.weight")
        ),
        # The official effnet_encoder.safetensors carries no kind in its metadata; its signature is a key of the
        # EfficientNetV2 blocks, which a semantic encoder (same backbone/mapper names) never has, and it is matched
        # before the semantic kind, whose keys it also holds.
        StageKind(
            "effnet",
            EfficientNetEncoder,
            EfficientNetEncoderConfig,
            {"big": EFFNET_ENCODER},
            ("backbone.1.0.block.0.0.weight", "mapper.0.weight"),
        ),
        # A family of our own trains its semantic encoder (no official file; always saved with its configuration).
        StageKind("semantic", SemanticEncoder, SemanticEncoderConfig, {}, ("backbone.0.0.weight", "mapper.0.weight")),
        StageKind("previewer", Previewer, PreviewerConfig, {"big": PREVIEWER}, ("blocks.0.weight",)),
    )
}
_METADATA_KIND, _METADATA_CONFIG = "cascade.kind", "cascade.config"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


# ---------------------------------------------------------------------------------------------------------------------
# safetensors headers: read and checked before any tensor data
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str
    shape: tuple[int, ...]


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensors (name -> dtype, shape) and the metadata of a safetensors file, checked against its size."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: {'is a folder, not a file' if path.is_dir() else 'file not found'}")
    if path.suffix in _PICKLE_SUFFIXES:
        raise WeightsError(f"{path}: only .safetensors files are read (pickle checkpoints can run code); convert it")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 * 2**20):
            raise WeightsError(f"{path}: not a safetensors file, or truncated (header length {n}, file size {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WeightsError(f"{path}: not a safetensors file (unreadable header: {e})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    tensors, end = {}, 0
    for name, info in header.items():
        try:
            tensors[name] = TensorInfo(path, info["dtype"], tuple(info["shape"]))
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError):
            raise WeightsError(f"{path}: not a safetensors file (bad header entry for {name!r})") from None
    if size < 8 + n + end:
        raise WeightsError(f"{path}: truncated: the header needs {8 + n + end} bytes, the file has {size}")
    return tensors, metadata


# ---------------------------------------------------------------------------------------------------------------------
# What a path holds
# ---------------------------------------------------------------------------------------------------------------------


def detect_kind(path: Path, keys) -> StageKind:
    keys = set(keys)
    for kind in KINDS.values():
        if all(k in keys for k in kind.signature):
            return kind
    sample = ", ".join(sorted(keys)[:5])
    raise WeightsError(f"{path}: not a Stable Cascade stage: its keys ({sample}, ...) match none of {sorted(KINDS)}")


def _config_from_dict(cls, data: dict):
    def tuples(v):
        return tuple(tuples(x) for x in v) if isinstance(v, list) else v

    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise WeightsError(f"configuration has unknown fields {sorted(unknown)} for {cls.__name__}")
    return cls(**{k: tuples(v) for k, v in data.items()})


def _preset_for(path: Path, kind: StageKind, tensors: dict[str, TensorInfo]):
    """The official preset whose parameter shapes the file's match (this is how big and lite are told apart).

    A file that matches one preset nearly everywhere gets that preset, so the strict check that follows can name the
    exact keys that are missing or wrong instead of a vague "no configuration matches".
    """
    if not kind.presets:
        raise WeightsError(f"{path}: a {kind.name} file without its configuration in the metadata; pass config=")
    shapes = {k: t.shape for k, t in tensors.items()}
    scored = []
    for config in kind.presets.values():
        expected = _expected_shapes(kind, config)
        matching = sum(shapes.get(k) == s for k, s in expected.items())
        scored.append((matching / max(len(expected), len(shapes)), config))
    score, config = max(scored, key=lambda item: item[0])
    if score >= 0.9:
        return config
    raise WeightsError(
        f"{path}: a {kind.name} checkpoint whose shapes match no official configuration "
        f"({', '.join(kind.presets)}); pass config= to load_stage"
    )


def _expected_shapes(kind: StageKind, config) -> dict[str, tuple[int, ...]]:
    return _shapes_of(kind.name, config)


@lru_cache(maxsize=16)
def _shapes_of(kind_name: str, config) -> dict[str, tuple[int, ...]]:
    # Building a full-size model on the meta device takes about a second; detection asks for each preset.
    with torch.device("meta"):
        model = KINDS[kind_name].model(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _diffusers_folder(path: Path, variant: str | None, prefer: str | None) -> tuple[StageKind, Any, list[Path]]:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise WeightsError(f"{path}: a diffusers model folder needs config.json, which is missing")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{cfg_path}: not valid JSON ({e})") from None
    class_name = cfg.get("_class_name")
    try:
        if class_name == "StableCascadeUNet":
            kind = KINDS[unet_kind_from_diffusers_config(cfg)]
            config = unet_config_from_diffusers(cfg)
        elif class_name == "PaellaVQModel":
            kind, config = KINDS["stage_a"], stage_a_from_diffusers_config(cfg)
        elif class_name == "StableCascadeUnet":
            # The repos' first upload (February 2024, for a pre-release diffusers) named the class so and its fields
            # as the reference does; released diffusers cannot read it either.
            raise WeightsError(
                f"{cfg_path}: a pre-release diffusers configuration ({cfg.get('_diffusers_version', 'unknown')}, "
                "class StableCascadeUnet); download the repository's current revision, or use Stability's single files"
            )
        else:
            raise WeightsError(
                f"{cfg_path}: _class_name {class_name!r} is not a Stable Cascade stage "
                "(expected StableCascadeUNet or PaellaVQModel)"
            )
    except (KeyError, TypeError) as e:
        raise WeightsError(f"{cfg_path}: incomplete {class_name} configuration (missing {e})") from None
    return kind, config, _weight_files(path, variant, prefer)


def _weight_files(folder: Path, variant: str | None, prefer: str | None = None) -> list[Path]:
    """The safetensors file(s) of a diffusers model folder: one file, or the shards an index names.

    Variant names as diffusers writes them: `diffusion_pytorch_model.bf16.safetensors`, and for shards the index
    `diffusion_pytorch_model.safetensors.index.bf16.json` (transformers' `model.*` names follow the same rule).
    """
    variants = [variant] if variant else list(dict.fromkeys([prefer, None, "bf16", "fp16"]))
    for v in variants:
        for stem in ("diffusion_pytorch_model", "model"):
            single = f"{stem}.{v}.safetensors" if v else f"{stem}.safetensors"
            indexes = [f"{stem}.safetensors.index.{v}.json", f"{single}.index.json"] if v else [f"{single}.index.json"]
            if (folder / single).is_file():
                return [folder / single]
            for index in indexes:
                if (folder / index).is_file():
                    return _shards(folder, folder / index)
    pickles = [p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES]
    if pickles:
        raise WeightsError(
            f"{folder}: only safetensors weights are read (pickle checkpoints can run code); found {pickles}"
        )
    wanted = f"variant {variant!r} of " if variant else ""
    raise WeightsError(f"{folder}: no {wanted}diffusion_pytorch_model.safetensors (or sharded index) in this folder")


def _shards(folder: Path, index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise WeightsError(f"{index}: not a valid shard index ({e})") from None
    shards = [folder / name for name in dict.fromkeys(weight_map.values())]
    missing = [p.name for p in shards if not p.is_file()]
    if missing:
        raise WeightsError(f"{index}: names shards that are missing: {', '.join(missing)}")
    return shards


# ---------------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageSource:
    """What a weights path holds, read from headers and config files only (no tensor data)."""

    path: Path
    kind: StageKind
    config: Any
    layout: str  # "stability" (single file) or "diffusers" (model folder)
    tensors: dict[str, TensorInfo]


def inspect_stage(
    path: str | os.PathLike,
    *,
    config: Any = None,
    variant: str | None = None,
    expect: str | None = None,
    dtype: torch.dtype | None = None,
) -> StageSource:
    """Identify the stage and configuration of a single file or diffusers folder without reading tensor data.

    In a diffusers folder holding several variants, the one matching `dtype` is read unless `variant` names one.
    """
    path = Path(path)
    if path.is_dir():
        prefer = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype)
        kind, folder_config, files = _diffusers_folder(path, variant, prefer)
        config = config or folder_config
        layout = "diffusers"
    elif path.exists():
        files, layout = [path], "stability"
    else:
        raise WeightsError(f"{path}: no such file or folder")

    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    for file in files:
        t, m = read_header(file)
        tensors.update(t)
        metadata = metadata or m
    if layout == "stability":
        kind = KINDS.get(metadata.get(_METADATA_KIND, "")) or detect_kind(path, tensors)
        if config is None and _METADATA_CONFIG in metadata:
            config = _config_from_dict(kind.config, json.loads(metadata[_METADATA_CONFIG]))
        config = config or _preset_for(path, kind, tensors)
    expected_kinds = (expect,) if isinstance(expect, str) else expect
    if expected_kinds is not None and kind.name not in expected_kinds:
        raise WeightsError(f"{path}: holds {kind.name} weights, but {' or '.join(expected_kinds)} was expected here")
    if not isinstance(config, kind.config):
        raise WeightsError(f"{path}: config must be a {kind.config.__name__}, got {type(config).__name__}")
    return StageSource(path, kind, config, layout, tensors)


def load_stage(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    config: Any = None,
    variant: str | None = None,
    expect: str | None = None,
) -> nn.Module:
    """Load one stage from a Stability single file or a diffusers model folder, in eval mode.

    dtype/device: where the weights end up (each tensor is converted on its own, no float32 copy of the model).
    config: the stage's configuration when the file carries none and matches no official preset.
    variant: a diffusers weight variant ("bf16", "fp16"); by default the one matching dtype, else the plain one.
    expect: the kind the caller needs ("stage_c", "stage_b", "stage_a", "effnet", "semantic", "previewer"), or a
    tuple of kinds that will do, checked.
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise WeightsError(f"{path}: device {device} requested but CUDA is not available")
    source = inspect_stage(path, config=config, variant=variant, expect=expect, dtype=dtype)
    with torch.device("meta"):
        model = source.kind.model(source.config)
    expected = _expected_shapes(source.kind, source.config)
    tensors = source.tensors
    plan = diffusers_key_plan(source.kind.name, tensors) if source.layout == "diffusers" else {k: (k,) for k in tensors}
    _check_keys(source.path, source.kind, plan, tensors, expected)

    state = _read_tensors(plan, tensors, dtype, device)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def _check_keys(path, kind, plan, tensors, expected) -> None:
    missing = sorted(set(expected) - set(plan))
    unexpected = sorted(set(plan) - set(expected))
    if missing or unexpected:
        parts = [
            f"{len(keys)} {what} keys ({', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''})"
            for what, keys in (("missing", missing), ("unexpected", unexpected))
            if keys
        ]
        raise WeightsError(f"{path}: does not match the {kind.name} configuration: {'; '.join(parts)}")
    for key, sources in plan.items():
        shapes = [tensors[s].shape for s in sources]
        shape = shapes[0] if len(shapes) == 1 else (sum(s[0] for s in shapes), *shapes[0][1:])
        if shape != expected[key]:
            raise WeightsError(
                f"{path}: {key} has shape {list(shape)} but the {kind.name} configuration needs {list(expected[key])}"
            )


def _read_tensors(plan, tensors, dtype, device) -> dict[str, torch.Tensor]:
    state = {}
    for key, sources in plan.items():
        # One safe_open per tensor: get_tensor returns a view into a mapping of the whole file, and every page read
        # through it stays mapped (counted in RSS, up to 1x the file) until the file is closed. Opening per tensor
        # releases each tensor's pages, so peak RSS stays ~1x the model (docs/MODEL.md has the measurements).
        parts = []
        for name in sources:
            with safe_open(str(tensors[name].file), framework="pt", device="cpu") as f:
                parts.append(f.get_tensor(name))
        t = assemble(parts)
        # Floating tensors take the requested dtype; integer buffers (BatchNorm counters) keep theirs.
        state[key] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype, copy=True)
        del parts, t
    return state


# ---------------------------------------------------------------------------------------------------------------------
# Saving (used by the tiny model, the tests and training)
# ---------------------------------------------------------------------------------------------------------------------


def kind_of(model: nn.Module) -> StageKind:
    for kind in KINDS.values():
        if isinstance(model, kind.model):
            return kind
    raise TypeError(f"{type(model).__name__} is not a Stable Cascade stage")


def _umask() -> int:
    """The process's umask, read where Linux shows it rather than set and reset (which is not thread-safe)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def readable(path: str | os.PathLike) -> None:
    """Give a file the mode a plain open() would have (0o666 less the umask). safetensors 0.8 writes through a
    temporary file made 0o600 and renames it into place (safetensors issue #782), so weights, LoRAs and checkpoints
    came out readable by their owner only: not by the other users of shared storage, or a container's user."""
    os.chmod(path, 0o666 & ~_umask())


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """safetensors' save_file, with the file readable as any other the project writes (`readable`)."""
    save_file(tensors, str(path), metadata=metadata)
    readable(path)


def save_stage(model: nn.Module, path: str | os.PathLike, layout: str = "stability") -> Path:
    """Write a stage as a Stability single file (with its configuration in the metadata) or a diffusers folder."""
    kind, path = kind_of(model), Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if layout == "stability":
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {_METADATA_KIND: kind.name, _METADATA_CONFIG: json.dumps(dataclasses.asdict(model.config))}
        save_safetensors(state, path, metadata=metadata)
        return path
    if layout != "diffusers":
        raise ValueError(f"layout: {layout!r} is not known; allowed are 'stability', 'diffusers'")
    if kind.name in ("stage_b", "stage_c"):
        cfg = {"_class_name": "StableCascadeUNet", **unet_config_to_diffusers(model.config)}
    elif kind.name == "stage_a":
        cfg = {"_class_name": "PaellaVQModel", **stage_a_diffusers_config(model.config)}
    else:
        raise ValueError(f"{kind.name} has no diffusers layout; save it with layout='stability'")
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    save_safetensors(to_diffusers_state_dict(kind.name, state), path / "diffusion_pytorch_model.safetensors")
    return path
