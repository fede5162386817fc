"""A whole model family: text encoder + Stage C + Stage B + Stage A (+ the optional EfficientNet and previewer).

`load_models(folder)` reads one local folder laid out as the official Hugging Face repos, merged:
stabilityai/stable-cascade (single files `stage_{a,b,c}[_lite][_bf16].safetensors`, `effnet_encoder.safetensors`,
`previewer.safetensors`, and diffusers folders `decoder[_lite]/`, `vqgan/`, `text_encoder/`, `tokenizer/`) and
stabilityai/stable-cascade-prior (`prior[_lite]/`, `text_encoder/`, `tokenizer/`). Either layout works for each stage.

Built-in families:
- `demo` (`demo_models()`): every stage trained from scratch by `python -m cascade.train` on generated captioned
  shapes at 64 px, read from `cascade/assets/demo/` with its recipe. Registered, and the default model, only where
  that folder ships (docs/TRAINING.md says where its training stands).
- `tiny` (`tiny_models()`): every stage in a small configuration with deterministic random weights, and the real
  CLIP tokenizer. It makes noise, not pictures; it exists for tests, at the official architecture's geometry.
- `random-big`, `random-lite` (`random_models()`): the official architectures at full size, randomly initialised on
  the device: for benchmarks without the official weights.
"""

from __future__ import annotations

import functools
import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from torch import nn

from .effnet import EFFNET_ENCODER, EfficientNetEncoder
from .geometry import DEMO_FOLDER, DEMO_SHIPPED, FAMILY_FILE, OFFICIAL, Geometry, family_geometry
from .request import Request, family_sampling
from .stage_a import STAGE_A, STAGE_A_TINY, StageA
from .stage_b import STAGE_B_3B, STAGE_B_700M, STAGE_B_TINY, StageB
from .stage_c import STAGE_C_1B, STAGE_C_3B, STAGE_C_TINY, StageC
from .weights import WeightsError, load_stage

if TYPE_CHECKING:
    from .text import TextEncoder

# The two halves a process can hold: the prior (text encoder + Stage C) and the decoder (Stage B + Stage A).
PARTS = ("prior", "decoder")


@dataclass
class CascadeModels:
    """A loaded family. A process that holds one half (a GPU pool's actor) has None for the other half's stages."""

    text_encoder: TextEncoder | None
    stage_c: StageC | None
    stage_b: StageB | None
    stage_a: StageA | None
    name: str = "custom"
    effnet: nn.Module | None = None
    previewer: nn.Module | None = None
    geometry: Geometry = OFFICIAL
    # The family's own sampling defaults (its family.json's "sampling", e.g. {"prior_cfg": 2.0}); {} where it keeps
    # the reference's, as the official families do.
    sampling: dict = field(default_factory=dict)
    # The sha256 of each LoRA file merged into these models (cascade.lora.apply_lora_file), in order.
    loras: list = field(default_factory=list)

    def request(self, prompt: str, **settings) -> Request:
        """A Request for this family with its own defaults, as the CLI and the job give them: its default size and
        its sampling defaults, the reference's for the rest; `settings` (seed, width, prior_cfg, ...) override them.
        (Request(...) alone takes the reference's: 1024 px, 20 / 4 / 10 / 1.1.)"""
        size = self.geometry.default_size
        return Request(prompt, **{"width": size, "height": size, **self.sampling, **settings})

    @property
    def device(self) -> torch.device:
        model = self.stage_c if self.stage_c is not None else self.stage_b
        return next(model.parameters()).device

    @property
    def clip_img_dim(self) -> int:
        return self.stage_c.config.c_clip_img


# Where each stage lives in the official repos, in order of preference ({lite} is "" or "_lite").
_SINGLE_FILES = {
    "stage_c": ("stage_c{lite}_bf16.safetensors", "stage_c{lite}.safetensors"),
    "stage_b": ("stage_b{lite}_bf16.safetensors", "stage_b{lite}.safetensors"),
    "stage_a": ("stage_a.safetensors",),
    "effnet": ("effnet_encoder.safetensors", "semantic_encoder.safetensors"),  # the latter: families trained here
    "previewer": ("previewer.safetensors",),
}
_DIFFUSERS_FOLDERS = {"stage_c": ("prior{lite}",), "stage_b": ("decoder{lite}",), "stage_a": ("vqgan",)}


def find_stage(folder: Path, stage: str, lite: bool, dtype: torch.dtype) -> Path | None:
    """The file or folder holding `stage` in an official-layout `folder`; the dtype decides fp32 vs bf16 first."""
    suffix = "_lite" if lite else ""
    singles = [folder / n.format(lite=suffix) for n in _SINGLE_FILES[stage]]
    if dtype == torch.float32:
        singles.reverse()  # read the fp32 file when full precision is asked for
    folders = [folder / n.format(lite=suffix) for n in _DIFFUSERS_FOLDERS.get(stage, ())]
    for candidate in singles + folders:
        if candidate.is_file() or (candidate / "config.json").is_file():
            return candidate
    return None


