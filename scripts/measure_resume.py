"""What a resume's planning costs the driver: `python scripts/measure_resume.py [--images 1000000] [--parts 100]`.

Builds the bookkeeping of a finished files-layout output of `--images` images (manifest parts as the job writes
them, and a listing of the images) and times `jobs.manifest.previous_work` over it, sampling the process's resident
memory every 10 ms. The storage is served from memory, so the figures are the planner's own, not a disk's or a
server's listing speed.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.argtypes import positive  # noqa: E402
from jobs.inputs import hashes, image_key  # noqa: E402
from jobs.manifest import MANIFEST_DIR, previous_work  # noqa: E402
from workers.storage import Storage, StorageError, Stored  # noqa: E402


class MemoryStorage(Storage):
    """Manifest parts held as bytes, and a listing of `images` made up on the fly from the same ids and sizes."""

    url = "memory://"

    def __init__(self, images: int):
        self.images, self.objects = images, {}

    def put(self, key, data, *, if_absent=False, content_type=""):
        self.objects[key] = data
        return Stored(key, "", len(data), False)

    def get(self, key):
        if key not in self.objects:
            raise StorageError(f"{key}: not found")
        return self.objects[key]

    def list(self, prefix=""):
        if prefix == "images":
            for i in range(self.images):
                yield image_key(_id(i), 0, "png"), _size(i)
            return
        yield from ((k, len(v)) for k, v in sorted(self.objects.items()) if k.startswith(prefix + "/"))


def _id(i: int) -> str:
    return f"prompt-{i:09d}"


def _size(i: int) -> int:
    return 1_400_000 + i % 4096


def build(images: int, parts: int) -> tuple[MemoryStorage, np.ndarray]:
    storage = MemoryStorage(images)
    for p, rows in enumerate(np.array_split(np.arange(images), parts)):
        ids = [_id(i) for i in rows]
        table = pa.table(
            {
                "id": ids,
                "image_index": np.zeros(len(rows), np.int64),
                "prompt": [f"a photograph of subject {i}, in the style of a catalogue" for i in rows],
                "status": ["ok"] * len(rows),
                "key": [image_key(i, 0, "png") for i in ids],
                "bytes": [_size(i) for i in rows],
                "sha256": [f"{i:064x}" for i in rows],
            }
        )
        out = io.BytesIO()
        pq.write_table(table, out, compression="zstd")
        storage.put(f"{MANIFEST_DIR}/part-run-{p:06d}.parquet", out.getvalue())
    return storage, np.sort(hashes((_id(i), 0) for i in range(images)))


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=positive, default=1_000_000)
    parser.add_argument("--parts", type=positive, default=100)
    args = parser.parse_args()
    if args.parts > args.images:
        parser.error(f"--parts: {args.parts} is more than --images {args.images}")
    storage, expected = build(args.images, args.parts)
    start, peak, running = rss(), [0], [True]

    def sample() -> None:
        while running[0]:
            peak[0] = max(peak[0], rss())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    began = time.perf_counter()
    previous = previous_work(storage, expected, retry_errors=False)
    seconds = time.perf_counter() - began
    running[0] = False
    sampler.join()
    grew = max(peak[0], rss()) - start
    assert previous.ok == args.images, previous
    print(
        f"{args.images:,} images in {args.parts} manifest parts: planned in {seconds:.1f} s, "
        f"peak resident memory +{grew / 2**20:.0f} MiB ({grew / args.images:.0f} bytes per image)"
    )


if __name__ == "__main__":
    main()
