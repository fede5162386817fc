"""Prompts in: find the Parquet files, check their schemas before anything starts, and turn rows into images to render.

Identity. Every image is (id, image_index). A row's id is its `id` column, or, without one, `{file}:{row}` (the file's
path under the prompts location and the row's index in it), which is stable across reruns of the same input. A row
renders `num_images` images; image i's seed is the row's `seed` + i, or, without one, a hash of the job seed, the id
and i. The output key is a pure function of (id, image_index): reruns, retries and resumes write the same keys.

Bad rows do not stop the job: a null or empty prompt, an unsupported size, steps or cfg becomes an `error` on that
row, which travels to the manifest (status "error"). Bad files do: a missing input, a file that is not Parquet, no
`prompt` column or a column of the wrong type stop the job before any model loads, with a message naming the file.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import hashlib
import math
import os
import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cascade.geometry import OFFICIAL, Geometry
from cascade.request import MAX_SEED, Request, validate
from workers.rows import REQUEST_FIELDS
from workers.storage import LocalStorage, S3Storage, Storage, StorageNotFound, StorageRefused, is_s3

from .config import MAX_NUM_IMAGES, JobConfig


class InputError(ValueError):
    """The prompts cannot be used: the message names the file and what is wrong."""


# Columns a row may set, and the Arrow types each accepts (null: an all-null column).
STRING, INTEGER, NUMBER = "string", "integer", "number"
PARAMETERS = {
    "negative_prompt": STRING,
    "seed": INTEGER,
    "width": INTEGER,
    "height": INTEGER,
    "num_images": INTEGER,
    "prior_steps": INTEGER,
    "prior_cfg": NUMBER,
    "decoder_steps": INTEGER,
    "decoder_cfg": NUMBER,
    "sampler": STRING,
}
# Every column the pipeline itself sets on a row, in the manifest or on the way to it (the stages' latents and pixels);
# an input column of the same name is renamed input_<name>, so that it neither overwrites nor is overwritten.
RESERVED = {
    # the request and where it came from (inputs.expand_row)
    "id", "image_index", "prompt", "negative_prompt", "seed", "width", "height", "prior_steps", "prior_cfg",
    "decoder_steps", "decoder_cfg", "sampler", "key", "source", "row", "error",
    # the Stage C pool (workers.stages.PriorStage)
    "latent", "clip_pooled", "clip_pooled_negative", "prompt_tokens", "prompt_truncated", "prior_s", "prior_batch",
    "prior_start", "prior_end", "prior_actor", "queue_bytes",
    # the Stage B/A pool (workers.stages.DecoderStage)
    "pixels", "decoder_s", "decoder_batch", "decoder_start", "decoder_end", "decoder_actor",
    # the writer (workers.writer) and the manifest (jobs.manifest)
    "status", "sha256", "bytes", "member", "shard_images", "model", "model_digest", "write_s", "write_end", "run_id",
}  # fmt: skip
KEY_NAME_MAX = 100  # characters of an id kept in a key; S3 keys may be 1024 bytes


def _accepts(kind: str, t: pa.DataType) -> bool:
    if pa.types.is_null(t):
        return True
    if kind == STRING:  # pandas' categorical strings too (dictionary-encoded)
        if pa.types.is_dictionary(t):
            t = t.value_type
        return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)
    # Integer columns with nulls come out of pandas as float64: accepted, each value checked per row.
    return pa.types.is_integer(t) or pa.types.is_floating(t)


@dataclass(frozen=True)
class Source:
    """One Parquet file: where it is, the name ids are built from, and its row groups as (first row, rows)."""

    storage: Storage
    key: str
    name: str
    row_groups: tuple[tuple[int, int], ...]

    @property
    def rows(self) -> int:
        return sum(n for _, n in self.row_groups)

    def open(self) -> pq.ParquetFile:
        return pq.ParquetFile(self.storage.open_input(self.key))


def _has_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _glob_base(pattern: str) -> str:
    """The folder part of a pattern before its first wildcard: `in/sub/*.parquet` -> `in/sub`."""
    return pattern[: min(pattern.find(c) for c in "*?[" if c in pattern)].rpartition("/")[0]


def _glob_regex(pattern: str) -> re.Pattern:
    """Shell-style matching on keys as glob.glob does on paths: `*` and `?` stay within a folder, `**` crosses them."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[" and "]" in pattern[i + 1 :]:
            end = pattern.index("]", i + 1)
            out, i = out + "[" + pattern[i + 1 : end].replace("!", "^", 1) + "]", end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def _listed(name: str) -> bool:
    """Whether a file found below a folder or prefix is input: not one whose path below it has a part that starts
    with `.` or `_` (`.ipynb_checkpoints/`, Spark's `_temporary/`, `_SUCCESS`: the convention pyarrow's datasets
    and Spark follow)."""
    return not any(part.startswith((".", "_")) for part in name.split("/"))


