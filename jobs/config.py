"""The job's configuration: a YAML file and/or flags, validated in full before anything starts.

Every setting has one name, used as the YAML key and (with `_` as `-`) as the flag: `prior_steps: 30` in the file is
`--prior-steps 30` on the command line; the pools are nested in YAML (`prior_pool: {actors: 2}`) and flat on the
command line (`--prior-pool-actors 2`). Flags override the file. Unknown keys are errors that suggest the nearest
valid key. Credentials are never configuration: they come from the standard AWS chain.
"""

from __future__ import annotations

import argparse
import difflib
import io
import json
import math
import numbers
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from cascade.errors import WeightsError
from cascade.geometry import DEFAULT_MODEL, OFFICIAL, Geometry, family_geometry, is_int
from cascade.imagefile import FORMATS
from cascade.request import MAX_SEED, MAX_STEPS, REFERENCE_SAMPLING, Request, sampling_defaults

DTYPES = ("auto", "bf16", "fp16", "fp32")
LAYOUTS = ("files", "webdataset")
LATENT_DTYPES = ("bf16", "fp16", "fp32")
MAX_NUM_IMAGES = 10_000


class ConfigError(ValueError):
    """Bad configuration: the message names the key, the value and what is allowed."""


def gpu_share(k: int) -> float:
    """Each of k actors' share of one GPU, floored to hundredths so that k of them fit (3 x 0.33 <= 1)."""
    return math.floor(100 / k) / 100


@dataclass
class PoolConfig:
    """One GPU actor pool. gpus is per actor ("auto": 1 when the cluster has a GPU for each auto actor, a share of one
    when it has fewer, e.g. 0.5 for each pool's one actor on one GPU; 0 without GPUs); fractions pack actors.
    `actors` start with the job; max_actors above it lets Ray Data add actors while the pool's input queues up (and
    remove them when it drains), up to that many; 0 keeps the pool at `actors`."""

    actors: int = 1
    max_actors: int = 0
    gpus: float | str = "auto"
    cpus: float = 0.0  # GPU actors reserve no CPU: on small nodes the reads and writes need it (platform notes)
    batch_size: int = 4
    resources: dict[str, float] = field(default_factory=dict)  # custom resources, to land on a node type

    @property
    def autoscales(self) -> bool:
        return self.max_actors > self.actors


POOL_COUNTS = ("actors", "max_actors", "batch_size")  # the pool settings that are whole numbers


@dataclass
class JobConfig:
    prompts: str = ""
    out: str = ""
    model: str = DEFAULT_MODEL  # demo where its trained weights ship, else tiny
    lora: str = ""  # a LoRA file (python -m cascade.train lora) merged into the actors; "" for none
    dry_run: bool = False  # skip the model maths, move the same data (zero latents, grey images): tests the plumbing
    compile: bool = False  # torch.compile Stage C's and Stage B's blocks in the actors (cascade/speed.py), per bucket
    # Stage C's token linear layers as float8 products (cascade/float8.py) on the Stage C actors; needs compile: true
    fp8: bool = False
    lite: bool = False
    dtype: str = "auto"
    seed: int = 0
    # Defaults for rows that do not set them: the model's own defaults (the reference notebook's).
    negative_prompt: str = Request.negative_prompt
    num_images: int = 1
    width: int | None = None  # None: the model family's default size (1024 for the official family)
    height: int | None = None
    # None: the family's own default (its family.json's "sampling"), else the reference's (20 at 4.0, 10 at 1.1).
    prior_steps: int | None = None
    prior_cfg: float | None = None
    decoder_steps: int | None = None
    decoder_cfg: float | None = None
    sampler: str = Request.sampler
    # Output.
    image_format: str = "png"
    quality: int = 95
    layout: str = "files"  # or "webdataset": tar shards of shard_size images under shards/ (img2dataset-compatible)
    shard_size: int = 128
    overwrite: bool = False
    retry_errors: bool = False
    verify: bool = False  # on resume, also check each stored image's sha256 (reads every image back)
    report: bool = True
    manifest_rows: int = 1000
    manifest_seconds: float = 60.0
    # Pools and transport.
    prior_pool: PoolConfig = field(default_factory=PoolConfig)
    decoder_pool: PoolConfig = field(default_factory=PoolConfig)
    writer_cpus: float = 1.0
    latent_dtype: str = "bf16"
    storage_attempts: int = 10
    # The input runs in segments of this many prompt rows, one Ray Data execution each (the pools start again for
    # each): the driver's memory stays flat however long the input.
    segment_rows: int = 20000
    progress_seconds: float = 5.0
    # How long a pool may find no live node it fits on (a node lost for good, an autoscaler that adds none) before
    # the job stops, so that it never waits forever; 0 waits forever.
    node_wait_seconds: float = 600.0

    def image_settings(self) -> dict:
        """The settings that decide what an image is (its pixels, file and place), recorded with each manifest part:
        a resume under others keeps the earlier images as they are and so mixes them (manifest.settings_changes)."""
        return {key: getattr(self, key) for key in IMAGE_SETTINGS}

    def public(self) -> dict:
        """The configuration as recorded in _SUCCESS and the report (it holds no secrets: none are settings)."""
        return asdict(self)


