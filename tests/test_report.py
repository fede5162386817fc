"""report.html: pool busy fractions and overlap from batch intervals; prompts shown as text, never markup."""

import html
import io
import json
import re
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.report import _overlap, _svg_timeline, build_report, pool_stats
from workers.storage import LocalStorage

SUMMARY_KEYS = ("images", "ok", "errors", "rendered_this_run", "resumed", "wall_s", "images_per_s")


def png(color) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(out, format="PNG")
    return out.getvalue()


def batches_table():
    # Stage C: one actor busy 0-4 and 5-9 (2 batches of 2 rows); Stage B/A: two actors, 2-6 and 6-10 / 3-10.
    rows = []
    for prior, decoder in [
        ((0, 4), ("d0", 2, 6)),
        ((0, 4), ("d1", 3, 10)),
        ((5, 9), ("d0", 6, 10)),
        ((5, 9), ("d1", 3, 10)),
    ]:
        rows.append(
            {
                "prior_actor": "p0", "prior_start": float(prior[0]), "prior_end": float(prior[1]),
                "decoder_actor": decoder[0], "decoder_start": float(decoder[1]), "decoder_end": float(decoder[2]),
                "write_end": 10.5, "status": "ok",
            }
        )  # fmt: skip
    table = pa.Table.from_pylist(rows)
    # The size of the model batch each image ran in: Stage C 2 + 2; Stage B/A d0 1, d1 2, d0 1.
    table = table.append_column("prior_batch", pa.array([2, 2, 2, 2]))
    return table.append_column("decoder_batch", pa.array([1, 2, 1, 2]))


def test_pool_stats_from_batch_intervals():
    stats = pool_stats(batches_table())
    prior, decoder = stats["pools"]["prior"], stats["pools"]["decoder"]
    assert prior["actors"] == 1 and prior["batches"] == 2
    assert abs(prior["busy_fraction"] - 8 / 9) < 1e-9  # busy 8 s of its 9 s span
    assert decoder["actors"] == 2 and decoder["batches"] == 3
    assert abs(decoder["busy_fraction"] - (8 + 7) / (2 * 8)) < 1e-9  # d0 busy 2-10, d1 3-10, span 2-10
    assert abs(stats["both_busy_s"] - 6) < 1e-9  # Stage C busy 0-4, 5-9; decoder busy 2-10: overlap 2 + 4
    assert abs(stats["wall_s"] - 10.5) < 1e-9
    assert prior["images_per_batch"] == 2.0 and abs(decoder["images_per_batch"] - 4 / 3) < 1e-9  # 4 images, 3 batches
    older = pool_stats(batches_table().drop_columns(["prior_batch", "decoder_batch"]))  # manifests before the column
    assert older["pools"]["prior"]["images_per_batch"] is None


def test_report_escapes_prompts(tmp_path):
    storage = LocalStorage(tmp_path)
    storage.put("images/aa/x-0.png", png((255, 0, 0)))
    table = batches_table().slice(0, 2)
    table = table.append_column("run_id", pa.array(["r1"] * 2))
    extra = {
        "id": ["x", "y"],
        "image_index": [0, 0],
        "seed": [1, 2],
        "prompt": ["<script>alert(1)</script>", "fine"],
        "key": ["images/aa/x-0.png", None],
        "error": [None, "prompt: <b>bad</b>"],
    }
    for name, values in extra.items():
        table = table.append_column(name, pa.array(values))
    table = table.set_column(table.column_names.index("status"), "status", pa.array(["ok", "error"]))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.put("manifests/part-r1-000000.parquet", buf.getvalue())
    page = build_report(storage, "r1", dict.fromkeys(SUMMARY_KEYS, 0))
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>bad</b>" not in page and "&lt;b&gt;bad&lt;/b&gt;" in page
    assert page.count("data:image/jpeg;base64,") == 1 and "Stage B/A pool" in page
    assert "<th>images per model batch</th>" in page and "<td>2.00</td>" in page  # Stage C: one batch of 2


