"""The storage layer on a local folder and on a real S3 server (SeaweedFS)."""

import io
import os
import stat

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workers import storage as storage_module
from workers.storage import LocalStorage, S3Storage, StorageError, StorageRefused, open_storage, sha256_hex


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return LocalStorage(tmp_path / "out")
    bucket = request.getfixturevalue("s3_bucket")
    return open_storage(f"s3://{bucket}/some/prefix")


def test_put_get_head_list(storage):
    stored = storage.put("images/ab/x-0.png", b"hello", content_type="image/png")
    assert (stored.sha256, stored.bytes, stored.existed) == (sha256_hex(b"hello"), 5, False)
    storage.put("images/cd/y-0.png", b"world!")
    storage.put("images2/z.png", b"other")
    assert storage.get("images/ab/x-0.png") == b"hello"
    head = storage.head("images/cd/y-0.png")
    assert (head.sha256, head.bytes) == (sha256_hex(b"world!"), 6)
    assert storage.head("images/nope.png") is None
    assert sorted(storage.list("images")) == [("images/ab/x-0.png", 5), ("images/cd/y-0.png", 6)]
    assert len(list(storage.list())) == 3
    storage.delete(["images/ab/x-0.png"])
    assert not storage.exists("images/ab/x-0.png")
    with pytest.raises(StorageError, match="nope.png"):
        storage.get("images/nope.png")
    # Messages name a location the user can find: the absolute path of a local file, the URL of an object.
    base = storage.root if isinstance(storage, LocalStorage) else storage.url
    expected = f"{base}/images/nope.png"
    assert storage.location("images/nope.png") == expected and expected.startswith(("/", "s3://"))


def test_if_absent_adopts_the_first_copy(storage):
    first = storage.put("k/a.bin", b"first", if_absent=True)
    again = storage.put("k/a.bin", b"second", if_absent=True)
    assert not first.existed and again.existed
    assert again.sha256 == sha256_hex(b"first") and again.bytes == 5
    assert storage.get("k/a.bin") == b"first"
    storage.put("k/a.bin", b"third")  # a plain put overwrites
    assert storage.get("k/a.bin") == b"third"


def test_a_local_conditional_write_whose_key_goes_before_the_head_writes_again(tmp_path, monkeypatch):
    """Taken when linked, deleted before the head read it (another run's lease released): written, not an error."""
    storage = LocalStorage(tmp_path)
    storage.put("a.bin", b"theirs")
    real_head = LocalStorage.head

    def head(self, key):
        self.delete([key])  # gone in between
        monkeypatch.setattr(LocalStorage, "head", real_head)
        return real_head(self, key)

    monkeypatch.setattr(LocalStorage, "head", head)
    stored = storage.put("a.bin", b"mine", if_absent=True)
    assert not stored.existed and storage.get("a.bin") == b"mine"


def test_parquet_reads_through_ranged_gets(storage):
    buf = io.BytesIO()
    pq.write_table(pa.table({"prompt": [f"p{i}" for i in range(1000)]}), buf, row_group_size=100)
    storage.put("in/prompts.parquet", buf.getvalue())
    with storage.open_input("in/prompts.parquet") as f:
        pf = pq.ParquetFile(f)
        assert pf.metadata.num_row_groups == 10
        assert pf.read_row_group(7).column("prompt")[0].as_py() == "p700"