IMAGE_SETTINGS = (
    "model",
    "lora",
    "lite",
    "dtype",
    "fp8",  # (compile is not here: it leaves the pixels as they are; float8 products do not)
    "dry_run",
    "seed",
    "negative_prompt",
    "width",
    "height",
    "prior_steps",
    "prior_cfg",
    "decoder_steps",
    "decoder_cfg",
    "sampler",
    "latent_dtype",
    "image_format",
    "quality",
    "layout",
    "shard_size",
)

# The settings whose default comes from the model family, and their types (the sampling ones' as the reference's).
FAMILY_DEFAULTS = {"width": int, "height": int, **{key: type(v) for key, v in REFERENCE_SAMPLING.items()}}
POOL_KEYS = {f.name for f in fields(PoolConfig)}
KEYS = {f.name for f in fields(JobConfig)}


def _unknown(key: str, valid: set[str], where: str) -> ConfigError:
    if not where and key in POOL_KEYS:  # a pool's setting at the top level
        return ConfigError(f"{key!r} is a setting of each pool: set prior_pool.{key} and decoder_pool.{key}")
    near = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.6)
    hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(sorted(valid))}"
    return ConfigError(f"{where}{key!r} is not a known setting{hint}")


def _is_num(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _is_amount(v) -> bool:
    """An amount of a Ray resource: 0, or a finite number Ray can schedule (at least its unit, 0.0001)."""
    return _is_num(v) and (v == 0 or v >= RAY_RESOURCE_UNIT)


def in_ray_working_dir(cwd: str | None = None) -> bool:
    """Whether the job runs in the copy of a `working_dir` that `ray job submit` unpacked on the node (under Ray's
    session folder, runtime_resources/working_dir_files/): a relative --out would land there, not where the user
    submitted from."""
    parts = Path(cwd or os.getcwd()).parts
    return any(a == "runtime_resources" and b == "working_dir_files" for a, b in zip(parts, parts[1:]))


def _check(ok: bool, key: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {value!r} is not allowed; {allowed}")


def from_mapping(data: dict) -> JobConfig:
    """Build and validate a JobConfig from a mapping (parsed YAML merged with flags)."""
    if not isinstance(data, dict):
        raise ConfigError(f"the configuration must be a mapping of settings, got {type(data).__name__}")
    config = JobConfig()
    for key, value in data.items():
        if key not in KEYS:
            raise _unknown(str(key), KEYS, "")
        if key in ("prior_pool", "decoder_pool"):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: {value!r} is not allowed; use a mapping of {', '.join(sorted(POOL_KEYS))}")
            pool = PoolConfig()
            for k, v in value.items():
                if k not in POOL_KEYS:
                    raise _unknown(str(k), POOL_KEYS, f"{key}: ")
                setattr(pool, k, v)
            value = pool
        setattr(config, key, value)
    validate(config)
    return config


# A bucket name: AWS wants 3-63 lowercase letters, digits, dots and hyphens; some S3-compatible servers (Ceph's relaxed
# names) also take capitals and underscores, so only what no server takes is refused here.
_BUCKET = re.compile(r"[A-Za-z0-9._-]{3,255}")
# What looks like a URL, not a path: a scheme of two or more characters, then ":/" (a local path would make a folder
# named "s3a:" and exit 0 with the images where nobody looks; "C:/" is a Windows drive, not a scheme).
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):/")
# Ray's unit of a fractional resource: an amount above 0 and below it is refused when the actors start.
RAY_RESOURCE_UNIT = 0.0001
RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")  # Ray takes these only as num_cpus etc.


REQUIRED_HELP = {
    "prompts": "a Parquet file, a folder of them, a glob or an s3:// URI (required)",
    "out": "where images and manifests go: a local folder or an s3://bucket/prefix (required)",
}
EMPTY_HELP = {  # settings whose default is "" (none)
    "lora": "a LoRA file (python -m cascade.train lora) merged into the models (default: none)",
    "negative_prompt": "the negative prompt of every row without its own (default: empty)",
}


def _check_url(name: str, url: str) -> None:
    """`prompts` or `out`: a local path, or an s3:// URL whose keys every S3-compatible server stores as written."""
    scheme = _SCHEME.match(url)
    if scheme is None:
        return
    if "?" in url:  # a pasted presigned URL: its query holds a signature, never echoed
        raise ConfigError(
            f"{name}: {url.partition('?')[0] + '?...'!r} is not allowed; an s3:// URL has no query string: give the "
            "bucket and key prefix only (credentials come from the standard AWS configuration)"
        )
    if "@" in url[scheme.end() :].lstrip("/").partition("/")[0]:  # user:secret@bucket: never echoed
        raise ConfigError(
            f"{name}: a URL with credentials in it (user:secret@...) is not allowed, and is not shown here: "
            "credentials come from the standard AWS configuration (environment, ~/.aws, an instance profile)"
        )
    _check(
        url.startswith("s3://"),
        name,
        url,
        "give an s3://bucket/prefix URL (lowercase s3; s3a:, gs: and the like are not read) or a local path",
    )
    bucket, _, prefix = url[len("s3://") :].partition("/")
    _check(
        _BUCKET.fullmatch(bucket) is not None,
        name,
        url,
        "an s3:// URL starts with a bucket name of at least 3 letters, digits, dots or hyphens",
    )
    parts = prefix.rstrip("/").split("/") if prefix.rstrip("/") else []
    _check(
        "\\" not in prefix and not any(part in ("", ".", "..") for part in parts),
        name,
        url,
        "write the key prefix without empty, '.' or '..' parts and without backslashes: S3-compatible servers "
        "store such keys differently (SeaweedFS stores a//b as a/b, then lists nothing under a//b), so a rerun "
        "would not find the work already done",
    )


def validate(c: JobConfig) -> None:
    for name in REQUIRED_HELP:
        if getattr(c, name) in ("", None):
            raise ConfigError(f"{name}: missing; give --{name} (or {name}: in the --config file)")
    _check(
        isinstance(c.prompts, str) and c.prompts.strip() != "",
        "prompts",
        c.prompts,
        "give a Parquet file, folder, glob or s3:// URI",
    )
    _check(isinstance(c.out, str) and c.out.strip() != "", "out", c.out, "give a local folder or an s3:// prefix")
    for name in ("prompts", "out"):
        _check_url(name, getattr(c, name))
    _check(
        "://" in c.out or os.path.isabs(os.path.expanduser(c.out)) or not in_ray_working_dir(),
        "out",
        c.out,
        f"it is relative, and this job runs in Ray's copy of its working_dir ({os.getcwd()}), which Ray shares with "
        "later jobs and deletes: give an absolute path or an s3:// prefix",
    )
    _check(
        isinstance(c.model, str) and c.model != "",
        "model",
        c.model,
        "give a built-in model (demo, tiny, random-big, random-lite) or a local weights folder",
    )
    _check(isinstance(c.lora, str), "lora", c.lora, "give the path of a LoRA .safetensors file, or '' for none")
    _check(isinstance(c.lite, bool), "lite", c.lite, "use true or false")
    if c.lite:
        from cascade.family import BUILTIN_MODELS

        _check(
            c.model not in BUILTIN_MODELS,
            "lite",
            c.lite,
            f"it picks the lite files of a weights folder, and model {c.model!r} is built in "
            "(random-lite is the lite architecture with random weights)",
        )
    _check(c.dtype in DTYPES, "dtype", c.dtype, f"use one of {', '.join(DTYPES)}")
    _check(is_int(c.seed) and 0 <= c.seed <= MAX_SEED, "seed", c.seed, "use an integer from 0 to 2**63 - 1")
    _check(isinstance(c.negative_prompt, str), "negative_prompt", c.negative_prompt, "use a string")
    _check(
        is_int(c.num_images) and 1 <= c.num_images <= MAX_NUM_IMAGES,
        "num_images",
        c.num_images,
        f"use an integer from 1 to {MAX_NUM_IMAGES}",
    )
    geometry = _geometry(c.model)
    for key in ("width", "height"):
        v = getattr(c, key)
        if v is None:
            setattr(c, key, (geometry or OFFICIAL).default_size)
        elif geometry is not None:
            try:
                geometry.check_size(key, v)
            except ValueError as e:
                raise ConfigError(str(e)) from None
    for key, default in _sampling(c.model).items():
        if getattr(c, key) is None:
            setattr(c, key, default)
    for key in ("prior_steps", "decoder_steps"):
        v = getattr(c, key)
        _check(is_int(v) and 1 <= v <= MAX_STEPS, key, v, f"use an integer from 1 to {MAX_STEPS}")
    for key in ("prior_cfg", "decoder_cfg"):
        v = getattr(c, key)
        _check(_is_num(v) and 0 <= v <= 100, key, v, "use a finite number from 0 to 100")
    _check(c.sampler in ("ddpm", "ddim"), "sampler", c.sampler, "use ddpm or ddim")
    _check(c.image_format in FORMATS, "image_format", c.image_format, f"use one of {', '.join(FORMATS)}")
    _check(is_int(c.quality) and 1 <= c.quality <= 100, "quality", c.quality, "use an integer from 1 to 100")
    _check(c.layout in LAYOUTS, "layout", c.layout, f"use one of {', '.join(LAYOUTS)}")
    _check(is_int(c.shard_size) and 1 <= c.shard_size <= 100_000, "shard_size", c.shard_size, "use 1 to 100000")
    for key in ("overwrite", "retry_errors", "verify", "report", "dry_run", "compile", "fp8"):
        _check(isinstance(getattr(c, key), bool), key, getattr(c, key), "use true or false")
    _check(
        not c.fp8 or c.compile,
        "fp8",
        c.fp8,
        "it needs compile: true (--compile): without compiled blocks float8's scaling passes run as kernels of their "
        "own, and Stage C measured slower than in bf16 (docs/PERFORMANCE.md)",
    )
    _check(is_int(c.manifest_rows) and c.manifest_rows >= 1, "manifest_rows", c.manifest_rows, "use 1 or more")
    for key in ("manifest_seconds", "progress_seconds"):
        _check(_is_num(getattr(c, key)) and getattr(c, key) > 0, key, getattr(c, key), "use a number above 0")
    v = c.segment_rows
    _check(is_int(v) and v >= 1, "segment_rows", v, "use an integer of 1 or more")
    v = c.node_wait_seconds
    _check(_is_num(v) and v >= 0, "node_wait_seconds", v, "use a number of seconds, 0 to wait forever")
    _check(
        _is_amount(c.writer_cpus) and c.writer_cpus > 0,
        "writer_cpus",
        c.writer_cpus,
        f"use a number from {RAY_RESOURCE_UNIT:g}",
    )
    _check(c.latent_dtype in LATENT_DTYPES, "latent_dtype", c.latent_dtype, f"use one of {', '.join(LATENT_DTYPES)}")
    _check(
        is_int(c.storage_attempts) and 1 <= c.storage_attempts <= 100,
        "storage_attempts",
        c.storage_attempts,
        "use 1 to 100",
    )
    for name in ("prior_pool", "decoder_pool"):
        p: PoolConfig = getattr(c, name)
        _check(is_int(p.actors) and p.actors >= 1, f"{name}.actors", p.actors, "use an integer of 1 or more")
        _check(
            is_int(p.max_actors) and (p.max_actors == 0 or (is_int(p.actors) and p.max_actors >= p.actors)),
            f"{name}.max_actors",
            p.max_actors,
            f"use 0 (a fixed pool) or an integer of at least {name}.actors ({p.actors}) to autoscale between them",
        )
        _check(
            p.gpus == "auto" or (_is_amount(p.gpus) and (p.gpus <= 1 or float(p.gpus).is_integer())),
            f"{name}.gpus",
            p.gpus,
            f"use 'auto', 0, a fraction from {RAY_RESOURCE_UNIT:g} up to 1 (to pack actors on a GPU) or a whole number",
        )
        _check(_is_amount(p.cpus), f"{name}.cpus", p.cpus, f"use 0 or a number from {RAY_RESOURCE_UNIT:g}")
        _check(is_int(p.batch_size) and 1 <= p.batch_size <= 1024, f"{name}.batch_size", p.batch_size, "use 1 to 1024")
        _check(
            isinstance(p.resources, dict)
            and all(isinstance(k, str) and k.strip() and _is_amount(v) and v > 0 for k, v in p.resources.items()),
            f"{name}.resources",
            p.resources,
            f'use a mapping of resource name to an amount of at least {RAY_RESOURCE_UNIT:g}, e.g. {{"stage_c": 1}}',
        )
        taken = sorted(k for k in p.resources if k in RAY_BUILTIN_RESOURCES) if isinstance(p.resources, dict) else []
        _check(
            not taken,
            f"{name}.resources",
            p.resources,
            f"{', '.join(taken)} cannot go here: set {name}.gpus and {name}.cpus instead, and name only custom "
            "resources (node types)",
        )


def _geometry(model: str) -> Geometry | None:
    """The sizes the model family supports; a broken family file is reported when the model is checked (exit 3).
    None for a weights folder that is not there: the model check names it (exit 3) rather than the sizes being
    refused against a family that is not the one meant (a path mistyped, of a family with its own sizes)."""
    from cascade.family import BUILTIN_MODELS

    if model not in BUILTIN_MODELS and not Path(model).is_dir():
        return None
    try:
        return family_geometry(model)
    except WeightsError:
        return OFFICIAL


def _sampling(model: str) -> dict:
    """The family's sampling defaults; a broken family file is reported when the model is checked (exit 3)."""
    try:
        return sampling_defaults(model)
    except WeightsError:
        return dict(REFERENCE_SAMPLING)


def _unique_key_loader():
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last one, silently).

    The check reads the composed document before anything is constructed: constructing merges (`<<: *base`) flattens
    the merged mappings in place, after which a mapping would seem to hold the keys it overrides twice."""
    import yaml

    merge = "tag:yaml.org,2002:merge"

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_document(self, node):
            seen, todo = set(), [node]
            while todo:
                part = todo.pop()
                if id(part) in seen:  # an alias's node, checked once
                    continue
                seen.add(id(part))
                if isinstance(part, yaml.MappingNode):
                    keys = set()
                    for key_node, value_node in part.value:
                        todo.append(value_node)
                        if key_node.tag == merge or not isinstance(key_node, yaml.ScalarNode):
                            continue
                        key = self.construct_object(key_node)  # (1, 01 and 0x1 are one key)
                        if key in keys:
                            raise yaml.constructor.ConstructorError(
                                None, None, f"the key {key!r} is given twice", key_node.start_mark
                            )
                        keys.add(key)
                elif isinstance(part, yaml.SequenceNode):
                    todo.extend(part.value)
            return super().construct_document(node)

    _core_schema(UniqueKeyLoader)
    return UniqueKeyLoader


def _core_schema(loader) -> None:
    """Plain values read as YAML 1.2's core schema does, in place of PyYAML's YAML 1.1 rules, under which `1e3` is a
    string, `seed: 010` is 8 (octal), `1:30` is 90 (base 60), `no` is false and `2024-01-01` a date: settings the
    user did not write. Here only true/false are booleans; integers are decimal, 0x hex or 0o octal; floats take
    an exponent with or without a sign or point; everything else is a string."""
    import yaml

    kept = ("tag:yaml.org,2002:merge",)
    loader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag in kept]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    core = {  # tag: (pattern, the characters a plain value of it can start with; "" for the empty value)
        "tag:yaml.org,2002:null": (r"~|null|Null|NULL|", ["~", "n", "N", ""]),
        "tag:yaml.org,2002:bool": (r"true|True|TRUE|false|False|FALSE", list("tTfF")),
        "tag:yaml.org,2002:int": (r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+", list("-+0123456789")),
        "tag:yaml.org,2002:float": (
            r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?|[-+]?\.(inf|Inf|INF)|\.(nan|NaN|NAN)",
            list("-+0123456789."),
        ),
    }
    whole = {tag: re.compile(f"^(?:{pattern})$") for tag, (pattern, _) in core.items()}
    for tag, (_, first) in core.items():
        loader.add_implicit_resolver(tag, whole[tag], first)
    plain_int = whole["tag:yaml.org,2002:int"]

    def integer(self, node):
        text = self.construct_scalar(node)
        if not plain_int.match(text):  # an explicit !!int of another form (0b11, 1_000): YAML 1.1's reading
            return yaml.SafeLoader.construct_yaml_int(self, node)
        base = {"0x": 16, "0o": 8}.get(text[:2], 10)
        return int(text[2:] if base != 10 else text, base)

    loader.add_constructor("tag:yaml.org,2002:int", integer)


def load_yaml(path: str | Path) -> dict:
    """Parse a YAML configuration file with the safe loader."""
    import yaml

    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as e:
        raise ConfigError(f"--config: cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"--config: {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); save it as UTF-8"
        ) from None
    try:
        stream = io.StringIO(text)
        stream.name = str(path)  # what YAML's error marks name, in place of "<unicode string>"
        data = yaml.load(stream, Loader=_unique_key_loader())
    except yaml.YAMLError as e:
        raise ConfigError(f"--config: {path} is not valid YAML: {e}") from None
    except Exception as e:  # a tagged value its tag cannot read (!!int abc, !!bool maybe): PyYAML's own error types
        raise ConfigError(f"--config: {path} is not valid YAML: a tagged value ({type(e).__name__}: {e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of settings, got {type(data).__name__}")
    return data


class Parser(argparse.ArgumentParser):
    """argparse, with the nearest known flag suggested for one it does not know (`--prior-stepz`), and no flag taken
    from a prefix of it (argparse would read `--prompt x` as `--prompts x`, and `--seed` as a future `--seed-...`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str):
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            known = [o[2:] for a in self._actions for o in a.option_strings if o.startswith("--")]

            def hint(word: str) -> str:
                near = difflib.get_close_matches(word[2:], known, n=1) if word.startswith("--") else []
                return f"{word} (did you mean --{near[0]}?)" if near else word

            hints = [hint(word) for word in message[len(prefix) :].split()]
            message = prefix + " ".join(hints)
        super().error(message)


