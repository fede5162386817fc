"""Prompts in: file discovery (local and S3), schema checks before anything starts, ids, seeds, keys, row errors."""

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cascade.request import Request
from jobs.config import from_mapping
from jobs.inputs import (
    InputError,
    batch_unit,
    bucket_runs,
    changed_positions,
    expand_row,
    find_files,
    image_count,
    image_hash,
    image_key,
    image_seed,
    pending_images,
    plan,
    read_fragments,
    read_rows,
    segments,
)

SMALL = {"width": 256, "height": 256, "prior_steps": 2, "decoder_steps": 2}


def config(prompts, **kw):
    return from_mapping({"prompts": str(prompts), "out": "unused", **SMALL, **kw})


def write(path, **columns):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def test_find_files_local(tmp_path):
    write(tmp_path / "in/a.parquet", prompt=["x"])
    write(tmp_path / "in/sub/b.parquet", prompt=["y"])
    (tmp_path / "in/notes.txt").write_text("not parquet")
    _, found = find_files(str(tmp_path / "in"))
    assert [name for _, name in found] == ["a.parquet", "sub/b.parquet"]
    _, found = find_files(str(tmp_path / "in/*.parquet"))
    assert [name for _, name in found] == ["a.parquet"]
    _, found = find_files(str(tmp_path / "in/sub/b.parquet"))
    assert [name for _, name in found] == ["b.parquet"]
    with pytest.raises(InputError, match="no such file or folder"):
        find_files(str(tmp_path / "missing.parquet"))
    with pytest.raises(InputError, match="no Parquet files found"):
        find_files(str(tmp_path / "in/*.csv"))


def test_a_folder_leaves_out_hidden_and_underscore_files_and_the_jobs_own_output(tmp_path):
    """A notebook's checkpoint copy, Spark's `_temporary/`, a hidden file, and the manifests of an output placed inside
    the prompts folder would each be read as prompts (without ids: rendered again under new ids; with them: a
    duplicate id that refuses every rerun)."""
    for name in ("a.parquet", ".ipynb_checkpoints/a-checkpoint.parquet", "_temporary/0/part.parquet", ".b.parquet",
                 "out/manifests/part-r1-000000.parquet", "outer/c.parquet"):  # fmt: skip
        write(tmp_path / "in" / name, prompt=["x"])
    _, found = find_files(str(tmp_path / "in"), out=str(tmp_path / "in/out"))
    assert [name for _, name in found] == ["a.parquet", "outer/c.parquet"]
    _, found = find_files(str(tmp_path / "in"), out=str(tmp_path / "in/out/"))
    assert [name for _, name in found] == ["a.parquet", "outer/c.parquet"]
    (tmp_path / "link").symlink_to(tmp_path / "in")  # the output named through a link: the same folder
    _, found = find_files(str(tmp_path / "in"), out=str(tmp_path / "link/out"))
    assert [name for _, name in found] == ["a.parquet", "outer/c.parquet"]
    # An output that holds the prompts folder (--out .): only its manifests are the job's.
    _, found = find_files(str(tmp_path / "in"), out=str(tmp_path))
    assert [name for _, name in found] == ["a.parquet", "out/manifests/part-r1-000000.parquet", "outer/c.parquet"]
    manifest = "in/out/manifests/part-r1-000000.parquet"  # named as the input, a file is read wherever it is
    assert find_files(str(tmp_path / manifest), out=str(tmp_path / "in/out"))[1] == [("part-r1-000000.parquet",) * 2]


def test_a_glob_takes_hidden_and_underscore_names_only_where_it_names_them(tmp_path):
    """`spark/**/*.parquet` took Spark's leftover `_temporary/` attempt files (the same prompts rendered twice under
    other ids) and `spark/*` stopped at its `_SUCCESS` (a review, 2026-11-30): the folder rule holds for globs."""
    for name in ("part-0.parquet", "sub/part-1.parquet", "_temporary/0/task_1/part-0.parquet", ".part-2.parquet"):
        write(tmp_path / "spark" / name, prompt=["x"])
    (tmp_path / "spark/_SUCCESS").write_text("")
    for pattern, names in [
        ("spark/**/*.parquet", ["part-0.parquet", "sub/part-1.parquet"]),
        ("spark/*", ["part-0.parquet"]),
        ("spark/_temporary/**/*.parquet", ["0/task_1/part-0.parquet"]),  # named: taken (names below the base)
        ("spark/.part-*.parquet", [".part-2.parquet"]),
    ]:
        assert [n for _, n in find_files(str(tmp_path / pattern))[1]] == names, pattern
    _, found = find_files(str(tmp_path / "spark/_*/**/*.parquet"))  # a pattern part that starts with _ names them
    assert [n for _, n in found] == ["_temporary/0/task_1/part-0.parquet"]


