"""Resume planning (`previous_work`): which images earlier runs finished, checked against what storage holds."""

import io
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.inputs import image_hash
from jobs.manifest import (
    ManifestWriter,
    drop_rows,
    listing,
    manifest_keys,
    mismatched,
    previous_work,
    read_part,
    settings_changes,
)
from tests.helpers import load_script
from tests.jobhelpers import tar_bytes
from workers.storage import LocalStorage, StorageError, sha256_hex


def _part(storage, name: str, rows: list[dict]) -> str:
    """A manifest part holding `rows` (missing fields null), as the job writes it."""
    fields = ["id", "image_index", "status", "key", "bytes", "sha256"] + (["member"] if "member" in rows[0] else [])
    table = pa.table({f: [r.get(f) for r in rows] for f in fields})
    table = table.set_column(4, "bytes", table.column("bytes").cast(pa.int64()))
    out = io.BytesIO()
    pq.write_table(table, out)
    key = f"manifests/part-{name}.parquet"
    storage.put(key, out.getvalue())
    return key


def _image(storage, id_: str, data: bytes, status: str = "ok") -> dict:
    key = f"images/aa/{id_}-0.png"
    if status == "ok":
        storage.put(key, data)
        return {"id": id_, "image_index": 0, "status": "ok", "key": key, "bytes": len(data), "sha256": sha256_hex(data)}
    return {"id": id_, "image_index": 0, "status": "error", "key": None, "bytes": None, "sha256": None}


def _hashes(*ids: str) -> np.ndarray:
    return np.sort(np.array([image_hash(i, 0) for i in ids], np.uint64))


@pytest.fixture
def files(tmp_path):
    """A files-layout output over two manifest parts: good images, a lost one, a resized one, an error, and an image
    of another input."""
    s = LocalStorage(tmp_path)
    a, b, lost = (_image(s, i, i.encode() * 10) for i in ("a", "b", "lost"))
    resized, c, error = _image(s, "resized", b"x" * 50), _image(s, "c", b"c" * 10), _image(s, "err", b"", "error")
    other = _image(s, "other", b"o" * 10)
    s.delete([lost["key"], other["key"]])  # gone from storage since
    s.put(resized["key"], b"x" * 49)  # rewritten with another size (a partial copy, say)
    parts = [_part(s, "r1-000000", [a, lost, other, b]), _part(s, "r2-000000", [error, resized, c])]
    return s, parts


def test_resume_keeps_stored_images_and_errors_and_redoes_lost_and_resized_ones(files):
    s, parts = files
    previous = previous_work(s, _hashes("a", "b", "c", "lost", "resized", "err"), retry_errors=False)
    assert (previous.ok, previous.errors, previous.missing) == (3, 1, 2)
    np.testing.assert_array_equal(previous.done, _hashes("a", "b", "c", "err"))
    # Rows to drop by part and index; the other input's row (index 2 of part 0) is left, though its image is gone.
    assert previous.drop == {parts[0]: [1], parts[1]: [1]}
    assert previous.stale_keys == ["images/aa/resized-0.png"]  # the lost image has nothing left to remove


def test_retrying_errors_drops_their_rows(files):
    s, parts = files
    previous = previous_work(s, _hashes("a", "b", "c", "lost", "resized", "err"), retry_errors=True)
    assert (previous.ok, previous.errors, previous.missing) == (3, 0, 2)
    np.testing.assert_array_equal(previous.done, _hashes("a", "b", "c"))
    assert previous.drop == {parts[0]: [1], parts[1]: [0, 1]}
    drop_rows(s, previous.drop)
    assert read_part(s, parts[0]).column("id").to_pylist() == ["a", "other", "b"]
    assert read_part(s, parts[1]).column("id").to_pylist() == ["c"]