def locate_stage(folder: Path, stage: str, lite: bool, dtype: torch.dtype) -> Path:
    """find_stage, or a WeightsError naming every file or folder that would have done."""
    found = find_stage(folder, stage, lite, dtype)
    if found is None:
        names = [n.format(lite="_lite" if lite else "") for n in _SINGLE_FILES[stage]]
        names += [n.format(lite="_lite" if lite else "") + "/" for n in _DIFFUSERS_FOLDERS.get(stage, ())]
        sized = "{lite}" in _SINGLE_FILES[stage][0]  # (else one size only)
        variant = ("lite " if lite else "big ") if sized else ""
        hint = ""
        if sized and find_stage(folder, stage, not lite, dtype) is not None:
            hint = f"; the folder has the {'big' if lite else 'lite'} one: " + (
                "leave out --lite (lite: false)" if lite else "add --lite (lite: true in the job's settings)"
            )
        raise WeightsError(f"{folder}: no {variant}{stage} weights: expected one of {', '.join(names)}{hint}")
    return found


def locate_text_encoder(folder: Path) -> Path:
    text_dir = folder / "text_encoder"
    if not (text_dir / "config.json").is_file():
        raise WeightsError(f"{folder}: no text encoder: expected text_encoder/ with config.json and model.safetensors")
    return text_dir