def test_find_files_reads_links_where_they_appear_expands_home_in_globs_and_takes_existing_names_literally(
    tmp_path, monkeypatch
):
    write(tmp_path / "elsewhere/real.parquet", prompt=["x"])
    (tmp_path / "in").mkdir()
    (tmp_path / "in/linked.parquet").symlink_to(tmp_path / "elsewhere/real.parquet")
    (tmp_path / "in/folder").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    for prompts, name in [("in/linked.parquet", "linked.parquet"), ("in/folder", "real.parquet")]:
        storage, found = find_files(str(tmp_path / prompts))
        assert [n for _, n in found] == [name]
        assert pq.read_table(storage.open_input(found[0][0])).column("prompt").to_pylist() == ["x"]
    _, found = find_files(str(tmp_path / "in/*.parquet"))  # a glob matches the link too
    assert [n for _, n in found] == ["linked.parquet"]

    monkeypatch.setenv("HOME", str(tmp_path))
    _, found = find_files("~/elsewhere/*.parquet")
    assert [n for _, n in found] == ["real.parquet"]

    write(tmp_path / "runs[1]/q.parquet", prompt=["y"])  # glob characters in a name that exists
    for prompts in ("runs[1]/q.parquet", "runs[1]"):
        _, found = find_files(str(tmp_path / prompts))
        assert [n for _, n in found] == ["q.parquet"]


def test_find_files_and_plan_on_s3(s3_bucket, tmp_path):
    import io

    from workers.storage import open_storage

    storage = open_storage(f"s3://{s3_bucket}")
    files = [("run/a.parquet", ["x", "y"]), ("run/b/c.parquet", ["z"]), ("other/d.parquet", ["w"])]
    left_out = [("run/_temporary/f.parquet", ["t"]), ("run/.g.parquet", ["h"]), ("run/out/manifests/p.parquet", ["m"])]
    for key, prompts in files + left_out + [("v[2]/e.parquet", ["v"])]:
        buf = io.BytesIO()
        pq.write_table(pa.table({"prompt": prompts}), buf)
        storage.put(key, buf.getvalue())
    _, found = find_files(f"s3://{s3_bucket}/run", out=f"s3://{s3_bucket}/run/out/")
    assert [name for _, name in found] == ["a.parquet", "b/c.parquet"]  # no hidden files, none of the output's
    _, found = find_files(f"s3://{s3_bucket}/run/*.parquet")
    assert [name for _, name in found] == ["a.parquet"]
    _, found = find_files(f"s3://{s3_bucket}/run/**/*.parquet")  # hidden names only where the pattern names them
    assert [name for _, name in found] == ["a.parquet", "b/c.parquet", "out/manifests/p.parquet"]
    _, found = find_files(f"s3://{s3_bucket}/run/_temporary/*.parquet")
    assert [name for _, name in found] == ["f.parquet"]
    _, found = find_files(f"s3://{s3_bucket}/v[2]/e.parquet")  # an existing key is taken as it is, not as a glob
    assert found == [("v[2]/e.parquet", "e.parquet")]
    storage.put("single.pq", storage.get("run/a.parquet"))  # a file is a file, whatever its name ends with
    assert find_files(f"s3://{s3_bucket}/single.pq")[1] == [("single.pq", "single.pq")]
    p = plan(config(f"s3://{s3_bucket}/run/", out=f"s3://{s3_bucket}/run/out"))
    assert (p.rows, p.images) == (3, 3)
    with pytest.raises(InputError, match="no Parquet files"):
        plan(config(f"s3://{s3_bucket}/nothing-here"))