@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_contact_sheet_reads_webdataset_samples_out_of_their_shards(where, tmp_path, request):
    """Rows of layout webdataset name a shard (key) and a sample in it (member): the sheet reads those members
    through the tar's headers (ranged reads on S3), never decoding the tar as an image."""
    import tarfile

    from workers.storage import open_storage

    storage = (
        LocalStorage(tmp_path) if where == "local" else open_storage(f"s3://{request.getfixturevalue('s3_bucket')}")
    )
    shard = io.BytesIO()
    with tarfile.open(fileobj=shard, mode="w") as tar:
        for name, data in [("a-0.png", png((255, 0, 0))), ("a-0.txt", b"red"), ("b-0.png", png((0, 0, 255)))]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    storage.put("shards/s1.tar", shard.getvalue())
    table = batches_table().slice(0, 2).append_column("run_id", pa.array(["r1"] * 2))
    extra = {"id": ["a", "b"], "image_index": [0, 0], "seed": [1, 2], "prompt": ["red", "blue"]}
    extra |= {"key": ["shards/s1.tar"] * 2, "member": ["a-0.png", "b-0.png"], "error": [None, None]}
    for name, values in extra.items():
        table = table.append_column(name, pa.array(values))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.put("manifests/part-r1-000000.parquet", buf.getvalue())
    page = build_report(storage, "r1", dict.fromkeys(SUMMARY_KEYS, 0))
    assert page.count("data:image/jpeg;base64,") == 2 and "No images in this run" not in page


def reference_stats(table: pa.Table) -> dict:
    """The statistics as first written, a Python tuple per batch: the arrays must give the same numbers."""

    def union(intervals):
        merged = []
        for start, end in sorted(intervals):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        return merged

    def intersect(a, b):
        total, i, j = 0.0, 0, 0
        while i < len(a) and j < len(b):
            total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
            i, j = (i + 1, j) if a[i][1] < b[j][1] else (i, j + 1)
        return total

    pools, busy, spans = {}, {}, []
    for pool in ("prior", "decoder"):
        names = [f"{pool}_actor", f"{pool}_start", f"{pool}_end"]
        batches = set(zip(*(table.column(n).to_pylist() for n in names)))
        batches = sorted(b for b in batches if None not in b)
        actors = sorted({a for a, _, _ in batches})
        span = (min(s for _, s, _ in batches), max(e for _, _, e in batches))
        busy_s = sum(e - s for actor in actors for s, e in union([(s, e) for a, s, e in batches if a == actor]))
        pools[pool] = {
            "actors": len(actors),
            "batches": len(batches),
            "busy_fraction": busy_s / (len(actors) * (span[1] - span[0])),
            "span_s": span[1] - span[0],
        }
        busy[pool] = union([(s, e) for _, s, e in batches])
        spans.append(span)
    wall = max(*(e for _, e in spans), max(table.column("write_end").to_pylist())) - min(s for s, _ in spans)
    return {"pools": pools, "both_busy_s": intersect(busy["prior"], busy["decoder"]), "wall_s": wall}


def timings_table(images: int, batch: int, actors: int, seed: int = 0) -> pa.Table:
    """Manifest rows as the job writes them, built as arrays: `actors` per pool, batches of `batch` images (the last
    short), each actor's batches back to back or after an idle gap, at epoch times; a few rows lack a pool's columns
    (error rows that never reached it)."""
    rng = np.random.default_rng(seed)
    batch_of = np.arange(images) // batch
    batches = int(batch_of[-1]) + 1
    columns = {}
    for pool, offset in (("prior", 0.0), ("decoder", 0.7)):
        actor = rng.integers(0, actors, batches)
        seconds = rng.uniform(0.2, 1.0, batches)
        gap = np.where(rng.random(batches) < 0.3, rng.exponential(2.0, batches), 0.0)  # idle now and then,
        gap[rng.random(batches) < 0.002] = 1000.0  # and for long enough to see now and then
        start = np.zeros(batches)
        for a in range(actors):  # each actor's batches one after another
            mine = actor == a
            ends = np.cumsum(seconds[mine] + gap[mine])
            start[mine] = 1.8e9 + offset + ends - seconds[mine]
        names = np.array([f"{pool}@10.0.0.{a}:9000/{a:012x}" for a in range(actors)])
        columns[f"{pool}_actor"] = names[actor][batch_of]
        columns[f"{pool}_start"] = start[batch_of]
        columns[f"{pool}_end"] = (start + seconds)[batch_of]
        columns[f"{pool}_batch"] = np.bincount(batch_of)[batch_of]
    columns["write_end"] = columns["decoder_end"] + 0.05
    table = pa.table(columns)
    lost = rng.random(images) < 0.001  # rows with no pool timings
    for name in ("decoder_actor", "decoder_start", "decoder_end"):
        i = table.column_names.index(name)
        table = table.set_column(
            i, name, pc.if_else(pa.array(lost), pa.nulls(images, table.schema.field(name).type), table.column(name))
        )
    return table.append_column("status", pa.array(np.where(lost, "error", "ok")))