CHOICES = {  # the settings that take one of a few names, for --help (validate checks them)
    "dtype": DTYPES,
    "sampler": ("ddpm", "ddim"),
    "image_format": FORMATS,
    "layout": LAYOUTS,
    "latent_dtype": LATENT_DTYPES,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; every default is None, meaning "from the file, else the built-in default"."""
    defaults = JobConfig()
    parser.add_argument("--config", help="a YAML file of settings (flags override it)")
    for f in fields(JobConfig):
        if f.name in ("prior_pool", "decoder_pool"):
            pool = getattr(defaults, f.name)
            for pf in fields(PoolConfig):
                flag = f"--{f.name}-{pf.name}".replace("_", "-")
                kind = (
                    _resources
                    if pf.name == "resources"
                    else (_number(int) if pf.name in POOL_COUNTS else _gpus if pf.name == "gpus" else _number(float))
                )
                default = getattr(pool, pf.name)
                text = f"{f.name}: {pf.name} (default {default!r})" if default != {} else f"{f.name}: {pf.name}"
                parser.add_argument(flag, dest=f"{f.name}.{pf.name}", type=kind, default=None, help=text)
            continue
        default = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=f"(default {default})"
            )
        else:
            if default is None:  # the family's choice
                kind, text = FAMILY_DEFAULTS[f.name], "(default: the model family's)"
            else:
                kind = type(default)
                text = f"(default {default!r})" if default != "" else REQUIRED_HELP.get(f.name, EMPTY_HELP.get(f.name))
                if f.name in CHOICES:
                    text = f"one of {', '.join(CHOICES[f.name])} {text}"
            kind = _number(kind) if kind in (int, float) else kind
            parser.add_argument(flag, dest=f.name, type=kind, default=None, help=text)


def _number(kind):
    """A flag's number, or its text as given where it is not one: validation then names the setting, the value and
    what is allowed (argparse would say only "invalid int value")."""

    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            return text

    parse.__name__ = kind.__name__
    return parse


def _gpus(text: str) -> float | str:
    """--*-pool-gpus: 'auto' or a number (validate checks its range)."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not allowed; use 'auto', 0, a fraction up to 1 (to pack actors on a GPU) or a whole number"
        ) from None


def _resources(text: str) -> dict:
    """--*-pool-resources: a JSON mapping (validate checks its names and amounts)."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):  # (null would read as "not given", and leave the file's resources as they were)
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a JSON mapping; give resource names and amounts, e.g. "
            f"'{{\"stage_c\": 1}}' ('{{}}' for none)"
        )
    return value


def resolve(args: argparse.Namespace) -> JobConfig:
    """YAML (if --config) overlaid with the flags that were given, then validated."""
    if getattr(args, "config", None) == "":
        raise ConfigError(
            "--config: '' is not allowed; give the path of a YAML file of settings, or leave the flag out"
        )
    data = load_yaml(args.config) if getattr(args, "config", None) else {}
    for key, value in vars(args).items():
        if value is None or key == "config":
            continue
        if "." in key:
            pool, sub = key.split(".", 1)
            current = data.get(pool)
            if current is None:
                current = {}
            if isinstance(current, dict):  # anything else is left for validation to name
                data[pool] = {**current, sub: value}
        elif key in KEYS:
            data[key] = value
    return from_mapping(data)