def test_plan_counts_images_and_rejects_bad_files(tmp_path):
    write(tmp_path / "ok.parquet", prompt=["a", "b", "c"], num_images=[2, None, 0])
    p = plan(config(tmp_path / "ok.parquet", num_images=3))
    assert (p.rows, p.images) == (3, 2 + 3 + 1)  # num_images 0 still accounts for one (error) row
    assert len(p.image_hashes) == 6 and np.all(np.diff(p.image_hashes.astype(np.float64)) >= 0)

    write(tmp_path / "noprompt.parquet", text=["a"])
    with pytest.raises(InputError, match=r"noprompt.parquet has no 'prompt' column \(columns: text\)"):
        plan(config(tmp_path / "noprompt.parquet"))
    (tmp_path / "fake.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(InputError, match="fake.parquet is not a readable Parquet file"):
        plan(config(tmp_path / "fake.parquet"))
    write(tmp_path / "types.parquet", prompt=["a"], width=["wide"])
    with pytest.raises(InputError, match="column 'width' has type string; use integers"):
        plan(config(tmp_path / "types.parquet"))
    write(tmp_path / "numprompt.parquet", prompt=[1])
    with pytest.raises(InputError, match="column 'prompt' has type int64; use strings"):
        plan(config(tmp_path / "numprompt.parquet"))
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    with pytest.raises(InputError, match="no rows"):
        plan(config(tmp_path / "empty.parquet"))


def test_plan_reads_files_concurrently_with_the_result_and_errors_of_reading_them_in_order(tmp_path, monkeypatch):
    import threading
    import time

    from jobs import inputs

    for i in range(12):
        write(
            tmp_path / f"in/p{i:02d}.parquet",
            prompt=[f"p{i} r{r}" for r in range(i + 1)],
            **{f"extra{i % 3}": [i] * (i + 1)},
        )
    seen, lock, running, most = [], threading.Lock(), [0], [0]
    opened = inputs._open_parquet

    def slow_first_files(storage, key):  # the first files finish last
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.3 if key.endswith(("p00.parquet", "p01.parquet")) else 0.02)
        with lock:
            running[0] -= 1
            seen.append(key)
        return opened(storage, key)

    monkeypatch.setattr(inputs, "_open_parquet", slow_first_files)
    concurrent = plan(config(tmp_path / "in"))
    assert most[0] > 1 and seen[-1].endswith(("p00.parquet", "p01.parquet"))  # several at once, out of order
    monkeypatch.setattr(inputs, "PLAN_THREADS", 1)
    one_at_a_time = plan(config(tmp_path / "in"))
    assert [s.name for s in concurrent.sources] == [f"p{i:02d}.parquet" for i in range(12)]
    sources = [[(s.key, s.name, s.row_groups) for s in p.sources] for p in (concurrent, one_at_a_time)]
    assert sources[0] == sources[1] and concurrent.extra == one_at_a_time.extra
    assert concurrent.extra.names == ["extra0", "extra1", "extra2"]
    assert np.array_equal(concurrent.image_hashes, one_at_a_time.image_hashes)
    assert (concurrent.rows, concurrent.images, concurrent.positional) == (78, 78, one_at_a_time.positional)

    # The first bad file in order is named, though a later one failed first.
    monkeypatch.setattr(inputs, "PLAN_THREADS", 8)
    write(tmp_path / "in/p01.parquet", text=["no prompt"])
    write(tmp_path / "in/p09.parquet", prompt=[1])
    with pytest.raises(InputError, match=r"p01.parquet has no 'prompt' column"):
        plan(config(tmp_path / "in"))


def test_a_file_removed_after_the_listing_is_named_as_input_not_as_an_outage(tmp_path, monkeypatch):
    from jobs import inputs

    write(tmp_path / "in/a.parquet", prompt=["a"])
    write(tmp_path / "in/b.parquet", prompt=["b"])
    listed = inputs.find_files

    def then_removed(*args):
        found = listed(*args)
        (tmp_path / "in/b.parquet").unlink()
        return found

    monkeypatch.setattr(inputs, "find_files", then_removed)
    with pytest.raises(InputError, match=r"in/b.parquet: not found \(removed since the prompts were listed\)"):
        plan(config(tmp_path / "in"))


