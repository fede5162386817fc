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
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from workers.storage import Storage, StorageError, sha256_hex

from .inputs import contains, image_hash

MANIFEST_DIR = "manifests"
SUCCESS = "_SUCCESS"
REPORT = "report.html"
OUTPUT_DIRS = ("images", "shards", MANIFEST_DIR)


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


class ManifestWriter:
    """Buffers manifest rows and writes a part every `rows` rows or `seconds` seconds, whichever comes first."""

    def __init__(self, storage: Storage, run_id: str, rows: int, seconds: float):
        self.storage, self.run_id, self.rows, self.seconds = storage, run_id, rows, seconds
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

    def flush(self) -> None:
        self.last = time.monotonic()
        if not self.buffer:
            return
        table = pa.concat_tables(self.buffer, promote_options="permissive")
        out = io.BytesIO()
        pq.write_table(table, out, compression="zstd")
        key = f"{MANIFEST_DIR}/part-{self.run_id}-{len(self.parts):06d}.parquet"
        self.storage.put(key, out.getvalue(), if_absent=True, content_type="application/vnd.apache.parquet")
        self.parts.append(key)
        self.buffer, self.buffered = [], 0


def manifest_keys(storage: Storage) -> list[str]:
    return sorted(k for k, _ in storage.list(MANIFEST_DIR) if k.endswith(".parquet"))


def read_part(storage: Storage, key: str, columns: list[str] | None = None) -> pa.Table:
    """One manifest part, reading only `columns` (those it has) when given."""
    pf = pq.ParquetFile(io.BytesIO(storage.get(key)))
    if columns is None:
        return pf.read()
    return pf.read(columns=[c for c in columns if c in pf.schema_arrow.names])


def read_manifests(storage: Storage, columns: list[str] | None = None, run_id: str | None = None) -> pa.Table | None:
    """All manifest parts (or one run's) as one table."""
    keys = [k for k in manifest_keys(storage) if run_id is None or k.rpartition("/")[2].startswith(f"part-{run_id}-")]
    tables = [read_part(storage, key, columns) for key in keys]
    return pa.concat_tables(tables, promote_options="permissive") if tables else None


@dataclass
class Previous:
    done: np.ndarray  # sorted uint64 image hashes that need no work
    ok: int
    errors: int
    missing: int  # manifest rows whose image is gone or has another size: rendered again
    stale_keys: list[str]  # objects to remove before rendering again: bad ones (size, sha256), shards no row names
    drop: dict[str, list[int]]  # manifest part -> rows to remove, because their image is rendered again


def previous_work(storage: Storage, expected: np.ndarray, retry_errors: bool, verify: bool = False) -> Previous:
    """What earlier runs finished, checked against a listing of the stored images (and, with `verify`, against the
    sha256 of their bytes)."""
    previous = Previous(np.zeros(0, np.uint64), 0, 0, 0, [], {})
    parts = manifest_keys(storage)
    shards = dict(storage.list("shards"))
    if not parts and not shards:
        return previous
    listed = {**dict(storage.list("images")), **shards}
    rows = []  # (part, index, row) of this input's images
    referenced = set()  # every key a manifest row names, whichever input it came from
    for part in parts:
        table = read_part(storage, part, ["id", "image_index", "status", "key", "bytes", "member", "sha256"])
        for index, row in enumerate(table.to_pylist()):
            referenced.add(row["key"])
            row["hash"] = image_hash(row["id"], row["image_index"])
            if contains(expected, row["hash"]):  # rows of other inputs are left as they are
                rows.append((part, index, row))
    ok = [row for _, _, row in rows if row["status"] == "ok"]
    bad = {row["key"] for row in ok if row["key"] not in listed}
    # An image object must have its recorded size; a shard only has to be there (its rows give member sizes).
    bad |= {row["key"] for row in ok if row.get("member") is None and listed.get(row["key"]) != row["bytes"]}
    if verify:
        bad |= mismatched(storage, [row for row in ok if row["key"] not in bad])
    done = []
    for part, index, row in rows:
        if row["status"] == "ok":
            if row["key"] in bad:
                previous.missing += 1
                previous.drop.setdefault(part, []).append(index)
                continue
            previous.ok += 1
        elif retry_errors:
            previous.drop.setdefault(part, []).append(index)
            continue
        else:
            previous.errors += 1
        done.append(row["hash"])
    # A bad object still stored is removed before it is written again (a shard with one bad member goes whole: all
    # of its rows are rendered again). So is a shard no row names: stored by a run that stopped before its rows
    # reached a manifest part. Its images are rendered again into a shard whose key depends on the batch they fall
    # in, which need not be the same, so the old one would stay forever, unreferenced, duplicating them.
    orphans = {k for k in shards if k not in referenced}
    previous.stale_keys = sorted({k for k in bad if k in listed} | orphans)
    previous.done = np.unique(np.array(done, dtype=np.uint64))
    return previous


def mismatched(storage: Storage, rows: list[dict], threads: int = 16) -> set[str]:
    """The keys whose stored bytes (an image, or a shard member) no longer have the manifest's sha256."""
    from concurrent.futures import ThreadPoolExecutor

    by_key: dict[str, list[dict]] = {}
    for row in rows:
        by_key.setdefault(row["key"], []).append(row)

    def check(key: str) -> bool:
        try:
            data = storage.get(key)
        except StorageError:
            return False  # gone since the listing
        if by_key[key][0].get("member") is None:
            return sha256_hex(data) == by_key[key][0]["sha256"]
        try:
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                members = {m.name: sha256_hex(tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()}
        except tarfile.TarError:
            return False  # truncated or corrupt: none of its members can be trusted
        return all(members.get(row["member"]) == row["sha256"] for row in by_key[key])

    with ThreadPoolExecutor(threads) as pool:
        return {key for key, good in zip(by_key, pool.map(check, by_key)) if not good}


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


def clear_outputs(storage: Storage) -> int:
    """--overwrite: remove what earlier runs wrote (only the job's own files), so the job starts over."""
    # _SUCCESS first, in a delete of its own: a crash part way through must not leave it over a partial output.
    marks = [k for k in (SUCCESS, REPORT) if storage.exists(k)]
    storage.delete(marks)
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