def _globbed(pattern: str, name: str) -> bool:
    """Whether a file a glob matched is input: a hidden part of its path (one that starts with `.` or `_`, as
    `_listed`) only where the pattern names it with a part of its own that starts so (`in/_tmp/*.parquet`), not
    through a wildcard: `in/**/*.parquet` skips Spark's `_temporary/` and `_SUCCESS`, as glob.glob skips `.` names."""
    named = [segment for segment in pattern.split("/") if segment.startswith((".", "_"))]
    hidden = (part for part in name.split("/") if part.startswith((".", "_")))
    return all(any(fnmatch.fnmatchcase(part, segment) for segment in named) for part in hidden)


def _manifests(out: str) -> str:
    """Where the job's manifest parts under `out` are: the only Parquet files it writes there."""
    from .manifest import MANIFEST_DIR

    return out.rstrip("/") + "/" + MANIFEST_DIR


def _inside(location: str, folder: str) -> bool:
    return location == folder or location.startswith(folder.rstrip("/") + "/")


def find_files(prompts: str, out: str | None = None, attempts: int = 10) -> tuple[Storage, list[tuple[str, str]]]:
    """(storage, [(key, name)]) for a file, a folder, a glob or an s3:// URI of any of those. The job's own manifest
    parts (Parquet too), found under `out`, are not input; a file named as the input is. `attempts`: per S3 request
    (storage_attempts), here and in the read tasks, which take this storage."""
    if is_s3(prompts):
        bucket, _, path = prompts[len("s3://") :].partition("/")
        storage = S3Storage(f"s3://{bucket}", attempts)
        # An existing object first, whatever its name ends with (as a local file): a key may hold [ or * itself.
        if path and not path.endswith("/") and storage.exists(path):
            base, keys = path.rpartition("/")[0], [path]
        elif _has_glob(path):
            base, regex = _glob_base(path), _glob_regex(path)
            keys = [k for k, _ in storage.list(base) if regex.match(k) and _globbed(path, k)]
        else:
            base = path.strip("/")
            keys = [k for k, _ in storage.list(base) if k.endswith(".parquet") and _listed(k[len(base) :])]
        strip = len(base) + 1 if base else 0
        found = [(k, k[strip:]) for k in sorted(keys)]
        if out and is_s3(out) and keys != [path]:
            found = [(k, n) for k, n in found if not _inside(storage.location(k), _manifests(out))]
    else:
        pattern = os.path.expanduser(prompts)
        path = Path(pattern)
        if path.is_file():  # an existing path first: a name may hold [ or * itself
            base, files = path.parent, [path]
        elif path.is_dir():
            base = path
            files = sorted(
                p for p in path.rglob("*.parquet") if p.is_file() and _listed(p.relative_to(base).as_posix())
            )
        elif _has_glob(pattern):
            base = Path(_glob_base(pattern) or ".")
            matched = sorted(glob.glob(pattern, recursive=True))
            files = [Path(f) for f in matched if Path(f).is_file() and _globbed(pattern, Path(f).as_posix())]
        else:
            raise InputError(f"prompts: {prompts}: no such file or folder")
        # Keys are the files' paths below the base as written, not as resolved: a file or folder that is a link
        # to somewhere else is read where it appears.
        root = os.path.abspath(base)
        storage = LocalStorage(root)
        found = [(Path(os.path.relpath(os.path.abspath(f), root)).as_posix(),) * 2 for f in files]
        if out and not is_s3(out) and not path.is_file():
            mine = os.path.realpath(os.path.expanduser(out))  # (as LocalStorage resolves it)
            found = [(k, n) for k, n in found if not _inside(os.path.realpath(os.path.join(root, k)), _manifests(mine))]
    if not found:
        raise InputError(f"prompts: {prompts}: no Parquet files found")
    return storage, found


@dataclass
class Plan:
    """What the job will render, known before it starts."""

    sources: list[Source]
    rows: int
    images: int
    image_hashes: np.ndarray  # sorted uint64, one per image to account for
    extra: pa.Schema  # the input's other columns, carried to the manifest
    # file name -> prompts_digest, for the files without ids (Source.rows has their rows)
    positional: dict[str, str] = dataclasses.field(default_factory=dict)