@pytest.mark.parametrize(("images", "batch", "actors"), [(2000, 4, 3), (500, 1, 1), (3001, 7, 5)])
def test_pool_stats_as_arrays_give_the_per_batch_numbers(images, batch, actors):
    table = timings_table(images, batch, actors)
    got, want = pool_stats(table), reference_stats(table)
    for pool in ("prior", "decoder"):
        for name, value in want["pools"][pool].items():
            assert got["pools"][pool][name] == pytest.approx(value, rel=1e-12), (pool, name)
    assert got["both_busy_s"] == pytest.approx(want["both_busy_s"], rel=1e-9)
    assert got["wall_s"] == pytest.approx(want["wall_s"], rel=1e-12)
    assert got["pools"]["prior"]["images_per_batch"] == pytest.approx(images / -(-images // batch))


def test_the_timeline_draws_batches_under_half_a_pixel_apart_as_one_bar():
    """Batches under half a pixel apart are one bar; further apart, two. At 570 px for 570 s, a second is a pixel."""
    rows = [("p0", 0.0, 10.0), ("p0", 10.4, 20.0), ("p0", 22.0, 30.0), ("p0", 22.0, 30.0), ("p1", 40.0, 40.1)]
    table = pa.table(
        {
            "prior_actor": [a for a, _, _ in rows],
            "prior_start": [s for _, s, _ in rows],
            "prior_end": [e for _, _, e in rows],
            "write_end": [570.0] * len(rows),
        }
    )
    svg = _svg_timeline(pool_stats(table))
    assert svg.count("<rect") == 3, svg
    assert '<rect x="140.0" y="10" width="20.0"' in svg and '<rect x="162.0" y="10" width="8.0"' in svg
    assert '<rect x="180.0" y="26" width="1.0"' in svg  # a batch shorter than a pixel is still drawn, 1 px wide


def test_the_page_of_200000_images_is_small_and_quick(tmp_path):
    """A bar (and a Python tuple) per batch made 3.2 MB of page for 100,000 images at batch 4 and 32 MB for a million;
    the page is now bounded by its width x the actors, whatever the number of images."""
    images, actors = 200_000, 4
    table = timings_table(images, 1, actors)  # batch 1: a batch per image, idle gaps between many of them
    extra = {
        "id": pa.array([f"prompt-{i}" for i in range(images)]),
        "image_index": pa.array(np.zeros(images, np.int64)),
        "seed": pa.array(np.arange(images)),
        "prompt": pa.array(
            [f"a large red circle in the center on a white background, take {i}" for i in range(images)]
        ),
        "key": pa.array([f"images/00/prompt-{i}-0.png" for i in range(images)]),
        "error": pc.if_else(pc.equal(table.column("status"), "ok"), None, "prompt: too long"),
        "run_id": pa.array(["r1"] * images),
    }
    for name, values in extra.items():
        table = table.append_column(name, values)
    storage = LocalStorage(tmp_path)
    for n, start in enumerate(range(0, images, 100_000)):  # in parts, as the manifest writer leaves them
        buf = io.BytesIO()
        pq.write_table(table.slice(start, 100_000), buf)
        storage.put(f"manifests/part-r1-{n:06d}.parquet", buf.getvalue())
    started = time.perf_counter()
    page = build_report(storage, "r1", dict.fromkeys(SUMMARY_KEYS, 0))
    seconds = time.perf_counter() - started
    assert len(page.encode()) < 300_000 and seconds < 10, (len(page), seconds)
    lanes = 2 * actors
    assert page.count("<rect") <= lanes * 381  # a bar of 1 px and a gap over half a pixel, in 571 px
    assert page.count("prompt: too long") == 20 and page.count("data:image/jpeg") == 0  # (no image files here)
    stats = pool_stats(table)
    for pool in ("prior", "decoder"):  # the numbers printed are those of the rows
        p = stats["pools"][pool]
        assert p["batches"] > 190_000 and p["actors"] == actors
        assert f"<td>{p['busy_fraction']:.1%}</td><td>{p['span_s']:.1f} s</td><td>1.00</td>" in page


def put_part(storage, run: str, ids: list[str], statuses: list[str]) -> None:
    """A manifest part of `run`: its images' timings as in batches_table, an error message naming each failed id."""
    table = batches_table().slice(0, len(ids)).drop_columns(["status"])
    extra = {
        "id": ids,
        "image_index": [0] * len(ids),
        "seed": [1] * len(ids),
        "prompt": ids,
        "key": [None] * len(ids),
        "status": statuses,
        "error": [None if s == "ok" else f"error of {i}" for i, s in zip(ids, statuses)],
        "run_id": [run] * len(ids),
    }
    for name, values in extra.items():
        table = table.append_column(name, pa.array(values, pa.string() if name in ("key", "error") else None))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.put(f"manifests/part-{run}-000000.parquet", buf.getvalue())


def test_a_resumed_runs_page_says_what_is_the_whole_outputs_and_what_this_runs(tmp_path):
    """_SUCCESS counts the whole output; the tables are drawn from this run's rows. An error an earlier run recorded
    was counted above an empty error table ("errors: 3", then no row); the page now says which part is which."""
    storage = LocalStorage(tmp_path)
    put_part(storage, "r0", ["a", "b", "c"], ["error", "error", "ok"])  # the run that stopped
    put_part(storage, "r1", ["d", "e"], ["error", "ok"])  # the resumed run
    summary = {"images": 5, "ok": 2, "errors": 3, "resumed": 3, "rendered_this_run": 2, "errors_this_run": 1}
    summary |= {"wall_s": 12.0, "images_per_s": 0.2}
    page = build_report(storage, "r1", summary)
    sections = dict(re.findall(r"<h2>(.*?)</h2>(.*?)(?=<h2>|</body>)", page, re.S))
    whole, this_run = (
        json.loads(html.unescape(re.search("<pre>(.*)</pre>", sections[h], re.S)[1])) for h in list(sections)[:2]
    )
    assert list(sections)[:2] == ["The whole output", "This run"]
    assert whole == {"images": 5, "ok": 2, "errors": 3, "resumed": 3}
    assert this_run == {"rendered_this_run": 2, "errors_this_run": 1, "wall_s": 12.0, "images_per_s": 0.2}
    text = html.unescape(page)
    assert (
        "this page covers this run's 2 images only (manifest rows of run r1), not the 3 that earlier runs made" in text
    )
    for section in ("Pools", "Samples"):
        assert f"<h2>{section} (this run)</h2>" in page
    assert "<h2>Errors in this run: 1</h2>" in page
    assert "error of d" in page and "error of a" not in page and "error of b" not in page
    assert "The output's 2 other errors were recorded by earlier runs" in text
    # A run that rendered nothing itself (it only wrote _SUCCESS) reports on every run, and says that.
    summary |= {"resumed": 5, "rendered_this_run": 0, "errors_this_run": 0, "images_per_s": 0.0}
    page = build_report(storage, None, summary)
    assert "this page covers the manifest rows of every run on this output (5 images)" in page
    assert "<h2>Errors in all runs: 3</h2>" in page and all(f"error of {i}" in page for i in "abd")
    assert "recorded by earlier runs" not in page and "<h2>Pools (all runs)</h2>" in page


@pytest.mark.parametrize(
    ("gpus", "pools", "cpu"),
    [
        ({"prior_pool": 1, "decoder_pool": 0.5}, "GPU pools", ""),
        ({"prior_pool": 0.0, "decoder_pool": 0.0}, "pools", " (a CPU run: no actor had a GPU)"),
        ({"prior_pool": 1, "decoder_pool": 0.0}, "pools", ""),
        (None, "pools", ""),  # unknown: nothing rendered, or a summary from before actor_gpus
    ],
)
def test_the_overlap_sentence_says_what_it_measures(gpus, pools, cpu):
    """Both pools busy 6 s (see test_pool_stats_from_batch_intervals) of the 10.5 s from the first batch's start,
    at 0, to the last image written, at 10.5: not "between the first and last batch", which end at 10."""
    assert _overlap(pool_stats(batches_table()), {"actor_gpus": gpus}) == (
        f"Both {pools} busy at once: 57.1% of the 10.5 s from the first batch's start to the last image written{cpu}."
    )
    older = pool_stats(batches_table().drop_columns(["write_end"]))  # manifests before write_end: to the last batch
    assert _overlap(older, {"actor_gpus": gpus}).startswith(f"Both {pools} busy at once: 60.0% of the 10.0 s from")
    assert _overlap(older, {}).endswith("from the first batch's start to the last batch's end.")