def test_s3_opens_a_parquet_file_with_one_request_for_its_size_and_footer(s3_bucket, monkeypatch):
    """Planning opens every input file: one GET of the last 64 KiB gives the size and the footer (and all of a small
    file), where a HEAD then a GET of the footer took two round trips."""
    calls = []
    made = storage_module.s3_client

    def counted(*args, **kwargs):  # every thread's client: pyarrow reads row groups on its own threads
        client = made(*args, **kwargs)
        client.meta.events.register("before-call.s3", lambda model, **_: calls.append(model.name))
        return client

    monkeypatch.setattr(storage_module, "s3_client", counted)
    storage = open_storage(f"s3://{s3_bucket}/in")
    small, large = io.BytesIO(), io.BytesIO()
    pq.write_table(pa.table({"prompt": ["a", "b"]}), small)
    rows = [f"prompt {i} " + "x" * 40 for i in range(20_000)]  # ~1 MB: row groups before the last 64 KiB
    pq.write_table(pa.table({"prompt": rows}), large, row_group_size=2_000, compression="none")
    storage.put("small.parquet", small.getvalue())
    storage.put("large.parquet", large.getvalue())
    storage.put("empty.parquet", b"")

    calls.clear()
    with storage.open_input("small.parquet") as f:
        assert pq.read_table(f).column("prompt").to_pylist() == ["a", "b"]
    assert calls == ["GetObject"]

    calls.clear()
    with storage.open_input("large.parquet") as f:
        pf = pq.ParquetFile(f)
        assert pf.metadata.num_rows == 20_000 and calls == ["GetObject"]  # the footer came with the size
        assert pf.read_row_group(3).column("prompt")[0].as_py() == rows[6_000]
        assert calls == ["GetObject", "GetObject"]
        assert pf.read().column("prompt").to_pylist() == rows  # reads that reach into the tail are whole

    with storage.open_input("empty.parquet") as f:
        assert f.read() == b""
        with pytest.raises(pa.ArrowInvalid):
            pq.ParquetFile(f)
    with pytest.raises(StorageError, match=r"in/nope\.parquet: not found"):
        storage.open_input("nope.parquet")


def test_s3_open_takes_a_whole_object_from_a_server_that_ignores_the_range(monkeypatch):
    """A server may answer a range request with the whole object (200, no Content-Range): then that is the file."""
    from botocore.response import StreamingBody
    from botocore.stub import Stubber

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    buf = io.BytesIO()
    pq.write_table(pa.table({"prompt": ["a", "b", "c"]}), buf)
    data = buf.getvalue()
    storage = S3Storage("s3://bucket/in", max_attempts=1)
    with Stubber(storage.client) as stub:
        stub.add_response(
            "get_object", {"Body": StreamingBody(io.BytesIO(data), len(data)), "ContentLength": len(data)}
        )
        with storage.open_input("p.parquet") as f:
            assert pq.read_table(f).column("prompt").to_pylist() == ["a", "b", "c"]
        stub.assert_no_pending_responses()


def test_s3_open_reads_without_a_tail_from_a_server_that_refuses_suffix_ranges(monkeypatch):
    """416 on a suffix range is an empty object's answer, and a server's that takes no suffix ranges: the size then
    comes from a HEAD (an empty object reads as empty; pyarrow says it is not Parquet)."""
    from botocore.response import StreamingBody
    from botocore.stub import Stubber

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    storage = S3Storage("s3://bucket/in", max_attempts=1)
    data = bytes(range(100))
    with Stubber(storage.client) as stub:
        stub.add_client_error("get_object", "InvalidRange", http_status_code=416)
        stub.add_response("head_object", {"ContentLength": 100}, {"Bucket": "bucket", "Key": "in/p.parquet"})
        part = {"Body": StreamingBody(io.BytesIO(data[10:20]), 10), "ContentLength": 10}
        stub.add_response("get_object", part, {"Bucket": "bucket", "Key": "in/p.parquet", "Range": "bytes=10-19"})
        with storage.open_input("p.parquet") as f:
            assert f.seek(0, io.SEEK_END) == 100
            f.seek(10)
            assert f.read(10) == data[10:20]
        stub.assert_no_pending_responses()


def test_local_keys_cannot_escape(tmp_path):
    storage = LocalStorage(tmp_path / "out")
    with pytest.raises(StorageError, match="escapes"):
        storage.put("../outside.txt", b"x")
    assert not (tmp_path / "outside.txt").exists()