def test_the_planning_threads_hold_at_most_the_row_budget_unless_one_file_is_larger():
    import threading
    import time

    from jobs.inputs import _RowBudget

    budget, held, lock, most, over = _RowBudget(100), [0], threading.Lock(), [0], []

    def work(rows):
        with budget.hold(rows):
            with lock:
                held[0] += rows
                most[0] = max(most[0], held[0])
                if held[0] > 100 and held[0] != rows:
                    over.append(held[0])  # past the budget, and not a large file alone
            time.sleep(0.01)
            with lock:
                held[0] -= rows

    threads = [threading.Thread(target=work, args=(rows,)) for rows in [40, 70, 30, 250, 60, 10, 100, 90] * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert held[0] == 0 and budget.held == 0
    assert most[0] == 250 and over == []  # the 250-row files ran alone; all else within 100
    assert all(not t.is_alive() for t in threads)


def test_duplicate_ids_are_refused_naming_both_rows(tmp_path):
    write(tmp_path / "in/a.parquet", prompt=["a", "b"], id=["x", "y"])
    write(tmp_path / "in/b.parquet", prompt=["c"], id=["x"])
    with pytest.raises(InputError, match=r"duplicate id 'x': .*a.parquet row 0 and .*b.parquet row 0"):
        plan(config(tmp_path / "in"))


def test_expand_row_ids_seeds_and_defaults():
    c = config("p", seed=5, num_images=1)
    images = expand_row({"prompt": "a cat", "num_images": 3}, "part.parquet", 7, c)
    assert [i["id"] for i in images] == ["part.parquet:7"] * 3
    assert [i["image_index"] for i in images] == [0, 1, 2]
    seeds = [i["seed"] for i in images]
    assert len(set(seeds)) == 3 and all(0 <= s < 2**63 for s in seeds)
    assert seeds == [image_seed(None, 5, "part.parquet:7", k) for k in range(3)]  # stable across reruns
    assert seeds != [image_seed(None, 6, "part.parquet:7", k) for k in range(3)]  # the job seed matters
    given = expand_row({"prompt": "a cat", "id": "cat", "seed": 100, "num_images": 2, "width": 512}, "p", 0, c)
    assert [(i["seed"], i["width"], i["height"], i["error"]) for i in given] == [
        (100, 512, 256, None),
        (101, 512, 256, None),
    ]
    assert given[0]["key"] == image_key("cat", 0, "png") == "images/" + given[0]["key"].split("/", 1)[1]
    assert given[0]["sampler"] == "ddpm"  # the job's
    assert expand_row({"prompt": "a", "sampler": "ddim"}, "p", 0, c)[0]["sampler"] == "ddim"  # the row's own


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": None}, "prompt: missing (null)"),
        ({"prompt": "   \t"}, "prompt: empty"),
        ({"prompt": "a", "width": 100}, "width: 100 is not supported"),
        ({"prompt": "a", "height": -256}, "height: -256 is not supported"),
        ({"prompt": "a", "width": 10**12}, "width: 1000000000000 is not supported"),
        ({"prompt": "a", "prior_steps": 0}, "prior_steps: 0 is not allowed"),
        ({"prompt": "a", "decoder_steps": 10**6}, "decoder_steps: 1000000 is not allowed"),
        ({"prompt": "a", "prior_cfg": math.nan}, "prior_cfg: nan is not allowed"),
        ({"prompt": "a", "seed": -1}, "seed: -1 is not allowed"),
        ({"prompt": "a", "num_images": 0}, "num_images: 0 is not allowed"),
        ({"prompt": "a", "num_images": 10**9}, "num_images: 1000000000 is not allowed"),
        ({"prompt": "a", "width": 256.5}, "width: 256.5 is not allowed; use an integer"),
        ({"prompt": "a", "sampler": "euler"}, "sampler: 'euler' is not known; allowed are ['ddim', 'ddpm']"),
    ],
)
def test_bad_rows_become_an_error_row_per_image_they_ask_for(row, message):
    images = expand_row(row, "p.parquet", 3, config("p"))
    assert len(images) == 1 and message in images[0]["error"]
    assert images[0]["id"] == "p.parquet:3" and images[0]["image_index"] == 0
    # With 3 images a row (the job's default here), as many error rows as plan() counted for the row: the job
    # accounts for each (one where num_images itself is what is wrong).
    images = expand_row(row, "p.parquet", 3, config("p", num_images=3))
    expected = image_count(row.get("num_images"), 3)
    assert [i["image_index"] for i in images] == list(range(expected)) and expected == (1 if "num_images" in row else 3)
    assert all(message in i["error"] for i in images)


def test_seed_above_the_range_after_adding_the_index_is_an_error():
    images = expand_row({"prompt": "a", "seed": 2**63 - 1, "num_images": 2}, "p", 0, config("p"))
    assert images[0]["error"] is None and "seed" in images[1]["error"]


@pytest.mark.parametrize(
    "id_",
    ["a/b/c", "../../etc/passwd", "/abs/path", "..", ".hidden", "x" * 1000, "é漢字🙂", "a\0b", "", "dup dup"],
)
def test_keys_stay_inside_the_images_prefix(id_):
    key = image_key(id_, 3, "png")
    head, shard, name = key.split("/")
    assert head == "images" and len(shard) == 2 and name.endswith("-3.png")
    assert not name.startswith(".") and ".." not in key.split("/")
    assert len(key.encode()) <= 140
    assert all(c.isascii() and (c.isalnum() or c in "._-/") for c in key)


def test_different_ids_never_share_a_key():
    ids = ["a/b", "a_b", "a:b", "x" * 1000, "x" * 999 + "y", "A", "a"]
    keys = {image_key(i, 0, "png") for i in ids}
    assert len(keys) == len(ids)
    # An id that reads as another's changed name: the same 2-hex folder, so without the hash added it is the same key.
    changed = image_key("cat/71", 0, "png")
    lookalike = changed.split("/")[2].removesuffix("-0.png")
    assert lookalike == "cat_71-9d41d0b745506c75" and image_key(lookalike, 0, "png").startswith("images/9d/")
    assert image_key(lookalike, 0, "png") != changed


