"""report.html: pool busy fractions and overlap from batch intervals; prompts shown as text, never markup."""

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.report import build_report, pool_stats
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
    assert prior["actors"] == 1 and len(prior["batches"]) == 2
    assert abs(prior["busy_fraction"] - 8 / 9) < 1e-9  # busy 8 s of its 9 s span
    assert decoder["actors"] == 2 and len(decoder["batches"]) == 3
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