def image_hash(id_: str, image_index: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{id_}\0{image_index}".encode(), digest_size=8).digest(), "little")


def contains(sorted_hashes: np.ndarray, h: int) -> bool:
    """Is the image hash `h` in a sorted uint64 array (the resume's done set, the plan's images)?"""
    return bool(contained(sorted_hashes, np.array([h], np.uint64))[0])


def contained(sorted_hashes: np.ndarray, hs: np.ndarray) -> np.ndarray:
    """`contains` for an array of hashes at once: a bool per hash."""
    if not len(sorted_hashes):
        return np.zeros(len(hs), dtype=bool)
    pos = np.searchsorted(sorted_hashes, hs)
    return (pos < len(sorted_hashes)) & (sorted_hashes[np.minimum(pos, len(sorted_hashes) - 1)] == hs)


def hashes(pairs: Iterator[tuple[str, int]]) -> np.ndarray:
    return np.fromiter((image_hash(i, k) for i, k in pairs), dtype=np.uint64)


def row_id(value, source_name: str, row: int) -> str:
    if value is None:
        return f"{source_name}:{row}"
    return str(value)


def image_count(value, default: int) -> int:
    """Images a row renders; an invalid num_images still accounts for one (error) row."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and 1 <= value <= MAX_NUM_IMAGES:
        return value
    return 1


PLAN_THREADS = 8  # files planned at once: each costs a few requests' latency on S3 (about 0.2 s), little CPU
PLAN_ROWS = 4_000_000  # rows whose ids are held at once while planning, as Python strings (~250 B a row): ~1 GB


class _RowBudget:
    """Bounds the rows whose ids the planning threads hold at once; a file larger than the budget runs alone."""

    def __init__(self, rows: int):
        self.rows, self.held = rows, 0
        self.changed = threading.Condition()

    @contextmanager
    def hold(self, rows: int):
        with self.changed:
            self.changed.wait_for(lambda: self.held == 0 or self.held + rows <= self.rows)
            self.held += rows
        try:
            yield
        finally:
            with self.changed:
                self.held -= rows
                self.changed.notify_all()


@dataclass(frozen=True)
class _Planned:
    source: Source
    schema: pa.Schema
    hashes: np.ndarray  # of its images, unsorted
    images: int
    digest: str | None  # prompts_digest, for a file without ids


def _plan_file(storage: Storage, key: str, name: str, default: int, budget: _RowBudget) -> _Planned:
    """One file's checks and image ids (in a planning thread)."""
    where = storage.location(key)
    with _open_parquet(storage, key) as pf:
        schema = pf.schema_arrow
        _check_schema(schema, where, {})  # this file alone; plan() checks the extra columns across files
        groups, first = [], 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            groups.append((first, n))
            first += n
        with budget.hold(first):
            try:
                columns = [c for c in ID_COLUMNS if c in schema.names]
                table = pf.read(columns=columns) if columns else None
                ids, counts = _ids_and_counts_of(table, name, 0, first, default)
                # Where any row's id is its position (no id column, or a null in it), rows inserted, removed or
                # reordered would give images made to other prompts: the digest lets a resume tell (see generate).
                positions = "id" not in schema.names or table.column("id").null_count > 0
                digest = prompts_digest(pf) if positions else None
            except UnicodeDecodeError:
                raise InputError(f"prompts: {where}: {_not_text(pf.read(columns=['id']), 'id')}") from None
            except (pa.ArrowException, OSError) as e:
                raise InputError(f"prompts: {where}: {unreadable(e)}") from None
            image_ids = hashes((i, k) for i, c in zip(ids, counts) for k in range(c))
    return _Planned(Source(storage, key, name, tuple(groups)), schema, image_ids, sum(counts), digest)


def plan(config: JobConfig) -> Plan:
    """Find and check the inputs, and count the images: everything that can fail before a model loads. The files are
    read PLAN_THREADS at a time (on S3 each costs a few requests' round trips, not CPU), their results taken in order,
    so the first bad file in order is the one named. A refusal by the storage (a missing bucket, credentials) is an
    InputError; an outage past the retries stays a StorageError, which a rerun may not meet."""
    try:
        storage, files = find_files(config.prompts, config.out, config.storage_attempts)
    except StorageRefused as e:
        raise InputError(f"prompts: {e}") from None
    sources, extra_fields, positional = [], {}, {}
    image_ids: list[np.ndarray] = []
    rows = images = 0
    budget = _RowBudget(PLAN_ROWS)
    with ThreadPoolExecutor(PLAN_THREADS, thread_name_prefix="plan") as pool:
        planned = [pool.submit(_plan_file, storage, key, name, config.num_images, budget) for key, name in files]
        try:
            for future in planned:
                done = future.result()
                _check_schema(done.schema, storage.location(done.source.key), extra_fields)
                sources.append(done.source)
                if done.digest is not None:
                    positional[done.source.name] = done.digest
                image_ids.append(done.hashes)
                rows += done.source.rows
                images += done.images
        finally:
            for future in planned:
                future.cancel()  # after an error: the files not started yet
    if rows == 0:
        raise InputError(f"prompts: {config.prompts}: no rows (every file is empty)")
    all_images = np.sort(np.concatenate(image_ids))
    repeated = all_images[1:][all_images[1:] == all_images[:-1]]
    if len(repeated):
        _report_duplicate(sources, config.num_images)
    return Plan(sources, rows, images, all_images, pa.schema(list(extra_fields.values())), positional)


def prompts_digest(pf: pq.ParquetFile, rows: int | None = None) -> str:
    """A digest of a file's prompts in their order (of its first `rows` rows; all by default): their bytes,
    unchecked, and which are null, read a batch at a time. Rows without an id are known by their position, so a file
    whose rows were inserted, removed or reordered gives other prompts the ids of images already made: this tells a
    resume that the file changed. Three streams, each the same however the rows fall into batches: which are null,
    the lengths, the bytes."""
    nulls, lengths, data = (hashlib.blake2b(digest_size=8) for _ in range(3))
    left = pf.metadata.num_rows if rows is None else rows
    for batch in pf.iter_batches(batch_size=65536, columns=["prompt"]):
        if left <= 0:
            break
        column = batch.column(0).slice(0, left)
        if pa.types.is_dictionary(column.type):  # (pandas' categorical prompts)
            column = column.dictionary_decode()
        column = column.cast(pa.large_binary())
        left -= len(column)
        nulls.update(column.is_null().to_numpy(zero_copy_only=False).astype(np.uint8).tobytes())
        column = column.fill_null(b"")
        offsets = np.frombuffer(column.buffers()[1], np.int64)[column.offset : column.offset + len(column) + 1]
        lengths.update(np.diff(offsets).tobytes())
        if column.buffers()[2] is not None and len(column):
            data.update(memoryview(column.buffers()[2])[offsets[0] : offsets[-1]])
    return hashlib.blake2b(b"".join(d.digest() for d in (nulls, lengths, data)), digest_size=8).hexdigest()


def changed_positions(plan: Plan, recorded: dict[str, set[tuple[str, int]]]) -> list[str]:
    """The files without ids whose prompts differ from what earlier runs recorded (`recorded`: file name -> the
    (prompts_digest, rows) of each run): rows inserted, removed, reordered or edited. Rows appended are no change:
    the first rows, which those runs rendered, are as they were."""
    changed = []
    for source in plan.sources:
        if source.name not in plan.positional or source.name not in recorded:
            continue
        now = (plan.positional[source.name], source.rows)
        for digest, rows in recorded[source.name]:
            if digest == now[0] and rows in (now[1], None):
                continue
            if not (isinstance(rows, int) and rows < source.rows):
                changed.append(source.name)
                break
            with source.open() as pf:  # (rows appended since: the rows that run rendered must be as they were)
                if prompts_digest(pf, rows) != digest:
                    changed.append(source.name)
                    break
    return changed


def _open_parquet(storage: Storage, key: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(storage.open_input(key))
    except StorageRefused as e:
        raise InputError(f"prompts: {e}") from None
    except StorageNotFound as e:  # listed, then removed: the input changed under the job
        raise InputError(f"prompts: {e} (removed since the prompts were listed)") from None
    except (pa.ArrowException, OSError) as e:  # (an outage is a StorageError, not these: it goes up as it is)
        raise InputError(f"prompts: {storage.location(key)} is not a readable Parquet file: {e}") from None


def _check_schema(schema: pa.Schema, where: str, extra_fields: dict[str, pa.Field]) -> None:
    """Column names and types; the other columns join extra_fields (renamed input_<name> if the name is taken)."""
    if "prompt" not in schema.names:
        raise InputError(f"prompts: {where} has no 'prompt' column (columns: {', '.join(schema.names) or 'none'})")
    known = {"prompt": STRING, **PARAMETERS}
    for field in schema:
        if field.name == "id":
            if not (_accepts(STRING, field.type) or pa.types.is_integer(field.type)):
                raise InputError(f"prompts: {where}: column 'id' has type {field.type}; use strings or integers")
        elif field.name in known:
            kind = known[field.name]
            if not _accepts(kind, field.type):
                allowed = {STRING: "strings", INTEGER: "integers", NUMBER: "numbers"}[kind]
                raise InputError(f"prompts: {where}: column {field.name!r} has type {field.type}; use {allowed}")
        else:
            out = carried_name(field.name)
            previous = extra_fields.get(out)
            carried = _carried_type(field.type)
            if previous is None or pa.types.is_null(previous.type):
                extra_fields[out] = pa.field(out, carried)
            elif {previous.type, carried} == {pa.int64(), pa.float64()}:
                # pandas writes an integer column with a missing value as floats: the same column is int64 in the
                # files without one. Both are carried as floats, as pandas would read them together.
                extra_fields[out] = pa.field(out, pa.float64())
            elif previous.type != carried and not pa.types.is_null(field.type):
                raise InputError(
                    f"prompts: {where}: column {field.name!r} has type {field.type}, "
                    f"but {previous.type} in an earlier file"
                )


def _carried_type(t: pa.DataType) -> pa.DataType:
    """The manifest's type for an extra input column: the families of text, bytes, integers and floats each as one
    type, so that files written by different tools (pandas' string, polars' large_string, int32 beside int64) can
    make up one input; any other type is carried as it is and must be the same in every file. A dictionary-encoded
    column (pandas' categorical) is carried as its values' type: its rows are read as their values."""
    if pa.types.is_dictionary(t):
        return _carried_type(t.value_type)
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pa.string()
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return pa.binary()
    if pa.types.is_signed_integer(t) or (pa.types.is_unsigned_integer(t) and t.bit_width < 64):
        return pa.int64()
    if pa.types.is_floating(t):
        return pa.float64()
    return t


ID_COLUMNS = ("id", "num_images")


def unreadable(e: BaseException) -> str:
    said = " ".join(str(e).split())  # one line: pyarrow's messages can hold several
    return f"the file cannot be read ({type(e).__name__}: {said}); it is damaged: replace it"


class NotText(bytes):
    """A text value whose bytes are not UTF-8 (web-scraped captions can hold such): its row becomes an error row,
    where decoding would have refused the whole table it came in."""


def _values(column: pa.ChunkedArray) -> list:
    try:
        return column.to_pylist()
    except UnicodeDecodeError:  # one value at a time, only for a column that holds such a value
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            raw = column.cast(pa.large_binary()).to_pylist()  # the same bytes, not checked
            return [None if v is None else _text(v) for v in raw]
        return [_scalar(column, i) for i in range(len(column))]


def _text(data: bytes) -> str | NotText:
    try:
        return data.decode()
    except UnicodeDecodeError:
        return NotText(data)


def _scalar(column: pa.ChunkedArray, i: int):
    try:
        return column[i].as_py()
    except UnicodeDecodeError:
        return NotText(b"")


def table_rows(table: pa.Table) -> list[dict]:
    """`table.to_pylist()`, with a `NotText` for each text value that is not UTF-8 (to_pylist refuses the table)."""
    columns = [_values(c) for c in table.columns]
    return [dict(zip(table.column_names, values)) for values in zip(*columns)]


def _not_text(table: pa.Table, column: str) -> str:
    """The message for a column whose values are not all UTF-8: which row is the first such."""
    row = next(r for r, v in enumerate(_values(table.column(column))) if isinstance(v, NotText))
    return f"column {column!r}, row {row}: not UTF-8 text; ids must be text"


def _ids_and_counts(pf: pq.ParquetFile, name: str, rows: int, default: int) -> tuple[list[str], list[int]]:
    """Every row's id and image count, reading only the id and num_images columns."""
    columns = [c for c in ID_COLUMNS if c in pf.schema_arrow.names]
    return _ids_and_counts_of(pf.read(columns=columns) if columns else None, name, 0, rows, default)


def _ids_and_counts_of(table: pa.Table | None, name: str, first_row: int, rows: int, default: int):
    """The ids and image counts of `rows` rows (from `first_row` of file `name`) of a table of ID_COLUMNS."""
    names = table.column_names if table is not None else []
    raw_ids = table.column("id").to_pylist() if "id" in names else [None] * rows
    raw_counts = table.column("num_images").to_pylist() if "num_images" in names else [None] * rows
    ids = [row_id(v, name, first_row + r) for r, v in enumerate(raw_ids)]
    return ids, [image_count(v, default) for v in raw_counts]


def _report_duplicate(sources: list[Source], default: int) -> None:
    """Find the first repeated id (only on this error path, so the scan above keeps no strings) and raise."""
    seen: dict[str, str] = {}
    for source in sources:
        ids, _ = _ids_and_counts(source.open(), source.name, source.rows, default)
        for row, id_ in enumerate(ids):
            where = f"{source.storage.location(source.key)} row {row}"
            if id_ in seen:
                raise InputError(
                    f"prompts: duplicate id {id_!r}: {seen[id_]} and {where}; ids must be unique "
                    "(each id names its images' keys)"
                )
            seen[id_] = where


# --- keys ------------------------------------------------------------------------------------------------------------

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_HASHED = re.compile(r"-[0-9a-f]{16}$")  # how a name that had to change ends


def image_key(id_: str, image_index: int, ext: str) -> str:
    """`images/{2 hex}/{name}-{i}.{ext}`: inside the output prefix whatever the id holds (no `/` survives), short
    enough for S3, spread over 256 prefixes. An id that had to change gets a hash of the original, so two different
    ids never share a key; so does an id that already ends as such a name does (`cat_71-9d41d0b745506c75` would
    otherwise be the key of `cat/71`)."""
    digest = hashlib.blake2b(id_.encode(), digest_size=8).hexdigest()
    name = _UNSAFE.sub("_", id_)
    if name.startswith("."):
        name = "_" + name[1:]
    if name != id_ or len(name) > KEY_NAME_MAX or not name or _HASHED.search(name):
        name = f"{name[: KEY_NAME_MAX - 17]}-{digest}"
    return f"images/{digest[:2]}/{name}-{image_index}.{ext}"


def image_seed(row_seed, job_seed: int, id_: str, image_index: int) -> int:
    if row_seed is None:
        digest = hashlib.blake2b(f"{job_seed}\0{id_}\0{image_index}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") & MAX_SEED
    return row_seed + image_index


# --- expansion (runs in Ray Data read tasks) ----------------------------------------------------------------------

IMAGE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image_index", pa.int64()),
        ("prompt", pa.string()),
        ("negative_prompt", pa.string()),
        ("seed", pa.int64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("prior_steps", pa.int64()),
        ("prior_cfg", pa.float64()),
        ("decoder_steps", pa.int64()),
        ("decoder_cfg", pa.float64()),
        ("sampler", pa.string()),
        ("key", pa.string()),
        ("source", pa.string()),
        ("row", pa.int64()),
        ("error", pa.string()),
    ]
)


def _number(name: str, value, default, integer: bool):
    """A row's value for a parameter, or raise ValueError naming it."""
    if value is None or (isinstance(value, float) and math.isnan(value) and integer):
        return default
    if integer:
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f"{name}: {value!r} is not allowed; use an integer")
            value = int(value)
        return value
    return float(value)