def test_local_delete_removes_the_folders_it_empties_and_keeps_the_rest(tmp_path):
    storage = LocalStorage(tmp_path / "out")
    for key in ("images/ab/1.png", "images/ab/2.png", "images/cd/3.png", "manifests/part-a.parquet"):
        storage.put(key, b"x")
    storage.delete(["images/ab/1.png", "images/ab/2.png", "manifests/part-a.parquet"])
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*")) == [
        "images",
        "images/cd",
        "images/cd/3.png",
    ]
    storage.delete(["images/cd/3.png"])
    assert (tmp_path / "out").is_dir() and not any((tmp_path / "out").iterdir())  # the root stays
    storage.put("images/ab/1.png", b"y")  # and a folder removed is made again
    assert storage.get("images/ab/1.png") == b"y"


def test_local_files_get_the_mode_open_gives_them(tmp_path):
    # Not mkstemp's 0o600: a shared output folder's images are for its other users too.
    old = os.umask(0o027)
    try:
        storage = LocalStorage(tmp_path / "out")
        storage.put("images/a.png", b"x")
        storage.put("images/b.png", b"y", if_absent=True)
    finally:
        os.umask(old)
    for name in ("a.png", "b.png"):
        assert stat.S_IMODE((tmp_path / "out" / "images" / name).stat().st_mode) == 0o640, name
    assert not list((tmp_path / "out" / "images").glob(".tmp-*"))  # no temporary file left


def test_s3_errors_name_the_location_not_the_secret(s3_bucket, monkeypatch):
    from tests.servers import S3_SECRET_KEY

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + S3_SECRET_KEY)
    storage = S3Storage(f"s3://{s3_bucket}/p", max_attempts=1)
    with pytest.raises(StorageError) as e:
        storage.put("a.txt", b"x")
    assert f"s3://{s3_bucket}/p/a.txt" in str(e.value)
    assert S3_SECRET_KEY not in str(e.value)


