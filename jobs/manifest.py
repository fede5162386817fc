"""Manifests and the commit protocol.

Layout under `{out}`:
- `images/..`: the images, at keys fixed by (id, image_index).
- `manifests/part-{run}-{n}.parquet`: one row per image, written after those images are stored, never overwritten
  (conditional writes; each run has its own id).
- `_SUCCESS`: a JSON summary, written last and only when every image of the input is accounted for.

Resume reads the manifests: an image counts as done when a manifest row says `ok` and storage lists its key with the
recorded size (with `verify`, also holding bytes of the recorded sha256), or the row says `error` (unless errors are
retried). Everything else is rendered again.
"""

from __future__ import annotations

import io
import json
import secrets
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from workers.storage import Storage, StorageError, sha256_hex

from .inputs import contained, hashes

MANIFEST_DIR = "manifests"
SUCCESS = "_SUCCESS"
REPORT = "report.html"
OUTPUT_DIRS = ("images", "shards", MANIFEST_DIR)


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


SETTINGS = b"cascade.settings"  # a part's metadata key: the image settings of the run that wrote it (JSON)
INPUTS = b"cascade.inputs"  # and [prompts_digest, rows] of the files without ids that its rows came from (JSON)


class ManifestWriter:
    """Buffers manifest rows and writes a part every `rows` rows or `seconds` seconds, whichever comes first. Each
    part records `settings` (the run's image settings) in its metadata, and what `inputs` says (file name ->
    [prompts_digest, rows], for files whose ids are positions) of the files its rows came from."""

    def __init__(
        self,
        storage: Storage,
        run_id: str,
        rows: int,
        seconds: float,
        settings: dict | None = None,
        inputs: dict[str, list] | None = None,
        guard: Callable[[], None] | None = None,
    ):
        self.storage, self.run_id, self.rows, self.seconds = storage, run_id, rows, seconds
        self.guard = guard  # called before each part is written: raises if this run may no longer write (the lease)
        self.settings = json.dumps(settings or {}, sort_keys=True).encode()
        self.inputs = inputs or {}
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.parts: list[str] = []
        self.last = time.monotonic()

    def add(self, table: pa.Table) -> None:
        table = table.append_column("run_id", pa.array([self.run_id] * table.num_rows, pa.string()))
        self.buffer.append(table)
        self.buffered += table.num_rows
        if self.buffered >= self.rows or time.monotonic() - self.last >= self.seconds:
            self.flush()

    def flush(self, everything: bool = False) -> None:
        """Write the rows buffered, less those of shards whose other rows have not come yet: they wait for the next
        part. (A run that stops meanwhile leaves such a shard named by no row: the resume deletes it and renders its
        images again. Written, its rows would name a shard holding samples the resume renders again elsewhere.)
        `everything`: the run has ended with every row in, so write all."""
        self.last = time.monotonic()
        if not self.buffer:
            return
        table = pa.concat_tables(self.buffer, promote_options="permissive")
        table, held = (table, table.slice(0, 0)) if everything else _whole_shards(table)
        if not table.num_rows:
            return
        metadata = {**(table.schema.metadata or {}), SETTINGS: self.settings}
        if self.inputs and "source" in table.column_names:
            names = pc.unique(table.column("source")).drop_null().to_pylist()
            metadata[INPUTS] = json.dumps({n: self.inputs[n] for n in names if n in self.inputs}, sort_keys=True)
        table = table.replace_schema_metadata(metadata)
        if self.guard is not None:
            self.guard()
        out = io.BytesIO()
        pq.write_table(table, out, compression="zstd")
        key = f"{MANIFEST_DIR}/part-{self.run_id}-{len(self.parts):06d}.parquet"
        self.storage.put(key, out.getvalue(), if_absent=True, content_type="application/vnd.apache.parquet")
        self.parts.append(key)
        self.buffer, self.buffered = ([held], held.num_rows) if held.num_rows else ([], 0)