def expand_row(row: dict, source: str, index: int, config: JobConfig, geometry: Geometry = OFFICIAL) -> list[dict]:
    """One input row -> one dict per image. An invalid row gives one dict with `error` per image it asks for (one
    where num_images itself is invalid): as many as `plan` counted, so the job accounts for every one."""
    id_ = row_id(row.get("id"), source, index)
    base = {"id": id_, "source": source, "row": index, "sampler": config.sampler}
    raw_count = row.get("num_images")
    count = image_count(raw_count, config.num_images)
    try:
        for name, value in row.items():
            if isinstance(value, NotText):
                raise ValueError(f"{name}: not UTF-8 text")
        prompt = row.get("prompt")
        if prompt is None:
            raise ValueError("prompt: missing (null)")
        if not prompt.strip():
            raise ValueError("prompt: empty")
        given = raw_count is not None and not (isinstance(raw_count, float) and math.isnan(raw_count))
        if given and count == 1 and raw_count != 1:
            raise ValueError(f"num_images: {raw_count!r} is not allowed; use an integer from 1 to {MAX_NUM_IMAGES}")
        negative = row.get("negative_prompt")
        sampler = config.sampler if row.get("sampler") is None else row["sampler"]
        values = {
            name: _number(name, row.get(name), getattr(config, name), kind == INTEGER)
            for name, kind in PARAMETERS.items()
            if kind != STRING and name not in ("seed", "num_images")
        }
        row_seed = _number("seed", row.get("seed"), None, True)
        if row_seed is not None and not 0 <= row_seed <= MAX_SEED:
            raise ValueError(f"seed: {row_seed!r} is not allowed; use an integer from 0 to 2**63 - 1")
    except (ValueError, TypeError, OverflowError) as e:
        prompt = row.get("prompt")
        if isinstance(prompt, NotText):
            prompt = None
        return [{**base, "image_index": k, "prompt": prompt, "error": str(e)} for k in range(count)]
    images = []
    for k in range(count):
        seed = image_seed(row_seed, config.seed, id_, k)
        request = Request(
            prompt=prompt,
            negative_prompt=config.negative_prompt if negative is None else negative,
            seed=seed,
            sampler=sampler,
            **values,
        )
        image = {**base, **request.__dict__, "image_index": k, "key": None, "error": None}
        try:
            validate(request, geometry)
            image["key"] = image_key(id_, k, config.image_format)
        except ValueError as e:
            image["error"] = str(e)
            for name in ("seed", *values):  # keep only values that fit the manifest's types
                v = image[name]
                if isinstance(v, int) and not -(2**63) <= v < 2**63:
                    image[name] = None
                if isinstance(v, float) and not math.isfinite(v):
                    image[name] = None
        images.append(image)
    return images