def test_read_fragments_skips_done_images_and_carries_extra_columns(tmp_path):
    write(
        tmp_path / "p.parquet",
        prompt=["a", "b", "c"],
        id=["i0", "i1", "i2"],
        style=["s0", "s1", "s2"],
        key=["user-key-0", "user-key-1", "user-key-2"],  # a reserved name: carried as input_key
        input_key=["k0", "k1", "k2"],  # so this one is carried as input_input_key
        queue_bytes=[7, 8, 9],  # the stages' own columns are reserved too
        input_image=["x0", "x1", "x2"],  # a prefix alone changes nothing
    )
    c = config(tmp_path / "p.parquet")
    p = plan(c)
    assert p.extra.names == ["style", "input_key", "input_input_key", "input_queue_bytes", "input_image"]
    done = np.sort(np.array([image_hash("i1", 0)], dtype=np.uint64))
    tables = list(read_fragments(pa.Table.from_pylist(segments(p.sources, 100)[0]), p.sources, c, p.extra, done))
    rows = pa.concat_tables(tables).to_pylist()
    assert [r["id"] for r in rows] == ["i0", "i2"]
    assert [(r["style"], r["input_key"]) for r in rows] == [("s0", "user-key-0"), ("s2", "user-key-2")]
    assert [(r["input_input_key"], r["input_queue_bytes"], r["input_image"]) for r in rows] == [
        ("k0", 7, "x0"),
        ("k2", 9, "x2"),
    ]
    assert rows[0]["key"].startswith("images/")
    assert segments(p.sources, 100) == [[{"source": 0, "row_group": 0, "first_row": 0, "start": 0, "stop": 3}]]


def _not_utf8(*values: bytes) -> pa.Array:
    """A string array holding these bytes as they are (pyarrow checks UTF-8 only as it decodes)."""
    offsets = np.cumsum([0, *map(len, values)]).astype(np.int32)
    return pa.Array.from_buffers(
        pa.string(), len(values), [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(values))]
    )


def test_text_that_is_not_utf8_is_an_error_row_of_its_own_and_an_id_so_refuses_the_file(tmp_path):
    """Web-scraped captions can hold bytes that are not UTF-8: decoding refused the reader's whole chunk, and the job
    stopped with a traceback at every rerun."""
    table = pa.table(
        {
            "prompt": _not_utf8(b"a cat", b"caf\xe9 au lait", b"a dog"),
            "id": ["i0", "i1", "i2"],
            "caption": _not_utf8(b"ok", b"ok", b"\xff"),  # an extra column, carried
        }
    )
    pq.write_table(table, tmp_path / "p.parquet")
    c = config(tmp_path / "p.parquet")
    p = plan(c)
    chunk = pa.Table.from_pylist(segments(p.sources, 100)[0])
    rows = pa.concat_tables(read_fragments(chunk, p.sources, c, p.extra, np.zeros(0, np.uint64))).to_pylist()
    assert [(r["id"], r["error"], r["prompt"], r["caption"]) for r in rows] == [
        ("i0", None, "a cat", "ok"),
        ("i1", "prompt: not UTF-8 text", None, "ok"),
        ("i2", "caption: not UTF-8 text", "a dog", None),
    ]
    pq.write_table(pa.table({"prompt": ["a", "b"], "id": _not_utf8(b"i0", b"\xc3(")}), tmp_path / "p.parquet")
    with pytest.raises(InputError, match=r"p.parquet: column 'id', row 1: not UTF-8 text; ids must be text"):
        plan(c)


def test_a_damaged_page_is_named_as_it_is_read(tmp_path):
    """The plan reads footers and ids; a damaged prompt page is found by the reader, which names the file and rows
    (the job then exits 2, tests/test_job_local.py)."""
    write(tmp_path / "p.parquet", prompt=[f"a red circle {i} " * 5 for i in range(50)], id=[f"d{i}" for i in range(50)])
    data = bytearray((tmp_path / "p.parquet").read_bytes())
    chunk = pq.ParquetFile(tmp_path / "p.parquet").metadata.row_group(0).column(0)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    data[start : start + 12] = b"\xff" * 12  # the prompt column's first page header
    (tmp_path / "p.parquet").write_bytes(bytes(data))
    c = config(tmp_path / "p.parquet")
    p = plan(c)
    items = pa.Table.from_pylist(segments(p.sources, 100)[0])
    with pytest.raises(InputError, match=r"p.parquet rows 0 to 50: the file cannot be read \(OSError: .*damaged"):
        list(read_fragments(items, p.sources, c, p.extra, np.zeros(0, np.uint64)))


