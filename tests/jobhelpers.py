"""Shared by the pipeline tests: small prompt sets and checks of a finished output."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq

from cascade.request import Request
from jobs.manifest import SUCCESS, read_manifests
from workers.rows import REQUEST_FIELDS
from workers.storage import Storage, sha256_hex


def stage_block(n: int, size: int = 256) -> pa.Table:
    """A block of n request rows as a pool actor receives it (no errors; 256 px and 2 + 2 steps unless size says)."""
    args = dict(width=size, height=size, prior_steps=2, decoder_steps=2)
    rows = [{"error": None, **Request(f"a red circle number {i}", seed=i, **args).__dict__} for i in range(n)]
    return pa.Table.from_pylist([{k: row[k] for k in ("error", *REQUEST_FIELDS)} for row in rows])


def record_stage_calls(monkeypatch, name: str, fits: int = 1 << 30) -> list[list]:
    """Make `workers.stages.<name>` (run_prior, run_decoder) record the items of each call, and fail as a device with
    room for `fits` images would (CUDA's out-of-memory error above that); returns the list of calls."""
    import torch

    import workers.stages as stages

    real, calls = getattr(stages, name), []

    def record(models, items):
        if len(items) > fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        calls.append(list(items))
        return real(models, items)

    monkeypatch.setattr(stages, name, record)
    return calls


# Small and fast on a 2-core CPU: 256 px, few steps.
FAST = [
    "--model",
    "tiny",
    "--width",
    "256",
    "--height",
    "256",
    "--prior-steps",
    "3",
    "--decoder-steps",
    "2",
    "--progress-seconds",
    "1",
]


def prompts_table(n: int, **extra) -> pa.Table:
    columns = {"prompt": [f"a red circle number {i}" for i in range(n)], "style": [f"s{i}" for i in range(n)]}
    columns.update(extra)
    return pa.table(columns)


def parquet_bytes(table: pa.Table) -> bytes:
    out = io.BytesIO()
    pq.write_table(table, out)
    return out.getvalue()


def check_output(storage: Storage, expected_images: int) -> pa.Table:
    """Every image exactly once in the manifests; every ok row's object present with its sha256; _SUCCESS last."""
    table = read_manifests(storage)
    assert table is not None and table.num_rows == expected_images
    pairs = list(zip(table.column("id").to_pylist(), table.column("image_index").to_pylist()))
    assert len(set(pairs)) == len(pairs), "an image has two manifest rows"
    listed = dict(storage.list("images"))
    ok_keys = []
    for row in table.to_pylist():
        if row["status"] == "ok":
            assert row["key"] in listed and listed[row["key"]] == row["bytes"]
            assert sha256_hex(storage.get(row["key"])) == row["sha256"]
            ok_keys.append(row["key"])
        else:
            assert row["error"] and row["key"] is None
    assert sorted(listed) == sorted(ok_keys), "storage holds images no manifest row describes"
    summary = json.loads(storage.get(SUCCESS))
    assert summary["complete"] is True and summary["images"] == expected_images
    return table


def tar_bytes(files: dict[str, bytes]) -> bytes:
    """A tar archive holding `files` (name -> bytes), as a WebDataset shard."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()