def test_a_part_that_is_not_parquet_stops_the_plan_naming_it(files):
    s, parts = files
    whole = s.get(parts[1])
    damaged = bytearray(whole)
    damaged[len(whole) // 3 : len(whole) // 2] = bytes(len(whole) // 2 - len(whole) // 3)  # a page zeroed
    # Copied in half (the job writes each part in one PUT), or damaged inside (pyarrow raises OSError for that).
    for data in (b"PAR1 cut short", bytes(damaged)):
        s.put(parts[1], data)
        with pytest.raises(StorageError, match=re.escape(parts[1]) + ": not a readable manifest part .*; move it"):
            previous_work(s, _hashes("a", "b"), retry_errors=False)


def test_verify_redoes_an_image_whose_bytes_changed_at_the_same_size(files):
    s, _ = files
    s.put("images/aa/b-0.png", b"B" * 10)
    expected = _hashes("a", "b", "c", "lost", "resized", "err")
    assert previous_work(s, expected, retry_errors=False).ok == 3  # a listing sees nothing wrong
    previous = previous_work(s, expected, retry_errors=False, verify=True)
    assert (previous.ok, previous.missing) == (2, 3)
    np.testing.assert_array_equal(previous.done, _hashes("a", "c", "err"))
    assert previous.stale_keys == ["images/aa/b-0.png", "images/aa/resized-0.png"]


def _shard(storage, name: str, members: dict[str, bytes], ids: list[str]) -> list[dict]:
    key = f"shards/{name}.tar"
    storage.put(key, tar_bytes(members))
    return [
        {"id": i, "image_index": 0, "status": "ok", "key": key, "member": m, "bytes": len(d), "sha256": sha256_hex(d)}
        for i, (m, d) in zip(ids, members.items())
    ]


def test_a_shard_goes_whole_when_any_member_is_bad_and_orphan_shards_are_removed(tmp_path):
    s = LocalStorage(tmp_path)
    good = _shard(s, "good", {"a.png": b"aa", "b.png": b"bb"}, ["a", "b"])
    tampered = _shard(s, "tampered", {"c.png": b"cc", "d.png": b"dd"}, ["c", "d"])
    gone = _shard(s, "gone", {"e.png": b"ee"}, ["e"])
    theirs = _shard(s, "theirs", {"z.png": b"zz"}, ["z"])  # another input's shard: named, so not an orphan
    _shard(s, "orphan", {"f.png": b"ff"}, ["f"])  # stored by a run that stopped before its manifest part
    s.delete(["shards/gone.tar"])
    tampered[1]["sha256"] = sha256_hex(b"something else")
    parts = [_part(s, "r1-000000", good + tampered), _part(s, "r1-000001", gone + theirs)]
    expected = _hashes("a", "b", "c", "d", "e", "f")

    listed = previous_work(s, expected, retry_errors=False)
    assert (listed.ok, listed.missing) == (4, 1)  # a listing only sees the shard that is gone
    assert listed.stale_keys == ["shards/orphan.tar"]

    verified = previous_work(s, expected, retry_errors=False, verify=True)
    assert (verified.ok, verified.missing) == (2, 3)
    np.testing.assert_array_equal(verified.done, _hashes("a", "b"))
    assert verified.drop == {parts[0]: [2, 3], parts[1]: [0]}
    assert verified.stale_keys == ["shards/orphan.tar", "shards/tampered.tar"]


def test_an_image_with_two_rows_keeps_one_and_a_shard_only_dropped_rows_name_goes(tmp_path):
    """Two runs on one output at once each write a row per image (and, with shards, each its own shard): the resume
    keeps one row per image, a good one where there is one, and deletes what only the dropped rows named."""
    s = LocalStorage(tmp_path)
    first = _shard(s, "first", {"a.png": b"aa", "b.png": b"bb"}, ["a", "b"])
    second = _shard(s, "second", {"a.png": b"aa", "b.png": b"bb"}, ["a", "b"])
    error, c = _image(s, "c", b"", "error"), _image(s, "c", b"cc")  # an error row beside an ok one
    lost = _image(s, "d", b"dd")
    s.delete([lost["key"]])
    parts = [_part(s, "r1-000000", [*first, error, lost]), _part(s, "r2-000000", [*second, c, lost])]
    previous = previous_work(s, _hashes("a", "b", "c", "d"), retry_errors=False)
    assert (previous.ok, previous.errors, previous.missing, previous.repeated) == (3, 0, 1, 4)
    np.testing.assert_array_equal(previous.done, _hashes("a", "b", "c"))
    assert previous.drop == {parts[0]: [2, 3], parts[1]: [0, 1, 3]}  # the first shard's rows stay, and c's ok row
    assert previous.stale_keys == ["shards/second.tar"]
    drop_rows(s, previous.drop)
    s.delete(previous.stale_keys)
    again = previous_work(s, _hashes("a", "b", "c", "d"), retry_errors=False)
    assert (again.ok, again.missing, again.repeated, again.drop, again.stale_keys) == (3, 0, 0, {}, [])


def test_a_truncated_shard_fails_verification(tmp_path):
    s = LocalStorage(tmp_path)
    rows = _shard(s, "cut", {"a.png": b"a" * 2000, "b.png": b"b" * 2000}, ["a", "b"])
    _part(s, "r1-000000", rows)
    s.put("shards/cut.tar", s.get("shards/cut.tar")[:1500])
    previous = previous_work(s, _hashes("a", "b"), retry_errors=False, verify=True)
    assert (previous.ok, previous.missing, previous.stale_keys) == (0, 2, ["shards/cut.tar"])


def test_nothing_stored_means_nothing_done(tmp_path):
    previous = previous_work(LocalStorage(tmp_path), _hashes("a"), retry_errors=False)
    assert (len(previous.done), previous.ok, previous.drop, previous.stale_keys) == (0, 0, {}, [])


def test_only_an_orphan_shard_is_removed(tmp_path):
    s = LocalStorage(tmp_path)
    _shard(s, "orphan", {"a.png": b"aa"}, ["a"])
    previous = previous_work(s, _hashes("a"), retry_errors=False)
    assert (previous.ok, previous.stale_keys) == (0, ["shards/orphan.tar"])


def test_a_file_name_that_is_not_utf8_is_passed_over_and_such_a_file_is_an_orphan(files):
    s, _ = files
    for folder in ("images/aa", "shards"):
        (s.root / folder).mkdir(exist_ok=True)
        with open(os.path.join(os.fsencode(s.root / folder), b"stray\xff.png"), "wb") as f:
            f.write(b"x")
    previous = previous_work(s, _hashes("a", "b", "c", "lost", "resized", "err"), retry_errors=False)
    assert (previous.ok, previous.errors, previous.missing) == (3, 1, 2)
    assert previous.stale_keys == [
        "images/aa/resized-0.png", "images/aa/stray\udcff.png", "shards/stray\udcff.png"
    ]  # fmt: skip
    s.delete(previous.stale_keys)
    assert [k for k, _ in s.list("shards")] == []
    assert not [k for k, _ in s.list("images") if "stray" in k]


def test_an_image_no_row_names_is_removed_to_be_rendered_again_not_adopted(files):
    """An image stored by a run that stopped before its row reached a manifest part may have been made with other
    settings than this run's (nothing records them), or in another format: it goes. An image that only another
    input's row names stays."""
    s, _ = files
    s.put("images/bb/new-0.png", b"n" * 10)  # this input's, no row: the crashed run's
    s.put("images/cc/new-0.webp", b"w" * 10)  # the same image in a format the rerun no longer writes
    s.put("images/aa/other-0.png", b"o" * 10)  # named by the other input's row (its size no longer matters)
    previous = previous_work(s, _hashes("a", "b", "c", "lost", "resized", "err", "new"), retry_errors=False)
    assert (previous.ok, previous.errors, previous.missing) == (3, 1, 2)
    np.testing.assert_array_equal(previous.done, _hashes("a", "b", "c", "err"))  # "new" is to render
    assert previous.stale_keys == ["images/aa/resized-0.png", "images/bb/new-0.png", "images/cc/new-0.webp"]


def test_a_listing_is_built_in_chunks_and_keeps_every_key(tmp_path):
    s = LocalStorage(tmp_path)
    for i in range(7):
        s.put(f"images/aa/{i}.png", b"x" * i)
    table = listing(s, "images", chunk=3)
    assert sorted(zip(table.column("key").to_pylist(), table.column("size").to_pylist())) == sorted(s.list("images"))


def test_a_deleted_images_folder_redoes_every_image(files):
    s, parts = files
    s.delete([k for k, _ in s.list("images")])
    previous = previous_work(s, _hashes("a", "b", "c", "lost", "resized", "err"), retry_errors=False)
    assert (previous.ok, previous.errors, previous.missing, previous.stale_keys) == (0, 1, 5, [])
    assert previous.drop == {parts[0]: [0, 1, 3], parts[1]: [1, 2]}


def test_verification_reads_keys_a_chunk_at_a_time_and_misses_none(tmp_path):
    s = LocalStorage(tmp_path)
    rows = [_image(s, i, i.encode() * 5) for i in ("a", "b", "c", "d", "e")]
    s.put(rows[3]["key"], b"D" * 5)
    checks = pa.table(
        {"key": [r["key"] for r in rows], "member": pa.nulls(5, pa.string()), "sha256": [r["sha256"] for r in rows]}
    )
    assert mismatched(s, checks, threads=2, chunk=2) == {rows[3]["key"]}


def test_the_resume_measurement_plans_a_finished_output(monkeypatch, capsys):
    """scripts/measure_resume.py (the figures in docs/PIPELINE.md) runs and finds every image done."""
    monkeypatch.setattr("sys.argv", ["measure_resume.py", "--images", "3000", "--parts", "3"])
    load_script("measure_resume").main()
    assert re.fullmatch(
        r"3,000 images in 3 manifest parts: planned in [\d.]+ s, peak .* per image\)\n", capsys.readouterr().out
    )


def test_each_part_records_its_run_s_image_settings_and_a_resume_reads_those_of_this_input(tmp_path):
    s = LocalStorage(tmp_path)
    rows = [_image(s, i, i.encode() * 3) for i in ("a", "b", "c")]
    for run, settings, part in (("r1", {"model": "demo", "seed": 0}, rows[:2]), ("r2", {"model": "tiny"}, rows[2:])):
        writer = ManifestWriter(s, run, rows=100, seconds=60, settings=settings)
        writer.add(pa.Table.from_pylist(part))
        writer.flush()
    assert previous_work(s, _hashes("a"), retry_errors=False).settings == [{"model": "demo", "seed": 0}]
    found = previous_work(s, _hashes("a", "c"), retry_errors=False).settings
    assert sorted(found, key=str) == [{"model": "demo", "seed": 0}, {"model": "tiny"}]
    assert settings_changes(found, {"model": "tiny", "seed": 0}) == ["model 'demo' (now 'tiny')"]
    assert settings_changes(found, {"model": "demo", "seed": 3}) == ["model 'tiny' (now 'demo')", "seed 0 (now 3)"]
    # A setting added later (fp8) compares as the value runs before it had; other unrecorded keys are not compared.
    before_fp8 = [{"model": "demo"}]
    assert settings_changes(before_fp8, {"model": "demo", "fp8": True, "quality": 5}) == ["fp8 False (now True)"]
    assert settings_changes([{"model": "demo"}], {"model": "demo", "fp8": False}) == []
    drop_rows(s, {manifest_keys(s)[0]: [0]})  # rewriting a part keeps what it records
    assert previous_work(s, _hashes("b"), retry_errors=False).settings == [{"model": "demo", "seed": 0}]


def test_a_manifest_part_holds_all_of_a_shard_s_rows_or_none(tmp_path):
    """Ray Data may split a shard's rows into several blocks, which reach the driver one at a time. A part written
    between them named the shard with some of its rows; after a crash the resume rendered the others again into a
    new shard, and the old one, still named, kept their samples too: duplicates in the training data, and exit 0."""
    s = LocalStorage(tmp_path)

    def rows(shard: str, n: int, members: range, error: bool = False) -> pa.Table:
        ok = [{"id": f"{shard}{i}", "status": "ok", "key": f"shards/{shard}.tar", "shard_images": n} for i in members]
        bad = [{"id": f"{shard}-bad", "status": "error", "key": None, "shard_images": None}] if error else []
        return pa.Table.from_pylist(ok + bad, schema=SHARD_ROWS)

    writer = ManifestWriter(s, "run", rows=1, seconds=60)
    writer.add(pa.concat_tables([rows("a", 3, range(2), error=True), rows("b", 1, range(1))]))
    (first,) = manifest_keys(s)  # b whole, a's error row; a's two ok rows wait for its third
    assert sorted(read_part(s, first).column("id").to_pylist()) == ["a-bad", "b0"]
    assert writer.buffered == 2
    writer.add(rows("a", 3, range(2, 3)))
    assert sorted(read_part(s, manifest_keys(s)[1]).column("id").to_pylist()) == ["a0", "a1", "a2"]
    assert writer.buffered == 0

    writer.add(rows("c", 2, range(1)))  # a run stopped here writes none of c's rows: c is an orphan, redone
    writer.flush()
    assert len(manifest_keys(s)) == 2 and writer.buffered == 1
    writer.flush(everything=True)  # (the stream's end: whatever is there is written)
    assert read_part(s, manifest_keys(s)[2]).column("id").to_pylist() == ["c0"]
    files = ManifestWriter(s, "files", rows=1, seconds=60)  # the files layout has no shards: rows go as they come
    files.add(pa.Table.from_pylist([{"id": "x", "status": "ok", "key": "images/x.png"}]))
    assert files.buffered == 0 and len(manifest_keys(s, "files")) == 1


SHARD_ROWS = pa.schema(
    [("id", pa.string()), ("status", pa.string()), ("key", pa.string()), ("shard_images", pa.int32())]
)