def check_folder(folder: str | os.PathLike) -> Path:
    """The weights folder as a Path, or WeightsError where it is not one (missing, or a file)."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "is a file, not a weights folder" if folder.exists() else "weights folder not found"
        raise WeightsError(f"{folder}: {what}")
    return folder


def device_problem(device, meta: bool = False) -> str | None:
    """What is wrong with a device to run a family on, after its argument's name (the library's `device: `, the CLI's
    `--device: `), or None where it can be used here. meta: the meta device will do (the library builds families
    there to count their parameters and FLOPs)."""
    try:
        on = torch.device(device)
    except (RuntimeError, TypeError):
        return f"{device!r} is not a device; use e.g. cpu, cuda, cuda:1"
    available = {"cpu": lambda: True, "cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}
    if meta:
        available["meta"] = lambda: True
    if on.type not in available:
        return f"{device!r}: {on.type} devices are not supported; use cpu or cuda"
    if not available[on.type]():
        return f"{device} is not available here (no {on.type.upper()} device); use cpu"
    if on.type == "cuda" and on.index is not None and on.index >= torch.cuda.device_count():
        return f"{device} is not available here ({torch.cuda.device_count()} CUDA device(s)); use cuda:0 to cuda:N-1"
    return None


def check_placement(device, dtype) -> None:
    """A family loader's device and dtype, checked before anything loads: ValueError naming the argument, the value
    and what is allowed (a mistyped device is the caller's, not a fault of the weights)."""
    problem = device_problem(device, meta=True)
    if problem is not None:
        raise ValueError(f"device: {problem}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype: {dtype!r} is not allowed; use a torch floating dtype, e.g. torch.bfloat16")


def load_models(
    folder: str | os.PathLike,
    *,
    lite: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    with_effnet: bool = False,
    with_previewer: bool = False,
    parts: tuple[str, ...] = PARTS,
) -> CascadeModels:
    """Load a model family from one local folder laid out as the official repos (see the module docstring).

    Stage A (20 M parameters) stays float32, as in the reference (which decodes under bfloat16 autocast, as
    cascade.pipeline.decode_latents does on a GPU); the rest take `dtype`. `parts` limits the load to
    the prior ("prior": text encoder + Stage C) or the decoder ("decoder": Stage B + A).
    """
    _check_parts(parts)
    check_placement(device, dtype)
    folder = check_folder(folder)
    variant = "lite" if lite else "big"
    prior, decoder = "prior" in parts, "decoder" in parts
    # Every file found before any loads (gigabytes for the official family): a folder without Stage B, or without
    # the EfficientNet encoder img2img needs, is named at once, not after the text encoder and Stage C have loaded.
    text_dir = locate_text_encoder(folder) if prior else None
    wanted = ["stage_c"] * prior + ["stage_b", "stage_a"] * decoder + ["effnet"] * with_effnet
    paths = {stage: locate_stage(folder, stage, lite, dtype) for stage in wanted + ["previewer"] * with_previewer}
    text_encoder = None
    if text_dir is not None:
        tokenizer_dir = folder / "tokenizer" if (folder / "tokenizer").is_dir() else None  # else the bundled one
        text_encoder = _load_text(text_dir, tokenizer_dir, dtype, device)
    models = CascadeModels(
        text_encoder=text_encoder,
        stage_c=load_stage(paths["stage_c"], dtype=dtype, device=device, expect="stage_c") if prior else None,
        stage_b=load_stage(paths["stage_b"], dtype=dtype, device=device, expect="stage_b") if decoder else None,
        stage_a=load_stage(paths["stage_a"], dtype=torch.float32, device=device, expect="stage_a") if decoder else None,
        name=f"{folder.name}:{variant}",
        geometry=family_geometry(folder),
        sampling=family_sampling(folder),
    )
    _check_widths(folder, models)
    if with_effnet:
        models.effnet = load_stage(paths["effnet"], dtype=torch.float32, device=device, expect=("effnet", "semantic"))
    if with_previewer:
        models.previewer = load_stage(paths["previewer"], dtype=torch.float32, device=device, expect="previewer")
    return models


def _check_widths(folder: Path, models: CascadeModels) -> None:
    """The text encoder's widths are the ones Stage C (and Stage B, for the pooled embedding) were built for: files
    from two different families in one folder otherwise load, and the first request fails inside a matmul."""
    if models.text_encoder is None:
        return
    config = models.text_encoder.model.config
    hidden, pooled = config.hidden_size, config.projection_dim
    wanted = []
    if models.stage_c is not None:
        wanted += [("Stage C's text", models.stage_c.config.c_clip_text, "hidden", hidden)]
        wanted += [("Stage C's pooled text", models.stage_c.config.c_clip_text_pooled, "pooled", pooled)]
    if models.stage_b is not None:
        wanted += [("Stage B's pooled text", models.stage_b.config.c_clip, "pooled", pooled)]
    for what, width, kind, have in wanted:
        if width != have:
            raise WeightsError(
                f"{folder}: the text encoder's {kind} embeddings are {have} wide, but {what} input takes {width}: "
                "its files come from another model family"
            )


def _text():
    """cascade.text, imported when a text encoder is built or loaded: it brings in transformers (seconds of start-up),
    which a process holding only the decoder half never needs."""
    from . import text

    return text


def _load_text(text_dir: Path, tokenizer_dir: Path | None, dtype: torch.dtype, device) -> TextEncoder:
    """CLIP-G from `text_encoder/`, reading the weight variant that matches dtype when the folder has several."""

    def exists(variant: str | None) -> bool:
        tag = f".{variant}" if variant else ""
        return (text_dir / f"model{tag}.safetensors").is_file() or (
            text_dir / f"model.safetensors.index{tag}.json"
        ).is_file()

    prefer = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype)
    variant = next((v for v in dict.fromkeys([prefer, None, "bf16", "fp16"]) if exists(v)), None)
    # The tokenizer first, on its own: a broken one is named as such (not as the text encoder), before GBs load.
    tokenizer = None
    if tokenizer_dir is not None:
        try:
            tokenizer = _text().CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        except (OSError, ValueError) as e:  # a bad tokenizer_config.json is a JSONDecodeError, a ValueError
            raise WeightsError(f"{tokenizer_dir}: the tokenizer could not be loaded: {e}") from e
    try:
        encoder = _text().load_text_encoder(text_dir, None, dtype=dtype, device=device, variant=variant)
    except torch.cuda.OutOfMemoryError:
        raise  # the device's, not the folder's (a RuntimeError too)
    except (OSError, ValueError, SafetensorError, RuntimeError) as e:
        # FileNotFoundError included; transformers raises OSError for bad folders, RuntimeError for a config.json
        # whose sizes are not the file's; a cut-off file is a SafetensorError
        raise WeightsError(f"{text_dir}: the text encoder could not be loaded: {e}") from e
    if tokenizer is not None:
        encoder.tokenizer = tokenizer
    return encoder