def _whole_shards(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(rows to write, rows held): held are the ok rows of each shard fewer of whose rows are here than it holds
    samples (`shard_images`, set by the WebDataset writer)."""
    if "shard_images" not in table.column_names or not table.num_rows:
        return table, table.slice(0, 0)
    ok = pc.and_(pc.equal(table.column("status"), "ok"), pc.is_valid(table.column("key"))).fill_null(False)
    counts = table.filter(ok).group_by("key").aggregate([("key", "count"), ("shard_images", "max")])
    short = counts.filter(pc.less(counts.column("key_count"), counts.column("shard_images_max"))).column("key")
    if not len(short):
        return table, table.slice(0, 0)
    held = pc.and_(ok, pc.is_in(table.column("key"), value_set=short)).fill_null(False)
    return table.filter(pc.invert(held)), table.filter(held)


def manifest_keys(storage: Storage, run_id: str | None = None) -> list[str]:
    """The manifest parts, in order: every run's, or one run's."""
    keys = sorted(k for k, _ in storage.list(MANIFEST_DIR) if k.endswith(".parquet"))
    return [k for k in keys if run_id is None or k.rpartition("/")[2].startswith(f"part-{run_id}-")]


def read_part(storage: Storage, key: str, columns: list[str] | None = None) -> pa.Table:
    """One manifest part, reading only `columns` (those it has) when given. A part that is not Parquet (copied in
    half, edited by hand: the job writes each in one atomic PUT) is a StorageError naming it."""
    data = storage.get(key)  # (its errors are the storage's, as they are)
    try:
        pf = pq.ParquetFile(io.BytesIO(data))
        return pf.read(columns=None if columns is None else [c for c in columns if c in pf.schema_arrow.names])
    except (pa.ArrowInvalid, OSError) as e:  # cut short, or a damaged page or footer (pyarrow's ArrowIOError)
        why = " ".join(str(e).split())  # (pyarrow's messages can end in a newline)
        raise StorageError(
            f"{storage.location(key)}: not a readable manifest part ({why}); move it out of the manifests and run "
            "again: the images it recorded are then rendered (or found stored) again"
        ) from None


def read_manifests(storage: Storage, columns: list[str] | None = None, run_id: str | None = None) -> pa.Table | None:
    """All manifest parts (or one run's) as one table."""
    tables = [read_part(storage, key, columns) for key in manifest_keys(storage, run_id)]
    return pa.concat_tables(tables, promote_options="permissive") if tables else None


@dataclass
class Previous:
    done: np.ndarray  # sorted uint64 image hashes that need no work
    ok: int
    errors: int
    missing: int  # manifest rows whose image is gone or has another size: rendered again
    stale_keys: list[str]  # objects to remove before rendering again: bad ones (size, sha256), shards no row names
    drop: dict[str, list[int]]  # manifest part -> rows to remove, because their image is rendered again
    settings: list[dict] = field(default_factory=list)  # the image settings of the runs that made this input's rows
    repeated: int = 0  # rows dropped as an image's second row (two runs wrote the output at once)
    inputs: dict[str, set[tuple[str, int]]] = field(default_factory=dict)  # file name -> (prompts_digest, rows) seen


# Resume plans on the driver over every stored image (millions, for a dataset), so it works on arrays: per image a
# listed key and size, the manifest row's key while it is looked up in the listing, then about 30 bytes of numbers.
# Python dicts and tuples of the same cost about 1 KB per image.
KEY = pa.large_string()  # a listing of tens of millions of keys outgrows a string array's 2 GB of offsets


def listing(storage: Storage, prefix: str, chunk: int = 100_000, unnamed: list | None = None) -> pa.Table:
    """`storage.list(prefix)` as a table of `key` and `size`, built a chunk at a time. A key that is not UTF-8 (a
    local file name the job did not write) can be named by no manifest row: it goes to `unnamed` instead."""
    tables, keys, sizes = [], [], []

    def add() -> None:
        tables.append(pa.table({"key": pa.array(keys, KEY), "size": pa.array(sizes, pa.int64())}))
        keys.clear()
        sizes.clear()

    for key, size in storage.list(prefix):
        if not key.isascii():
            try:
                key.encode()
            except UnicodeEncodeError:
                if unnamed is not None:
                    unnamed.append(key)
                continue
        keys.append(key)
        sizes.append(size)
        if len(keys) == chunk:
            add()
    add()
    return pa.concat_tables(tables)


def _column(table: pa.Table, name: str, type_: pa.DataType) -> pa.ChunkedArray:
    """A manifest column as `type_`; all nulls when the part has none (`member` in a files layout)."""
    if name not in table.column_names:
        return pa.chunked_array([pa.nulls(table.num_rows, type_)])
    return table.column(name).cast(type_)


@dataclass
class _Rows:
    """The manifest rows of this input's images, one array element per row."""

    part: np.ndarray  # int32: which manifest part
    index: np.ndarray  # int32: the row's index in its part
    hash: np.ndarray  # uint64: image_hash(id, image_index)
    ok: np.ndarray  # bool: status is ok
    image: np.ndarray  # bool: an image object (no shard member), which must have its recorded size
    bytes: np.ndarray  # int64: the recorded size (-1 if none)
    at: np.ndarray  # int64: where the object the row names is in the listing (-1: not there, or an error row)
    checks: pa.Table | None  # with verify: key, member and sha256, for the rows that are ok


_NUMBERS = {"part": np.int32, "index": np.int32, "hash": np.uint64, "ok": bool, "image": bool, "bytes": np.int64}


def _manifest_rows(storage: Storage, parts: list[str], expected: np.ndarray, verify: bool, listed: pa.Array):
    """This input's rows of every part (rows of other inputs are left as they are), where in `listed` the objects
    the other inputs' rows name are (-1: none), and the image settings and input digests recorded by the parts that
    hold this input's rows."""
    columns = ["id", "image_index", "status", "key", "bytes", "member"] + (["sha256"] if verify else [])
    got: dict[str, list] = {f: [] for f in ("part", "index", "hash", "ok", "image", "bytes", "checks", "mine")}
    all_keys, settings, inputs = [], set(), {}
    for p, part in enumerate(parts):
        table = read_part(storage, part, columns)
        keys = _column(table, "key", KEY)
        all_keys.extend(keys.chunks)
        h = hashes(zip(table.column("id").to_pylist(), table.column("image_index").to_pylist()))
        mine = contained(expected, h)
        if mine.any() and SETTINGS in (table.schema.metadata or {}):
            settings.add(table.schema.metadata[SETTINGS])
        if mine.any() and INPUTS in (table.schema.metadata or {}):
            for name, value in json.loads(table.schema.metadata[INPUTS]).items():
                digest, count = value if isinstance(value, list) else (value, None)  # (a bare digest: rows unknown)
                inputs.setdefault(name, set()).add((digest, count))
        ok = pc.equal(_column(table, "status", pa.string()), "ok").fill_null(False).to_numpy()[mine]
        my_keys, member = keys.filter(mine), _column(table, "member", pa.string()).filter(mine)
        got["part"].append(np.full(int(mine.sum()), p, np.int32))
        got["index"].append(np.flatnonzero(mine).astype(np.int32))
        got["hash"].append(h[mine])
        got["ok"].append(ok)
        got["image"].append(pc.is_null(member).to_numpy())
        got["bytes"].append(_column(table, "bytes", pa.int64()).fill_null(-1).to_numpy()[mine])
        got["mine"].append(mine)
        if verify:
            checks = pa.table(
                {
                    "key": my_keys,
                    "member": member,
                    "sha256": _column(table, "sha256", pa.string()).filter(mine),
                }
            )
            got["checks"].append(checks.filter(pa.array(ok)))
    # Every row's key looked up in the listing at once (one hash table of the listing, not one per part); the keys
    # themselves are not needed after this.
    at = pc.index_in(pa.chunked_array(all_keys, KEY), value_set=listed).fill_null(-1).to_numpy()
    mine = np.concatenate(got["mine"]) if got["mine"] else np.zeros(0, bool)
    rows = _Rows(
        **{f: np.concatenate(got[f]) if got[f] else np.zeros(0, t) for f, t in _NUMBERS.items()},
        at=at[mine],
        checks=pa.concat_tables(got["checks"]) if got["checks"] else None,
    )
    return rows, at[~mine], [json.loads(s) for s in sorted(settings)], inputs


def _repeated(hashes_: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """A bool per row: a second (or later) row of one image, of the lowest `rank` first. Two runs writing one output
    at once (unsupported, but a double submit happens) each write a row for every image."""
    order = np.lexsort((rank, hashes_))
    sorted_ = hashes_[order]
    repeated = np.zeros(len(hashes_), dtype=bool)
    repeated[order[1:][sorted_[1:] == sorted_[:-1]]] = True
    return repeated


def previous_work(storage: Storage, expected: np.ndarray, retry_errors: bool, verify: bool = False) -> Previous:
    """What earlier runs finished, checked against a listing of the stored images (and, with `verify`, against the
    sha256 of their bytes)."""
    previous = Previous(np.zeros(0, np.uint64), 0, 0, 0, [], {})
    parts = manifest_keys(storage)
    strays: list[str] = []  # objects no manifest row can name (not UTF-8): orphans, as below
    listed = pa.concat_tables([listing(storage, d, unnamed=strays) for d in ("images", "shards")]).combine_chunks()
    if not parts and not listed.num_rows and not strays:
        return previous
    rows, others, previous.settings, previous.inputs = _manifest_rows(
        storage, parts, expected, verify, listed.column("key")
    )
    at = rows.at
    there = at >= 0
    sizes = np.append(listed.column("size").to_numpy(), -1)[at]  # (at -1 reads the -1 put after the listing)
    # An image object must have its recorded size; a shard only has to be there (its rows give member sizes).
    wrong = ~there | (rows.image & (sizes != rows.bytes))
    bad = np.zeros(listed.num_rows + 1, dtype=bool)  # listed objects to render again (and a last one, never set)
    bad[at[rows.ok & wrong & there]] = True
    if verify and rows.checks is not None:
        checks = rows.checks.filter(pa.array(~wrong[rows.ok]))
        found = mismatched(storage, checks)
        bad[pc.index_in(pa.array(list(found), KEY), value_set=listed.column("key")).fill_null(-1).to_numpy()] = True
    # Every row of a bad key is rendered again: a shard with one bad member goes whole.
    redo = rows.ok & (~there | bad[at])
    # One row per image is kept, a good one where there is one: the others are dropped.
    repeated = _repeated(rows.hash, np.where(redo, 2, np.where(rows.ok, 0, 1)))
    redo &= ~repeated
    good = rows.ok & ~redo & ~repeated
    failed = ~rows.ok & ~repeated
    previous.repeated = int(repeated.sum())
    previous.ok, previous.missing = int(good.sum()), int(redo.sum())
    previous.errors = 0 if retry_errors else int(failed.sum())
    drop = (redo | failed if retry_errors else redo) | repeated
    order = np.argsort(rows.part[drop], kind="stable")  # by part, each part's rows in their order
    dropped_parts, dropped_rows = rows.part[drop][order], rows.index[drop][order]
    starts = np.flatnonzero(np.diff(dropped_parts, prepend=-1))
    for p, these in zip(dropped_parts[starts], np.split(dropped_rows, starts[1:])):
        previous.drop[parts[p]] = these.tolist()
    previous.done = np.unique(rows.hash[good if retry_errors else good | failed])
    # A bad object still stored is removed before it is written again. So is an object no row names (an orphan):
    # stored by a run that stopped before its rows reached a manifest part (at most manifest_seconds of work), or by
    # a run with another layout or format. Nothing records the settings it was made with, and this run's may differ
    # (a new seed, size or prompt), so it is rendered again, not adopted: adopted, its row would describe this run's
    # request beside another run's pixels. A shard's images would also go into a shard of another key (it depends on
    # the batch they fall in), leaving the old one unreferenced, duplicating them.
    named = np.zeros(listed.num_rows + 1, dtype=bool)
    named[others] = True  # (at -1 sets the last, which stands for "not listed")
    named[at[~repeated]] = True
    stale = bad[:-1] | ~named[:-1]
    previous.stale_keys = sorted(set(listed.column("key").filter(pa.array(stale)).to_pylist()) | set(strays))
    return previous


# Image settings added after outputs had been written, with the value every run before them had. A key an earlier
# run did not record is compared as that value; any other missing key is not compared.
ADDED_SETTINGS = {"fp8": False}


def settings_changes(earlier: list[dict], now: dict) -> list[str]:
    """How earlier runs' image settings differ from `now`: e.g. "model 'demo' (now 'tiny')", one per value."""
    changes = []
    for key, value in now.items():
        # A key not recorded and not added later reads as `value`: not compared.
        olds = [old for old in (s.get(key, ADDED_SETTINGS.get(key, value)) for s in earlier) if old != value]
        changes += [f"{key} {old!r} (now {value!r})" for i, old in enumerate(olds) if old not in olds[:i]]
    return changes


def mismatched(storage: Storage, rows: pa.Table, threads: int = 16, chunk: int = 4096) -> set[str]:
    """The keys whose stored bytes (an image, or a shard member) no longer have the manifest's sha256. `rows` has a
    `key`, `member` (null for an image object) and `sha256` per image; keys are checked a chunk at a time, so neither
    the rows nor the pending checks are ever all in Python objects at once."""
    from concurrent.futures import ThreadPoolExecutor

    by_key = rows.group_by("key", use_threads=False).aggregate([("member", "list"), ("sha256", "list")])

    def check(group: dict) -> bool:
        key, names, sums = group["key"], group["member_list"], group["sha256_list"]
        try:
            data = storage.get(key)
        except StorageError:
            return False  # gone since the listing
        if names[0] is None:
            return sha256_hex(data) == sums[0]
        try:
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                members = {m.name: sha256_hex(tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()}
        except tarfile.TarError:
            return False  # truncated or corrupt: none of its members can be trusted
        return all(members.get(name) == sha for name, sha in zip(names, sums))

    found = set()
    with ThreadPoolExecutor(threads) as pool:
        for start in range(0, by_key.num_rows, chunk):
            groups = by_key.slice(start, chunk).to_pylist()
            found |= {g["key"] for g, good in zip(groups, pool.map(check, groups)) if not good}
    return found


def drop_rows(storage: Storage, drop: dict[str, list[int]]) -> None:
    """Rewrite manifest parts without the rows of images that will be rendered again, so no image ever has two rows.

    Each part is replaced in place (one atomic PUT): a crash leaves either the old part, which the next resume
    repairs the same way, or the new one; never a duplicate and never a lost row.
    """
    for part, rows in drop.items():
        table = read_part(storage, part)
        keep = np.ones(table.num_rows, dtype=bool)
        keep[rows] = False
        if not keep.any():
            storage.delete([part])
            continue
        out = io.BytesIO()
        pq.write_table(table.filter(pa.array(keep)), out, compression="zstd")
        storage.put(part, out.getvalue(), content_type="application/vnd.apache.parquet")


def remove_marks(storage: Storage) -> list[str]:
    """Remove _SUCCESS and the report of the run it describes, in a delete of their own, before the output changes:
    a crash part way through must not leave them over a partial output. Returns the keys removed."""
    marks = [k for k in (SUCCESS, REPORT) if storage.exists(k)]
    if marks:
        storage.delete(marks)
    return marks


def clear_outputs(storage: Storage) -> int:
    """--overwrite: remove what earlier runs wrote (only the job's own files), so the job starts over."""
    marks = remove_marks(storage)
    keys = [k for d in OUTPUT_DIRS for k, _ in storage.list(d)]
    storage.delete(keys)
    return len(marks) + len(keys)


def write_success(storage: Storage, summary: dict) -> None:
    data = json.dumps(summary, indent=2, sort_keys=True, default=str).encode()
    storage.put(SUCCESS, data, content_type="application/json")


def read_success(storage: Storage) -> dict | None:
    try:
        return json.loads(storage.get(SUCCESS))
    except StorageError:
        return None
