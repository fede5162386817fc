"""The writer: encode each image, store it at its key (written once: a conditional write), emit its manifest row.

Runs as Ray Data tasks on CPUs, so PNG encoding and uploads never hold a GPU. A row is emitted only after its image is
stored, which is what lets the driver write manifests after their images. A retried or resumed write of a key that
exists adopts the stored object (its sha256 comes from its metadata), so every image is in storage exactly once and
its manifest row describes the bytes that are there. With `overwrite` the write replaces what is there.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
from PIL import Image

from cascade.imagefile import encode
from cascade.pipeline import Request

from .stages import REQUEST_FIELDS, _set_columns
from .storage import Storage

CONTENT_TYPES = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}


def write_images(
    batch: pa.Table, storage: Storage, image_format: str, quality: int, model: str, digest: str, overwrite: bool
) -> pa.Table:
    rows = batch.select(["error", "key", "pixels", *REQUEST_FIELDS]).to_pylist()
    n = len(rows)
    keys, sha, size, status, errors, seconds, ends = [], [], [], [], [], [], []
    for row in rows:
        start = time.perf_counter()
        error = row["error"]
        key = digest_hex = nbytes = None
        if error is None:
            request = Request(**{k: row[k] for k in REQUEST_FIELDS})
            pixels = np.frombuffer(row["pixels"], dtype=np.uint8).reshape(row["height"], row["width"], 3)
            data = encode(Image.fromarray(pixels), request, model, image_format, quality)
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
    return _set_columns(
        table,
        {
            "key": pa.array(keys, pa.string()),
            "sha256": pa.array(sha, pa.string()),
            "bytes": pa.array(size, pa.int64()),
            "status": pa.array(status, pa.string()),
            "error": pa.array(errors, pa.string()),
            "model": pa.array([model] * n, pa.string()),
            "model_digest": pa.array([digest] * n, pa.string()),
            "write_s": pa.array(seconds, pa.float64()),
            "write_end": pa.array(ends, pa.float64()),
        },
    )