def test_s3_refusals_are_told_from_outages(s3_bucket, monkeypatch):
    """A missing bucket or refused credentials: StorageRefused (a setting to fix, which no rerun changes); a server
    error after the retries: a plain StorageError (an outage, which a rerun may outlast)."""
    from botocore.exceptions import ClientError

    with pytest.raises(StorageRefused, match="NoSuchBucket"):
        list(S3Storage("s3://no-such-bucket-here/x", max_attempts=1).list())
    storage = S3Storage(f"s3://{s3_bucket}/p", max_attempts=1)
    storage.put("a.txt", b"x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    for call in (lambda s: s.put("b.txt", b"y"), lambda s: list(s.list()), lambda s: s.head("a.txt")):
        with pytest.raises(StorageRefused):
            call(S3Storage(f"s3://{s3_bucket}/p", max_attempts=1))  # a new client: the new credentials
    # A HEAD's answer has no body: its code is its status; 400 there is an expired or malformed token.
    expired = ClientError({"Error": {"Code": "400"}, "ResponseMetadata": {"HTTPStatusCode": 400}}, "HeadObject")
    assert type(storage._fail("checking", "a.txt", expired)) is StorageRefused
    unwell = ClientError({"Error": {"Code": "InternalError"}, "ResponseMetadata": {"HTTPStatusCode": 500}}, "PutObject")
    error = storage._fail("writing", "a.txt", unwell)
    assert (
        type(error) is StorageError
        and str(error) == f"writing s3://{s3_bucket}/p/a.txt failed: InternalError (HTTP 500)"
    )


def test_s3_url_checks():
    with pytest.raises(ValueError, match="at least 3"):
        S3Storage("s3://ab/x")
    storage = open_storage("s3://bucket/a/b/")
    assert (storage.bucket, storage.prefix, storage.url) == ("bucket", "a/b", "s3://bucket/a/b")


def test_s3_keys_a_delete_reports_as_failed_are_tried_again_then_named(monkeypatch):
    """A multi-object delete answers HTTP 200 with a list of the keys it could not delete: those are retried, and
    a key that still fails stops the delete with its name, never passes as deleted."""
    from botocore.stub import Stubber

    monkeypatch.setattr("workers.storage.time.sleep", lambda s: None)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    storage = S3Storage("s3://bucket/run", max_attempts=1)
    wanted = [{"Key": "run/manifests/a.parquet"}, {"Key": "run/_SUCCESS"}]
    denied = {"Key": "run/_SUCCESS", "Code": "AccessDenied", "Message": "Access Denied"}
    with Stubber(storage.client) as stub:
        stub.add_response(
            "delete_objects",
            {"Errors": [{"Key": "run/_SUCCESS", "Code": "InternalError", "Message": "try again"}]},
            {"Bucket": "bucket", "Delete": {"Objects": wanted, "Quiet": True}},
        )
        stub.add_response(  # the retry asks for the failed key alone, and it goes
            "delete_objects", {}, {"Bucket": "bucket", "Delete": {"Objects": wanted[1:], "Quiet": True}}
        )
        storage.delete(["manifests/a.parquet", "_SUCCESS"])
        stub.assert_no_pending_responses()

        for _ in range(3):
            stub.add_response("delete_objects", {"Errors": [denied]})
        with pytest.raises(StorageRefused, match=r"deleting s3://bucket/run/_SUCCESS failed: AccessDenied \(1 of"):
            storage.delete(["_SUCCESS"])  # a policy without s3:DeleteObject: refused, not an outage


def test_s3_conditional_writes_that_meet_another_write_are_tried_again(monkeypatch):
    """AWS answers 409 ConditionalRequestConflict when a conditional write meets another write of the key in flight
    (a request retried while its first try is still running), and asks for a retry; a 412 whose HEAD then finds the
    key gone (deleted meanwhile) writes again too. Neither may stop the job."""
    from botocore.stub import ANY, Stubber

    monkeypatch.setattr("workers.storage.time.sleep", lambda s: None)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    storage = S3Storage("s3://bucket/run", max_attempts=1)
    put = {"Bucket": "bucket", "Key": "run/a.png", "Body": ANY, "Metadata": ANY, "IfNoneMatch": "*"}
    with Stubber(storage.client) as stub:
        stub.add_client_error("put_object", "ConditionalRequestConflict", http_status_code=409)
        stub.add_response("put_object", {}, put)
        stored = storage.put("a.png", b"x", if_absent=True)
        assert not stored.existed and stored.sha256 == sha256_hex(b"x")

        stub.add_client_error("put_object", "PreconditionFailed", http_status_code=412)
        stub.add_client_error("head_object", "404", http_status_code=404)
        stub.add_response("put_object", {}, put)
        assert not storage.put("a.png", b"x", if_absent=True).existed
        stub.assert_no_pending_responses()

        for _ in range(4):
            stub.add_client_error("put_object", "ConditionalRequestConflict", http_status_code=409)
        with pytest.raises(StorageError, match=r"run/a.png failed: still in conflict .* after 4 attempts"):
            storage.put("a.png", b"x", if_absent=True)


def test_s3_without_conditional_writes_falls_back_to_check_then_write_with_a_warning(monkeypatch):
    """A server that answers If-None-Match with 501 NotImplemented: the job warns once and checks before it writes,
    so a retried write still adopts the object stored (its sha256 from the HEAD's metadata)."""
    from botocore.stub import ANY, Stubber

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    storage = S3Storage("s3://bucket/run", max_attempts=1)
    plain = {"Bucket": "bucket", "Key": "run/a.png", "Body": ANY, "Metadata": ANY}
    with Stubber(storage.client) as stub:
        stub.add_client_error("put_object", "NotImplemented", http_status_code=501)
        stub.add_client_error("head_object", "404", http_status_code=404)
        stub.add_response("put_object", {}, plain)  # no IfNoneMatch from here on
        with pytest.warns(UserWarning, match="does not support conditional writes"):
            assert not storage.put("a.png", b"x", if_absent=True).existed
        head = {"ContentLength": 1, "Metadata": {"sha256": sha256_hex(b"x")}}
        stub.add_response("head_object", head, {"Bucket": "bucket", "Key": "run/a.png"})
        stored = storage.put("a.png", b"y", if_absent=True)  # taken: adopted, not overwritten
        assert stored.existed and stored.sha256 == sha256_hex(b"x")
        stub.assert_no_pending_responses()
