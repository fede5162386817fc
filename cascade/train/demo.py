"""The demo family: every stage trained from scratch on the shapes data set at 64 x 64, by one recipe.

`train(out, recipe)` runs the stages in order, each resumable, and writes a family folder that `load_models` reads
like an official one (Stability single files with their configurations in the metadata, `text_encoder/`,
`family.json` with the geometry and the recipe):

    stage_a.safetensors    the f4 VQGAN (64 px <-> 4 x 16 x 16)
    semantic_encoder.safetensors + previewer.safetensors
                           Stage C's latent space (64 px -> 16 x 4 x 4) and its preview decoder
    text_encoder/          a small CLIP text model (real CLIP tokenizer), trained contrastively against the semantic
                           latents (cascade.train.text), then frozen for Stages B and C
    stage_b.safetensors    the diffusion decoder, 16 x 4 x 4 + text -> 4 x 16 x 16
    stage_c.safetensors    the text-conditioned prior, text -> 16 x 4 x 4
    family.json            geometry (compression 16 and 4, sizes 64..256), the recipe, what each stage took
    checkpoints/<stage>/   training state, for resuming an interrupted stage

A stage whose output file exists is skipped, so `train` after an interruption picks up where it stopped.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import functools
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..geometry import Geometry
from ..previewer import PreviewerConfig
from ..semantic import SemanticEncoderConfig
from ..stage_a import StageA, StageAConfig
from ..stage_b import StageBConfig
from ..stage_c import StageCConfig
from ..text import TINY_TEXT_CONFIG, build_text_encoder, load_text_encoder
from ..weights import load_stage, readable, save_stage
from .loop import RunConfig, Trained
from .schedule import LOCK_FD_ENV, StageFailed, train_side_by_side
from .semantic import train_semantic
from .shapes import UNNAMED_SHAPES, ShapesData, colourless_captions, make_dataset, make_general
from .stage_a import latent_scale, train_stage_a, with_scale
from .stages import batched, encode_captions, train_stage_b, train_stage_c
from .text import heldout_retrieval, train_text_encoder

GEOMETRY = Geometry(
    stage_c_compression=16, stage_a_compression=4, min_size=64, max_size=256, size_multiple=16, default_size=64
)

# The text encoder: the tiny preset at width 64, trained with CLIP's objective against the semantic latents. Left random
# and frozen, its hidden states still name every word (each token's random embedding rides the residual stream), but
# trained it lifts Stage C's held-out colour from 74 to 92 % (docs/TRAINING.md).
TEXT = copy.deepcopy(TINY_TEXT_CONFIG)
TEXT.update({"hidden_size": 64, "intermediate_size": 128, "projection_dim": 64})
STAGE_A = StageAConfig(levels=2, c_hidden=64, bottleneck_blocks=2, codebook_size=256)
SEMANTIC = SemanticEncoderConfig()
PREVIEWER = PreviewerConfig(c_in=16, c_hidden=64)
STAGE_B = StageBConfig(
    c_cond=128,
    c_hidden=(64, 128, 192),
    nhead=(-1, 4, 4),
    blocks=((1, 2, 2), (2, 2, 1)),
    block_repeat=((1, 1, 1), (2, 2, 2)),
    level_config=("CT", "CTA", "CTA"),
    c_clip=64,
    dropout=(0.0, 0.0, 0.0),
)
STAGE_C = StageCConfig(
    c_cond=128,
    c_hidden=(128, 128),
    nhead=(4, 4),
    blocks=((2, 4), (4, 2)),
    c_clip_text=64,
    c_clip_text_pooled=64,
    c_clip_img=32,
    dropout=(0.1, 0.1),
)

# The sampling defaults a family trained here gets in its family.json (the job, the CLI and the evaluation use them
# where the user sets none), measured on this recipe's family (run 8, docs/TRAINING.md): Stage B guidance 3 and 20
# steps instead of the reference's 1.1 and 10 (its soft outlines come out as shapes), Stage C guidance 2 instead of 4
# (colour stays 99 %). Held-out shape 77 -> 82 %, training pairs' 75 -> 80 % (800 prompts per split, five sets).
SAMPLING = {"prior_cfg": 2.0, "decoder_steps": 20, "decoder_cfg": 3.0}

STAGES = ("stage_a", "semantic", "text_encoder", "stage_b", "stage_c")
# Where general images may go: the image models (the official ones are trained on any image), which the default
# recipe gives them to, and Stage C, which then trains on those of a named shape captioned without their colour
# (`shapes.colourless_captions`; measured in docs/TRAINING.md, not in the default recipe).
IMAGE_MODELS = ("stage_a", "semantic", "stage_b")
GENERAL_STAGES = (*IMAGE_MODELS, "stage_c")
NEEDS = {
    "stage_a": (),
    "semantic": (),
    "text_encoder": ("semantic",),
    "stage_b": ("stage_a", "semantic", "text_encoder"),
    "stage_c": ("semantic", "text_encoder"),
}


@dataclass
class Recipe:
    """Everything a training run depends on: the same recipe on the same machine gives the same weights."""

    size: int = 64
    images: int = 8000
    general_images: int = 8000  # uncaptioned shapes in any colour (shapes.make_general) ...
    general_for: tuple[str, ...] = IMAGE_MODELS  # ... for these stages (of GENERAL_STAGES)
    general_shapes: tuple[str, ...] = UNNAMED_SHAPES  # ... also in these shapes no caption names
    data_seed: int = 0
    text_seed: int = 0
    stage_a: RunConfig = field(
        default_factory=lambda: RunConfig(steps=3000, batch_size=32, lr=1e-3, warmup=100, ema_beta=0.995)
    )
    semantic: RunConfig = field(
        default_factory=lambda: RunConfig(steps=3000, batch_size=64, lr=1e-3, warmup=100, ema_beta=0.995)
    )
    text_encoder: RunConfig = field(
        default_factory=lambda: RunConfig(steps=1500, batch_size=128, lr=1e-3, warmup=100, ema_beta=0.995)
    )
    stage_b: RunConfig = field(
        default_factory=lambda: RunConfig(steps=8000, batch_size=32, lr=1e-3, warmup=200, ema_beta=0.998)
    )
    stage_c: RunConfig = field(default_factory=lambda: RunConfig(steps=3000, batch_size=64, lr=1e-3, warmup=200))

    def __post_init__(self):
        GEOMETRY.check_size("recipe: size", self.size)  # the family's default size: one it can render
        for name, least in (("images", 1), ("general_images", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"recipe: {name}: {value!r} is not allowed; use an integer of {least} or more")
        for name in ("general_for", "general_shapes"):
            value = getattr(self, name)
            if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"recipe: {name}: {value!r} is not allowed; use a list of names")
        for name in self.general_for:
            if name not in GENERAL_STAGES:
                raise ValueError(f"general_for: {name!r} is not allowed; use some of {', '.join(GENERAL_STAGES)}")
        for shape in self.general_shapes:
            if shape not in UNNAMED_SHAPES:
                raise ValueError(f"general_shapes: {shape!r} is not known; use some of {', '.join(UNNAMED_SHAPES)}")
        self.general_for, self.general_shapes = tuple(self.general_for), tuple(self.general_shapes)

    def run(self, stage: str) -> RunConfig:
        return getattr(self, stage)

    def with_steps(self, stage: str, steps: int) -> Recipe:
        return dataclasses.replace(self, **{stage: dataclasses.replace(self.run(stage), steps=steps)})

    @staticmethod
    def from_dict(data: dict) -> Recipe:
        """A recipe from its JSON form (as family.json's "recipe"); a key or value it cannot hold raises ValueError
        naming it."""
        if not isinstance(data, dict):
            raise ValueError(f"recipe: {type(data).__name__} is not allowed; use a mapping (as family.json's 'recipe')")
        _check_fields("recipe", data, Recipe)
        for stage in STAGES:
            if stage in data:
                if not isinstance(data[stage], dict):
                    raise ValueError(f"recipe: {stage}: {data[stage]!r} is not allowed; use a mapping of its settings")
                _check_fields(f"recipe: {stage}", data[stage], RunConfig)
        runs, defaults = {}, Recipe()
        for s in (s for s in STAGES if s in data):
            try:  # what a stage's entry leaves out keeps this recipe's value for that stage, not RunConfig's
                runs[s] = dataclasses.replace(defaults.run(s), **data[s])
            except ValueError as e:
                raise ValueError(f"recipe: {s}: {e}") from None
        plain = {k: v for k, v in data.items() if k not in STAGES}
        # A recipe recorded before general images existed (family.json's: every field written out, each stage's
        # run whole, no general_images) had none. A partial recipe someone writes by hand takes the defaults for
        # what it leaves out, these included, even when it names every stage.
        recorded = {"size", "images", "data_seed", "text_seed"} <= data.keys() and all(
            s in data and {f.name for f in dataclasses.fields(RunConfig)} <= data[s].keys() for s in STAGES
        )
        if "general_images" not in data and recorded:
            plain["general_images"] = 0
        return Recipe(**plain, **runs)


def _check_fields(where: str, data: dict, kind) -> None:
    """Every key of `data` is a field of the dataclass `kind`, and holds a value of the field's type."""
    types = {"int": int, "float": (int, float), "str": str}
    fields_ = {f.name: f for f in dataclasses.fields(kind)}
    for key, value in data.items():
        if key not in fields_:
            raise ValueError(f"{where}: {key!r} is not a setting; use some of {', '.join(fields_)}")
        want = types.get(str(fields_[key].type))
        if want is not None and (isinstance(value, bool) or not isinstance(value, want)):
            raise ValueError(f"{where}: {key}: {value!r} is not allowed; use a number ({fields_[key].type})")


def _output(out: Path, stage: str) -> Path:
    names = {"semantic": "semantic_encoder.safetensors", "text_encoder": "text_encoder/model.safetensors"}
    return out / names.get(stage, f"{stage}.safetensors")


def data_of(recipe: Recipe) -> ShapesData:
    return make_dataset(recipe.images, recipe.size, seed=recipe.data_seed, split="train")


def general_of(recipe: Recipe, stage: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
    """The recipe's uncaptioned images and labels, if `stage` trains on them."""
    if not recipe.general_images or stage not in recipe.general_for:
        return None
    return _general(recipe.general_images, recipe.size, recipe.data_seed, recipe.general_shapes)


@functools.lru_cache(maxsize=1)  # rendered once when `all` trains several stages on them (read-only for callers)
def _general(n: int, size: int, seed: int, shapes: tuple[str, ...]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return make_general(n, size, seed, shapes)


def _summary(trained: Trained) -> dict:
    tail = trained.losses[-100:]
    return {"steps": trained.steps, "seconds": round(trained.seconds, 1), "final_loss": sum(tail) / max(len(tail), 1)}


def _check_inputs(out: Path, stage: str, trained_now=()) -> None:
    """The stages `stage` trains on are in `out` (or among those `trained_now`, before it)."""
    for before in NEEDS.get(stage, ()):
        if before not in trained_now and not _output(out, before).is_file():
            raise FileNotFoundError(f"{_output(out, before)} not found: train {before} first (it is {stage}'s input)")


def train_stage(stage: str, out: Path, recipe: Recipe, progress: bool = True, data: ShapesData | None = None) -> dict:
    """Train one stage of the family in `out` (its inputs from earlier stages must be there); returns its summary."""
    if stage not in STAGES:
        raise ValueError(f"stage: {stage!r} is not known; use one of {', '.join(STAGES)}")
    _check_inputs(out, stage)
    out.mkdir(parents=True, exist_ok=True)
    return _train_stage(stage, out, recipe, progress, data)


@contextlib.contextmanager
def folder_lock(out: Path) -> Iterator[int]:
    """One training command at a time in a family folder, held from before it writes anything until it ends;
    yields the lock's file descriptor. Two commands would rewrite each other's recipe and train the same stage side
    by side, sharing its checkpoint. The stage processes `all` starts inherit the descriptor (`LOCK_FD_ENV`), so the
    folder stays locked while any of them lives, even if `all` itself was killed; the lock ends with the last."""
    path = out / ".training.lock"
    inherited = _inherited_lock(path)
    if inherited is not None:
        yield inherited
        return
    with open(path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            pid = lock.read().strip() or "unknown"
            raise StageFailed(
                f"{out}: another training command (pid {pid}, or the stage processes it started) is training in this "
                "folder; wait for it to end, or stop it"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield lock.fileno()


def _inherited_lock(path: Path) -> int | None:
    """The descriptor named by LOCK_FD_ENV if it is open on `path` and holds its lock (flock on the same open file
    succeeds at once; on another open of the file it would be refused), else None."""
    try:
        fd = int(os.environ.get(LOCK_FD_ENV, ""))
        mine, there = os.fstat(fd), os.stat(path)
        if (mine.st_dev, mine.st_ino) != (there.st_dev, there.st_ino):
            return None
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (ValueError, OSError):  # unset, not a number, not open, or another open of the file: not ours
        return None
    return fd


def _train_stage(stage: str, out: Path, recipe: Recipe, progress: bool, data: ShapesData | None) -> dict:
    run, checkpoint = recipe.run(stage), out / "checkpoints" / stage
    _claim_checkpoint(checkpoint, _identity(out, recipe, stage))
    data = data if data is not None else data_of(recipe)
    extra = {}
    if stage == "stage_a":
        general = general_of(recipe, stage)
        trained = train_stage_a(data, STAGE_A, run, checkpoint, progress, None if general is None else general[0])
        ema = trained.ema["stage_a"]
        save_stage(with_scale(ema, latent_scale(ema, data.images)), _output(out, stage))
    elif stage == "semantic":
        general = general_of(recipe, stage)
        trained = train_semantic(data, run, checkpoint, SEMANTIC, PREVIEWER.c_hidden, progress, general)
        save_stage(trained.ema["encoder"], _output(out, stage))
        save_stage(trained.ema["previewer"], out / "previewer.safetensors")
    else:
        semantic = load_stage(_output(out, "semantic"), expect="semantic")
        latents = batched(semantic.encode, data.images)
        if stage == "text_encoder":
            encoder = build_text_encoder(TEXT, seed=recipe.text_seed)
            trained = train_text_encoder(encoder, data, latents, run, checkpoint, progress)
            encoder.model.load_state_dict(trained.ema["text_encoder"].state_dict())
            extra["heldout_retrieval"] = heldout_retrieval(encoder, trained.ema["image_head"], semantic, recipe.size)
            encoder.model.save_pretrained(out / "text_encoder")
            readable(out / "text_encoder" / "model.safetensors")  # (written by safetensors too)
        else:
            text_encoder = load_text_encoder(out / "text_encoder", dtype=torch.float32)
            text = encode_captions(text_encoder, data.captions)
            general = general_of(recipe, stage)
            if stage == "stage_c":
                if general is not None:
                    named, captions = colourless_captions(general[1], recipe.data_seed)
                    general = (batched(semantic.encode, general[0][named]), encode_captions(text_encoder, captions))
                trained = train_stage_c(latents, text, STAGE_C, run, checkpoint, progress, general)
            else:
                stage_a: StageA = load_stage(_output(out, "stage_a"), dtype=torch.float32, expect="stage_a")
                stage_a_latents = batched(stage_a.encode, data.images)
                if general is not None:
                    general = (batched(stage_a.encode, general[0]), batched(semantic.encode, general[0]))
                trained = train_stage_b(stage_a_latents, latents, text, STAGE_B, run, checkpoint, progress, general)
            save_stage(trained.ema[stage], _output(out, stage))
    summary = _summary(trained) | extra | {"settings": _settings(recipe, stage)}
    _record(out, recipe, stage, summary)
    shutil.rmtree(checkpoint, ignore_errors=True)  # done: training the stage again starts from scratch
    return summary


def _identity(out: Path, recipe: Recipe, stage: str) -> dict:
    """What a stage's training is made from besides its settings: the recipe's data, and the sha256 of each earlier
    stage's output it reads."""
    data = {k: v for k, v in asdict(recipe).items() if k not in STAGES}
    inputs = {before: hashlib.sha256(_output(out, before).read_bytes()).hexdigest() for before in NEEDS[stage]}
    return json.loads(json.dumps({"data": data, "inputs": inputs}))  # tuples as lists: as the file reads back


def _claim_checkpoint(checkpoint: Path, identity: dict) -> None:
    """Keep `checkpoint` for resuming only if it was made from the same data and inputs; else start over (an earlier
    stage retrained, or the recipe's data changed, since it was written)."""
    mark = checkpoint / "identity.json"
    if checkpoint.is_dir() and (not mark.is_file() or json.loads(mark.read_text()) != identity):
        print(f"not resuming from {checkpoint}: it was made from other data or inputs; starting over", flush=True)
        shutil.rmtree(checkpoint)
    checkpoint.mkdir(parents=True, exist_ok=True)
    mark.write_text(json.dumps(identity, indent=1))


def _record(
    out: Path, recipe: Recipe, stage: str | None = None, summary: dict | None = None, wall: dict | None = None
) -> None:
    """family.json: the geometry `load_models` reads, the recipe, what each stage took, and what the last training
    command trained and how long it took from start to end (`wall`)."""
    path = out / "family.json"
    with open(out / ".family.lock", "w") as lock:  # stages trained side by side finish in their own processes
        fcntl.flock(lock, fcntl.LOCK_EX)
        family = json.loads(path.read_text()) if path.is_file() else {}
        family["geometry"] = asdict(dataclasses.replace(GEOMETRY, default_size=recipe.size))  # trained at that size
        family["recipe"] = asdict(recipe)
        family.setdefault("sampling", dict(SAMPLING))
        if stage is not None:
            family.setdefault("trained", {})[stage] = summary
        if wall is not None:
            family["wall"] = wall
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(family, indent=2) + "\n")
        tmp.replace(path)  # a reader never sees half a file


def _settings(recipe: Recipe, stage: str) -> dict:
    """The recipe's settings a stage is trained with, as family.json records them with the stage: the data's and
    its own run's (family.json's "recipe" is the last command's, which may not be the one that trained it)."""
    data = {k: v for k, v in asdict(recipe).items() if k not in STAGES}
    return json.loads(json.dumps({**data, stage: asdict(recipe.run(stage))}))  # tuples as lists: as it reads back


def _trained(out: Path) -> dict:
    """family.json's record of the stages trained in `out` ({} where there is none, or it cannot be read)."""
    try:
        trained = json.loads((out / "family.json").read_text())["trained"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return trained if isinstance(trained, dict) else {}


def _recipe_changes(trained: dict, recipe: Recipe, stage: str) -> list[str]:
    """What `recipe` sets for a trained `stage` otherwise than it was trained with (`_trained`'s record of the stage;
    none for stages trained before it recorded them): ["stage_a.steps 4 (now 6)", ...]."""
    record = trained.get(stage)
    before = record.get("settings") if isinstance(record, dict) else None
    if not isinstance(before, dict):
        return []
    changes = []
    for key, value in _settings(recipe, stage).items():
        if key == stage and isinstance(before.get(key), dict):
            changes += [f"{key}.{k} {before[key][k]} (now {v})" for k, v in value.items() if before[key].get(k, v) != v]
        elif key != stage and key in before and before[key] != value:
            changes.append(f"{key} {before[key]} (now {value})")
    return changes


def train(out: Path, recipe: Recipe = Recipe(), stages=STAGES, progress: bool = True, log=print, jobs: int = 1) -> dict:
    """Train the stages not yet done, in order, or with `jobs` > 1 that many at once, each in its own process as its
    inputs are ready (`schedule.train_side_by_side`); returns {stage: summary} for those trained now."""
    for stage in stages:  # before anything is written: a stage whose input neither exists nor is trained now
        _check_inputs(out, stage, trained_now=stages)
    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(out) as lock_fd:  # outputs are looked at under the lock: none appears meanwhile
        todo, trained = [], _trained(out)
        for stage in stages:
            if _output(out, stage).is_file():
                message = f"{stage}: already trained ({_output(out, stage)}); skipped"
                if changes := _recipe_changes(trained, recipe, stage):
                    message += (
                        f"; it was trained with {', '.join(changes)}: delete it to train it with the settings asked now"
                    )
                log(message)
            else:
                todo.append(stage)
        if todo:  # the recipe of what is trained now (a command that trains nothing leaves family.json as it is)
            _record(out, recipe)
        started = time.perf_counter()
        if jobs > 1:
            done = train_side_by_side(out, recipe, todo, NEEDS, _output, jobs, log, lock_fd)
        else:
            done, data = {}, None
            for stage in todo:
                begun = time.perf_counter()
                data = data if data is not None else data_of(recipe)  # rendered once for every stage of this run
                done[stage] = train_stage(stage, out, recipe, progress, data)
                log(f"{stage}: {done[stage]['steps']} steps, final loss {done[stage]['final_loss']:.4f}, "
                    f"{time.perf_counter() - begun:.0f} s")  # fmt: skip
        if done:  # the recipe's wall time (the issue's "fits in about an hour") is this, not the stages' sum
            seconds = round(time.perf_counter() - started, 1)
            _record(out, recipe, wall={"stages": list(done), "jobs": jobs, "seconds": seconds})
            log(f"trained {', '.join(done)} in {seconds:.0f} s ({seconds / 60:.0f} min), {jobs} at a time")
    return done