def liven(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Give the reference's zero-initialised weights (output conv, modulation, GRN, Stage A gammas) small random
    values, so every path of the tiny model carries signal and the conditioning changes the output (and the
    profile's float8 error is measured on a random full-size model's output, not on its zeros)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and not p.any():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return model


def _check_parts(parts: tuple[str, ...]) -> None:
    if not parts or set(parts) - set(PARTS):
        raise ValueError(f"parts: {parts!r} is not allowed; use a non-empty subset of {PARTS}")


def tiny_models(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    with_effnet: bool = False,
    parts: tuple[str, ...] = PARTS,
) -> CascadeModels:
    """The built-in `tiny` family: small configs, deterministic random weights, the real CLIP tokenizer.

    with_effnet adds a randomly initialised full-size EfficientNet encoder (20 M parameters) for img2img. `parts`
    keeps only the prior or the decoder half; every stage is still built in the same order, so its weights do not
    depend on which half a process holds.
    """
    _check_parts(parts)
    check_placement(device, dtype)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        stage_c = liven(StageC(STAGE_C_TINY), generator)
        stage_b = liven(StageB(STAGE_B_TINY), generator)
        stage_a = liven(StageA(STAGE_A_TINY), generator)
        effnet = EfficientNetEncoder(EFFNET_ENCODER) if with_effnet else None
    models = CascadeModels(
        text_encoder=_text().build_text_encoder(_text().TINY_TEXT_CONFIG, seed=seed) if "prior" in parts else None,
        stage_c=stage_c,
        stage_b=stage_b,
        stage_a=stage_a,
        name="tiny",
        effnet=effnet,
    )
    if "prior" not in parts:
        models.text_encoder = models.stage_c = None
    if "decoder" not in parts:
        models.stage_b = models.stage_a = None
    return _settle(models, device, dtype)


def _settle(models: CascadeModels, device, dtype: torch.dtype) -> CascadeModels:
    """A freshly built family onto `device` for inference: the text encoder and Stages C and B in `dtype`, Stage A
    and the EfficientNet in float32 (as the reference); eval mode, no gradients."""
    for m in (models.text_encoder, models.stage_c, models.stage_b):
        if m is not None:
            m.to(device=device, dtype=dtype).eval().requires_grad_(False)
    for m in (models.stage_a, models.effnet):
        if m is not None:
            m.to(device=device).eval().requires_grad_(False)
    return models


def demo_models(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    with_effnet: bool = False,
    parts: tuple[str, ...] = PARTS,
) -> CascadeModels:
    """The built-in `demo` family: the trained weights shipped in cascade/assets/demo/ (`seed` is unused: the
    weights are trained, not drawn)."""
    if not (DEMO_FOLDER / FAMILY_FILE).is_file():
        raise WeightsError(f"{DEMO_FOLDER}: the demo model's weights are missing from this install; reinstall")
    models = load_models(DEMO_FOLDER, dtype=dtype, device=device, with_effnet=with_effnet, parts=parts)
    models.name = "demo"
    return models


def random_models(
    preset: str = "big",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    with_effnet: bool = False,
    parts: tuple[str, ...] = PARTS,
) -> CascadeModels:
    """The official architectures at full size with the reference's random initialisation, built on `device`:
    "big" (CLIP-G, Stage C 3.6 B, Stage B 1.5 B, Stage A) or "lite" (Stage C 1 B, Stage B 0.7 B). For benchmarks on
    machines without the official weights: the values do not change the work. Built in float32, then cast."""
    _check_parts(parts)
    check_placement(device, dtype)
    c_config, b_config = {"big": (STAGE_C_3B, STAGE_B_3B), "lite": (STAGE_C_1B, STAGE_B_700M)}[preset]
    prior, decoder = "prior" in parts, "decoder" in parts
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        text = _text().build_text_encoder(_text().BIGG_TEXT_CONFIG) if prior else None
        stage_c = StageC(c_config) if prior else None
        stage_b = StageB(b_config) if decoder else None
        stage_a = StageA(STAGE_A) if decoder else None
        effnet = EfficientNetEncoder(EFFNET_ENCODER) if with_effnet else None
    models = CascadeModels(text, stage_c, stage_b, stage_a, name=f"random-{preset}", effnet=effnet)
    return _settle(models, device, dtype)


BUILTIN_MODELS = {
    "tiny": tiny_models,
    "random-big": functools.partial(random_models, "big"),
    "random-lite": functools.partial(random_models, "lite"),
}
if DEMO_SHIPPED:
    BUILTIN_MODELS["demo"] = demo_models


def load_family(model: str | os.PathLike, **kwargs) -> CascadeModels:
    """A built-in model by name, or a weights folder: `kwargs` go to the built-in or to `load_models`. The two take
    different ones (a built-in its `seed`; a folder `lite` and `with_previewer`): one the other lacks is refused by
    name, where it used to be Python's bare "unexpected keyword argument"."""
    builtin = BUILTIN_MODELS.get(str(model))
    load = builtin or functools.partial(load_models, model)
    takes = list(inspect.signature(load).parameters)
    unknown = [name for name in kwargs if name not in takes]
    if unknown:
        what = f"the built-in model {str(model)!r}" if builtin else "a weights folder"
        hint = " (random-lite is the lite architecture, with random weights)" if builtin and "lite" in unknown else ""
        raise TypeError(
            f"load_family: {', '.join(unknown)} does not apply to {what}{hint}; it takes {', '.join(takes)}"
        )
    return load(**kwargs)