def _taken(name: str) -> bool:
    """Whether an input column of this name must be renamed: a name the pipeline uses, or input_ + a taken name (so
    that `key` and `input_key` in one input come out as `input_key` and `input_input_key`, not both as the first)."""
    return name in RESERVED or (name.startswith("input_") and _taken(name.removeprefix("input_")))


def carried_name(name: str) -> str:
    """The manifest column that carries the input column `name`."""
    return f"input_{name}" if _taken(name) else name


def _input_column(out_name: str) -> str:
    """The input column an extra manifest column comes from: carried_name's inverse."""
    name = out_name.removeprefix("input_")
    return name if name != out_name and _taken(name) else out_name


def read_fragments(
    items: pa.Table,
    sources: list[Source],
    config: JobConfig,
    extra: pa.Schema,
    done: np.ndarray,
    geometry: Geometry = OFFICIAL,
    chunk_rows: int = 64,
) -> Iterator[pa.Table]:
    """A Ray Data UDF: read (source, row group) work items and yield small tables of images still to render, each
    bucket's images in runs of whole batches (`bucket_runs`).

    Small output blocks keep the stages streaming: an actor stage emits one block per input block (platform notes).
    """
    schema = pa.schema(list(IMAGE_SCHEMA) + list(extra))
    carried = [(f.name, _input_column(f.name), pa.types.is_floating(f.type)) for f in extra]

    def images() -> Iterator[dict]:
        for item in items.to_pylist():
            source = sources[item["source"]]
            try:
                table = read_rows(source.open(), item["row_group"], item["start"], item["stop"])
            except (pa.ArrowException, OSError) as e:  # a damaged page, found only now: the plan reads footers
                first = item["first_row"]
                where = f"{source.storage.location(source.key)} rows {first} to {first + item['stop'] - item['start']}"
                raise InputError(f"prompts: {where}: {unreadable(e)}") from None
            for offset, row in enumerate(table_rows(table)):
                for image in expand_row(row, source.name, item["first_row"] + offset, config, geometry):
                    if contains(done, image_hash(image["id"], image["image_index"])):
                        continue
                    for out_name, in_name, floating in carried:
                        value = row.get(in_name)
                        if isinstance(value, NotText):
                            value = None
                        elif floating and isinstance(value, int):  # (joined with floats: Arrow refuses ints past 2**53)
                            value = float(value)
                        image[out_name] = value
                    yield image

    unit = batch_unit(config.prior_pool.batch_size, config.decoder_pool.batch_size)
    for chunk in bucket_runs(images(), unit, max(chunk_rows, unit)):
        yield pa.Table.from_pylist(chunk, schema=schema)