def test_missing_bucket_and_empty_file_are_named(s3_bucket, tmp_path):
    with pytest.raises(InputError, match="s3://no-such-bucket-here"):
        plan(config("s3://no-such-bucket-here/prompts.parquet"))
    with pytest.raises(InputError, match="s3://no-such-bucket-here"):
        plan(config("s3://no-such-bucket-here/in/"))
    (tmp_path / "zero.parquet").write_bytes(b"")
    with pytest.raises(InputError, match="zero.parquet is not a readable Parquet file"):
        plan(config(tmp_path / "zero.parquet"))


def test_seed_beyond_int64_in_an_unsigned_column_is_a_row_error(tmp_path):
    pq.write_table(
        pa.table({"prompt": ["a", "b"], "seed": pa.array([2**63 + 5, 7], pa.uint64())}), tmp_path / "s.parquet"
    )
    p = plan(config(tmp_path / "s.parquet"))
    images = [
        expand_row(row, "s.parquet", i, config(tmp_path / "s.parquet"))
        for i, row in enumerate(pq.read_table(tmp_path / "s.parquet").to_pylist())
    ]
    assert p.images == 2
    assert "seed: 9223372036854775813 is not allowed" in images[0][0]["error"] and images[1][0]["error"] is None


def test_segments_cut_row_groups_and_files_into_row_ranges(tmp_path):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"prompt": [f"a{i}" for i in range(5)]}), tmp_path / "in/a.parquet", row_group_size=2)
    pq.write_table(pa.table({"prompt": ["b0", "b1", "b2"], "num_images": [1, 2, 1]}), tmp_path / "in/b.parquet")
    c = config(tmp_path / "in")
    p = plan(c)
    parts = segments(p.sources, 3)
    ranges = [[(i["source"], i["row_group"], i["first_row"], i["start"], i["stop"]) for i in part] for part in parts]
    assert ranges == [
        [(0, 0, 0, 0, 2), (0, 1, 2, 0, 1)],
        [(0, 1, 3, 1, 2), (0, 2, 4, 0, 1), (1, 0, 0, 0, 1)],
        [(1, 0, 1, 1, 3)],
    ]
    # Every row read exactly once, with the ids of its file and row.
    nothing = np.zeros(0, np.uint64)
    ids = [r["id"] for part in parts for t in read_fragments(pa.Table.from_pylist(part), p.sources, c, p.extra, nothing)
           for r in t.to_pylist()]  # fmt: skip
    assert ids == [f"a.parquet:{i}" for i in range(5)] + ["b.parquet:0", "b.parquet:1", "b.parquet:1", "b.parquet:2"]
    assert [pending_images(p.sources, part, 1, nothing) for part in parts] == [3, 3, 3]
    done = np.sort(np.array([image_hash("b.parquet:1", 1), image_hash("a.parquet:0", 0)], np.uint64))
    assert [pending_images(p.sources, part, 1, done) for part in parts] == [2, 3, 2]


