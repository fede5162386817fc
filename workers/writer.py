"""The writer: encode each image, store it at its key (written once: a conditional write), emit its manifest row.

Two layouts: `files` (one object per image under images/) and `webdataset` (tar shards under shards/, one per writer
batch, img2dataset-compatible: per sample an image, a `.txt` caption and a `.json` of its metadata).

Runs as Ray Data tasks on CPUs, so PNG encoding and uploads never hold a GPU. A row is emitted only after its image is
stored, which is what lets the driver write manifests after their images. A retried write of a key that exists
adopts the stored object (its sha256 comes from its metadata), so every image is in storage exactly once and its
manifest row describes the bytes that are there. With `overwrite` the write replaces what is there.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
import time

import numpy as np
import pyarrow as pa
from PIL import Image

from cascade.imagefile import CONTENT_TYPES, encode

from .rows import REQUEST_FIELDS, request_of, set_columns
from .storage import Storage, sha256_hex


def _encoded(row: dict, model: str, image_format: str, quality: int) -> bytes:
    """The row's pixels as an image file with its parameters embedded."""
    pixels = np.frombuffer(row["pixels"], dtype=np.uint8).reshape(row["height"], row["width"], 3)
    return encode(Image.fromarray(pixels), request_of(row), model, image_format, quality)


def _write_columns(model: str, digest: str, seconds: list[float], ends: list[float]) -> dict[str, pa.Array]:
    n = len(seconds)
    return {
        "model": pa.array([model] * n, pa.string()),
        "model_digest": pa.array([digest] * n, pa.string()),
        "write_s": pa.array(seconds, pa.float64()),
        "write_end": pa.array(ends, pa.float64()),
    }


def write_images(
    batch: pa.Table, storage: Storage, image_format: str, quality: int, model: str, digest: str, overwrite: bool
) -> pa.Table:
    rows = batch.select(["error", "key", "pixels", *REQUEST_FIELDS]).to_pylist()
    keys, sha, size, status, errors, seconds, ends = [], [], [], [], [], [], []
    for row in rows:
        start = time.perf_counter()
        error = row["error"]
        key = digest_hex = nbytes = None
        if error is None:
            data = _encoded(row, model, image_format, quality)
            stored = storage.put(row["key"], data, if_absent=not overwrite, content_type=CONTENT_TYPES[image_format])
            key, digest_hex, nbytes = stored.key, stored.sha256, stored.bytes
        keys.append(key)
        sha.append(digest_hex)
        size.append(nbytes)
        status.append("ok" if error is None else "error")
        errors.append(error)
        seconds.append(time.perf_counter() - start)
        ends.append(time.time())
    table = batch.drop_columns(["pixels"])
    return set_columns(
        table,
        {
            "key": pa.array(keys, pa.string()),
            "sha256": pa.array(sha, pa.string()),
            "bytes": pa.array(size, pa.int64()),
            "status": pa.array(status, pa.string()),
            "error": pa.array(errors, pa.string()),
            **_write_columns(model, digest, seconds, ends),
        },
    )


def sample_key(id_: str, image_index: int) -> str:
    """A WebDataset sample key: no dots (WebDataset splits a member's name at its first dot) and unique per image."""
    return f"{hashlib.blake2b(id_.encode(), digest_size=8).hexdigest()}-{image_index}"


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(mtime), 0o644
    tar.addfile(info, io.BytesIO(data))


JSON_SKIP = {"pixels", "latent", "clip_pooled", "clip_pooled_negative"}
EXTENSIONS = {"jpeg": "jpg"}  # a sample's image as img2dataset names it (WebDataset's to_tuple("jpg") looks for it)


def _json_safe(value):
    """NaN and infinities as null (pandas writes a missing float as NaN, and JSON has no NaN: JSON.parse refuses it),
    in nested values too."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_shard(
    batch: pa.Table, storage: Storage, image_format: str, quality: int, model: str, digest: str, overwrite: bool
) -> pa.Table:
    """Write the batch's images as one tar shard. Its key is a hash of the samples it holds, so a retried batch writes
    (or adopts) the same shard; manifest rows name the shard (`key`) and the sample (`member`), and say how many
    samples it holds (`shard_images`): Ray Data may split these rows into several blocks, which reach the driver one
    at a time, and a manifest part must hold all of a shard's rows or none (jobs.manifest.ManifestWriter)."""
    rows = batch.to_pylist()
    ext = EXTENSIONS.get(image_format, image_format)
    start = time.perf_counter()
    members: dict[str, bytes] = {}
    row_members: list[str | None] = []
    for row in rows:
        if row["error"] is not None:
            row_members.append(None)
            continue
        name = sample_key(row["id"], row["image_index"])
        members[f"{name}.{ext}"] = _encoded(row, model, image_format, quality)
        members[f"{name}.txt"] = row["prompt"].encode()
        meta = {k: v for k, v in row.items() if k not in JSON_SKIP and not isinstance(v, bytes)}
        meta["key"] = name  # the sample's key, as img2dataset writes it (the row's is a files-layout path)
        meta = _json_safe({**meta, "model": model, "model_digest": digest})
        members[f"{name}.json"] = json.dumps(meta, default=str, allow_nan=False).encode()
        row_members.append(f"{name}.{ext}")
    shard_key = key = None
    if members:
        names = sorted(members)
        shard_key = "shards/" + hashlib.blake2b("\0".join(names).encode(), digest_size=10).hexdigest() + ".tar"
        out = io.BytesIO()
        now = time.time()
        with tarfile.open(fileobj=out, mode="w") as tar:
            for name in names:
                _tar_member(tar, name, members[name], now)
        stored = storage.put(shard_key, out.getvalue(), if_absent=not overwrite, content_type="application/x-tar")
        if stored.existed:  # a retry: describe the members that are stored, not the ones just encoded
            with tarfile.open(fileobj=io.BytesIO(storage.get(shard_key))) as tar:
                members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        key = shard_key
    seconds = (time.perf_counter() - start) / max(len(rows), 1)
    end = time.time()
    n = len(rows)
    ok = [m is not None and m in members for m in row_members]
    errors = [
        row["error"] if row["error"] is not None else (None if good else "the shard holds no such sample")
        for row, good in zip(rows, ok)
    ]
    return set_columns(
        batch.drop_columns(["pixels"]),
        {
            "key": pa.array([key if good else None for good in ok], pa.string()),
            "member": pa.array([m if good else None for m, good in zip(row_members, ok)], pa.string()),
            "sha256": pa.array([sha256_hex(members[m]) if good else None for m, good in zip(row_members, ok)]),
            "bytes": pa.array([len(members[m]) if good else None for m, good in zip(row_members, ok)], pa.int64()),
            "status": pa.array(["ok" if good else "error" for good in ok], pa.string()),
            "error": pa.array(errors, pa.string()),
            "shard_images": pa.array([sum(ok) if good else None for good in ok], pa.int32()),
            **_write_columns(model, digest, [seconds] * n, [end] * n),
        },
    )