def batch_unit(prior_batch: int, decoder_batch: int, most: int = 1024) -> int:
    """The run length that makes both pools' batches hold one bucket: a multiple of both batch sizes, or the Stage C
    pool's batch when that multiple is over `most` rows."""
    both = math.lcm(prior_batch, decoder_batch)
    return both if both <= most else prior_batch


def _bucket(image: dict) -> tuple | None:
    """What a batch must share (cascade.request.Request.bucket); None for an error row, which needs no work."""
    if image["error"] is not None:
        return None
    return Request(**{k: image[k] for k in REQUEST_FIELDS}).bucket()


def bucket_runs(images: Iterator[dict], unit: int, chunk_rows: int) -> Iterator[list[dict]]:
    """The images regrouped into chunks in which each bucket's images (size, steps, cfg) come in runs of `unit`.

    Ray Data cuts the reader's output into blocks of a pool's batch size, one after another, and a pool's actor runs
    one model batch per bucket in a block: interleaved sizes or steps would make most batches smaller than asked
    (three buckets at batch 4: a third of the images per batch). So every chunk but the last is a whole number of
    runs, which keeps the blocks' boundaries on the runs'. A bucket's images wait here until they fill a run; when
    `chunk_rows` images are waiting and none fills one (many buckets), runs of mixed buckets go, grouped by bucket.
    Within a bucket the input order is kept."""
    waiting: dict[tuple | None, list[dict]] = {}
    held = 0
    for image in images:
        waiting.setdefault(_bucket(image), []).append(image)
        held += 1
        if held < chunk_rows:
            continue
        chunk = []
        for group in waiting.values():
            whole = len(group) - len(group) % unit
            chunk += group[:whole]
            del group[:whole]
        if held - len(chunk) >= chunk_rows:  # a chunk's worth in buckets that fill no run: send it in mixed runs
            rest = [image for group in waiting.values() for image in group]
            whole = len(rest) - len(rest) % unit
            chunk += rest[:whole]
            waiting = {}
            for image in rest[whole:]:
                waiting.setdefault(_bucket(image), []).append(image)
        waiting = {key: group for key, group in waiting.items() if group}
        held -= len(chunk)
        yield chunk
    rest = [image for group in waiting.values() for image in group]
    if rest:
        yield rest