def test_a_large_row_group_is_read_a_range_at_a_time_as_a_whole_read_would_give_it(tmp_path):
    # One row group of 20,000 rows (pandas' way), more than read_rows' batches of 8,192, with a dictionary column.
    n = 20_000
    table = pa.table(
        {"prompt": [f"p{i}" for i in range(n)], "style": pa.array(["a", "b"] * (n // 2)).dictionary_encode()}
    )
    (tmp_path / "in").mkdir()
    pq.write_table(table, tmp_path / "in/big.parquet")
    pf = pq.ParquetFile(tmp_path / "in/big.parquet")
    assert pf.metadata.num_row_groups == 1
    for start, stop in [(0, n), (0, 1), (8191, 8193), (12_345, 19_999), (16_384, n), (7, 7)]:
        whole = pf.read_row_group(0).slice(start, stop - start)
        assert read_rows(pf, 0, start, stop).equals(whole), (start, stop)
        assert read_rows(pf, 0, start, stop, ["prompt"]).equals(whole.select(["prompt"])), (start, stop)
    c = config(tmp_path / "in")
    p = plan(c)
    nothing = np.zeros(0, np.uint64)
    parts = segments(p.sources, 7_000)
    tables = [t for part in parts for t in read_fragments(pa.Table.from_pylist(part), p.sources, c, p.extra, nothing)]
    assert pa.concat_tables(tables).column("id").to_pylist() == [f"big.parquet:{i}" for i in range(n)]
    assert [pending_images(p.sources, part, 1, nothing) for part in parts] == [7_000, 7_000, 6_000]


def image(i: int, **request) -> dict:
    """An image row as expand_row makes it (an `error` row when request holds one)."""
    error = request.pop("error", None)
    return {**Request(prompt=f"p{i}", **request).__dict__, "id": f"r{i}", "error": error}


def bucket_of(row: dict):
    return None if row["error"] else (row["width"], row["prior_steps"], row["decoder_cfg"])


def test_bucket_runs_put_each_bucket_in_whole_batches():
    # Three buckets interleaved (steps, size, cfg), 8 images each, and 3 error rows: as a table of mixed requests.
    kinds = [{"prior_steps": 3}, {"prior_steps": 4, "width": 512}, {"prior_steps": 3, "decoder_cfg": 2.0}]
    images = [image(i, **kinds[i % 3]) for i in range(24)] + [image(24 + i, error="prompt: empty") for i in range(3)]
    chunks = list(bucket_runs(iter(images), unit=4, chunk_rows=16))
    stream = [row for chunk in chunks for row in chunk]
    assert sorted(r["id"] for r in stream) == sorted(r["id"] for r in images)  # every image once
    for key in {bucket_of(r) for r in images}:  # each bucket's own order kept
        assert [r["id"] for r in stream if bucket_of(r) == key] == [r["id"] for r in images if bucket_of(r) == key]
    assert all(len(chunk) % 4 == 0 for chunk in chunks[:-1])
    # Ray Data cuts the stream into blocks of the batch size: each holds one bucket, but for the error rows' tail.
    blocks = [stream[k : k + 4] for k in range(0, len(stream), 4)]
    assert [len({bucket_of(r) for r in block}) for block in blocks] == [1] * 6 + [1]
    assert [r["error"] for r in blocks[-1]] == ["prompt: empty"] * 3


def test_bucket_runs_with_many_small_buckets_hold_a_bounded_number_of_images():
    images = [image(i, prior_steps=1 + i) for i in range(50)]  # 50 buckets of one image: none fills a run
    read = emitted = 0

    def counted():
        nonlocal read
        for row in images:
            assert read - emitted < 16  # never more waiting than a chunk
            read += 1
            yield row

    for chunk in bucket_runs(counted(), unit=4, chunk_rows=16):
        emitted += len(chunk)
        assert emitted % 4 == 0 or emitted == 50
    assert emitted == 50


def test_batch_unit_is_a_multiple_of_both_pools_batches_when_small():
    assert batch_unit(4, 4) == 4 and batch_unit(2, 8) == 8 and batch_unit(3, 4) == 12
    assert batch_unit(1000, 999) == 1000  # the multiple would be 999,000 rows: Stage C's batch alone


def test_extra_columns_of_one_family_of_types_join_across_files_and_others_must_match(tmp_path):
    """pandas writes text as string, polars as large_string; int32 and int64 are both integers: one input may mix
    them. Text in one file and numbers in another is refused, naming both."""
    pq.write_table(pa.table({"prompt": ["a"], "style": ["s0"], "n": pa.array([1], pa.int32())}), tmp_path / "a.parquet")
    b = pa.table({"prompt": ["b"], "style": pa.array(["s1"], pa.large_string()), "n": pa.array([2**40], pa.int64())})
    pq.write_table(b, tmp_path / "b.parquet")
    c = config(tmp_path)
    p = plan(c)
    assert p.extra == pa.schema([("style", pa.string()), ("n", pa.int64())])
    items = pa.Table.from_pylist(segments(p.sources, 100)[0])
    rows = pa.concat_tables(read_fragments(items, p.sources, c, p.extra, np.zeros(0, np.uint64))).to_pylist()
    assert sorted((r["style"], r["n"]) for r in rows) == [("s0", 1), ("s1", 2**40)]

    pq.write_table(pa.table({"prompt": ["c"], "style": [3]}), tmp_path / "c.parquet")
    with pytest.raises(InputError, match="column 'style' has type int64, but string in an earlier file"):
        plan(config(tmp_path))


def test_extra_columns_as_pandas_writes_them_in_different_files_join(tmp_path):
    """pandas writes an integer column that has a missing value as floats, and a categorical one dictionary-encoded:
    the same column of another file, without a gap or as plain text, was refused ("int64, but double in an earlier
    file"). They join as floats and as strings."""
    import pandas as pd

    pd.DataFrame({"prompt": ["a", "b"], "score": [1.5, None], "tag": pd.Categorical(["x", "y"])}).to_parquet(
        tmp_path / "a.parquet"
    )
    pd.DataFrame({"prompt": ["c"], "score": [2**53 + 1], "tag": ["z"]}).to_parquet(tmp_path / "b.parquet")
    c = config(tmp_path)
    p = plan(c)
    assert p.extra == pa.schema([("score", pa.float64()), ("tag", pa.string())])
    items = pa.Table.from_pylist(segments(p.sources, 100)[0])
    rows = pa.concat_tables(read_fragments(items, p.sources, c, p.extra, np.zeros(0, np.uint64))).to_pylist()
    got = sorted((r["prompt"], r["score"], r["tag"]) for r in rows)
    assert got == [("a", 1.5, "x"), ("b", None, "y"), ("c", float(2**53), "z")]  # (as pandas reads it: Arrow refused)


def test_a_file_whose_id_column_has_nulls_is_checked_for_changes_as_one_without(tmp_path):
    """A null id is the row's position too: a row inserted before it gave its images to another prompt and the
    resume kept them, silently (a review, 2026-11-30). Such a file's prompts are digested as a file without ids."""
    pq.write_table(pa.table({"prompt": ["q0", "q1"], "id": ["q0", None]}), tmp_path / "b.parquet")
    then = plan(config(tmp_path / "b.parquet"))
    recorded = {"b.parquet": {(then.positional["b.parquet"], 2)}}
    pq.write_table(pa.table({"prompt": ["q0", "NEW", "q1"], "id": ["q0", None, None]}), tmp_path / "b.parquet")
    assert changed_positions(plan(config(tmp_path / "b.parquet")), recorded) == ["b.parquet"]
    pq.write_table(pa.table({"prompt": ["q0", "q1"], "id": ["q0", "q1"]}), tmp_path / "b.parquet")
    assert "b.parquet" not in plan(config(tmp_path / "b.parquet")).positional  # every row named: no digest needed


def test_a_file_without_ids_is_changed_unless_the_rows_earlier_runs_rendered_are_as_they_were(tmp_path):
    write(tmp_path / "p.parquet", prompt=["a", "b", "c"])
    then = plan(config(tmp_path / "p.parquet"))
    recorded = {"p.parquet": {(then.positional["p.parquet"], 3)}}
    assert changed_positions(then, recorded) == []
    write(tmp_path / "p.parquet", prompt=["a", "b", "c", "d"])  # appended: the first 3 are as they were
    assert changed_positions(plan(config(tmp_path / "p.parquet")), recorded) == []
    for prompts in (["x", "a", "b", "c"], ["a", "B", "c", "d"], ["a", "b"], ["a", None, "c"]):  # inserted, edited, cut
        write(tmp_path / "p.parquet", prompt=prompts)
        assert changed_positions(plan(config(tmp_path / "p.parquet")), recorded) == ["p.parquet"], prompts
    # A part written before the rows were recorded holds a bare digest: only the same prompts match it.
    write(tmp_path / "p.parquet", prompt=["a", "b", "c"])
    assert changed_positions(then, {"p.parquet": {(then.positional["p.parquet"], None)}}) == []
    write(tmp_path / "p.parquet", prompt=["a", "b", "c", "d"])
    now = plan(config(tmp_path / "p.parquet"))
    assert changed_positions(now, {"p.parquet": {(then.positional["p.parquet"], None)}}) == ["p.parquet"]


def test_categorical_strings_from_pandas_are_strings(tmp_path):
    """pandas writes a categorical column as dictionary-encoded strings: it was refused for prompt, negative_prompt
    and sampler ("use strings"). It reads as its strings, and its prompts digest as the plain column's do."""
    import pandas as pd

    frame = {"prompt": ["a cat", "a dog", "a cat"], "negative_prompt": ["blur", None, "blur"], "sampler": ["ddpm"] * 3}
    pd.DataFrame({k: pd.Categorical(v) for k, v in frame.items()}).to_parquet(tmp_path / "c.parquet")
    (tmp_path / "plain").mkdir()
    pd.DataFrame(frame).to_parquet(tmp_path / "plain" / "c.parquet")
    c = config(tmp_path / "c.parquet")
    p = plan(c)
    assert p.positional["c.parquet"] == plan(config(tmp_path / "plain" / "c.parquet")).positional["c.parquet"]
    items = pa.Table.from_pylist(segments(p.sources, 100)[0])
    rows = pa.concat_tables(read_fragments(items, p.sources, c, p.extra, np.zeros(0, np.uint64))).to_pylist()
    assert [(r["prompt"], r["negative_prompt"], r["sampler"], r["error"]) for r in rows] == [
        ("a cat", "blur", "ddpm", None),
        ("a dog", "", "ddpm", None),
        ("a cat", "blur", "ddpm", None),
    ]