def read_rows(pf: pq.ParquetFile, row_group: int, start: int, stop: int, columns: list[str] | None = None) -> pa.Table:
    """Rows `start` to `stop` of a row group, decoded only as far as `stop`. A prompts file written in one large row
    group (pandas writes up to about a million rows to one) is cut into many segments, and decoding the whole group
    for each one took 10 times as long: 0.29 s against 0.03 s for 20,000 rows in the middle of a million."""
    batches, at = [], 0
    for batch in pf.iter_batches(batch_size=8192, row_groups=[row_group], columns=columns):
        if at + batch.num_rows > start:
            batches.append(batch.slice(max(0, start - at), stop - max(at, start)))
        at += batch.num_rows
        if at >= stop:
            break
    schema = pf.schema_arrow if columns is None else pa.schema([pf.schema_arrow.field(c) for c in columns])
    return pa.Table.from_batches(batches, schema=schema)


def segments(sources: list[Source], rows_per_segment: int) -> list[list[dict]]:
    """The input cut into segments of about `rows_per_segment` rows, each a list of work items: a row range of one
    row group (`first_row` is the range's first row in its file). The job runs one Ray Data execution per segment."""
    found: list[list[dict]] = [[]]
    filled = 0
    for i, s in enumerate(sources):
        for g, (first, n) in enumerate(s.row_groups):
            start = 0
            while start < n:
                stop = min(n, start + rows_per_segment - filled)
                item = {"source": i, "row_group": g, "first_row": first + start, "start": start, "stop": stop}
                found[-1].append(item)
                filled += stop - start
                start = stop
                if filled == rows_per_segment:
                    found.append([])
                    filled = 0
    return [segment for segment in found if segment]


def pending_images(sources: list[Source], segment: list[dict], default: int, done: np.ndarray) -> int:
    """How many images of a segment are still to render (reading only the id and num_images columns)."""
    pending = 0
    for item in segment:
        source = sources[item["source"]]
        pf = source.open()
        columns = [c for c in ID_COLUMNS if c in pf.schema_arrow.names]
        n = item["stop"] - item["start"]
        table = read_rows(pf, item["row_group"], item["start"], item["stop"], columns) if columns else None
        ids, counts = _ids_and_counts_of(table, source.name, item["first_row"], n, default)
        images = hashes((id_, k) for id_, c in zip(ids, counts) for k in range(c))
        pending += int(len(images) - contained(done, images).sum())
    return pending
