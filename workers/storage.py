"""One interface over the job's output and input locations: a local folder or an S3-compatible bucket prefix.

Keys are relative to the root (`images/ab/x-0.png`), always with `/`. The S3 side uses boto3 with the standard AWS
configuration (credential chain, `AWS_ENDPOINT_URL`, region), path-style addressing (what MinIO, Ceph, SeaweedFS and
most S3-compatible servers want) and botocore's retries with exponential backoff and jitter on throttling, 5xx and
connection errors.

`put(..., if_absent=True)` is the exactly-once primitive: it writes only when the key does not exist yet (S3
`If-None-Match: *`, a hard link on a local disk) and otherwise reports what is already there, so a retried writer (a
lost reply, a re-run task) adopts the first copy instead of overwriting it. Each object carries its sha256 in its
metadata, so adopting it needs a HEAD, not a download.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import random
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SHA256_META = "sha256"


class StorageError(RuntimeError):
    """A storage operation failed for good (after retries); the message names the location, never a credential."""


class StorageNotFound(StorageError):
    """The object to read is not there (a file listed as input, then removed)."""


class StorageRefused(StorageError):
    """The server refused the request for a reason no retry or rerun changes: the bucket does not exist, the
    credentials are missing, wrong or expired, or they lack the permission (a configuration error, not an outage)."""


# The error codes of S3 (and of the S3-compatible servers, which use its codes) that say the request itself is wrong,
# not that the server is unwell: a missing bucket, a wrong region or endpoint, credentials refused. Any HTTP 403 too
# (a HEAD's answer has no code). Throttling and 5xx stay plain StorageErrors: retried, then "rerun to resume".
REFUSED_CODES = {
    "NoSuchBucket", "InvalidBucketName", "PermanentRedirect", "AuthorizationHeaderMalformed", "InvalidAccessKeyId",
    "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "AccountProblem", "AllAccessDisabled", "AccessDenied",
    "RequestTimeTooSkewed",
    # a request the server will never take as it is (a key it cannot store, an argument it rejects)
    "InvalidRequest", "InvalidArgument", "InvalidURI", "InvalidObjectName", "KeyTooLongError",
}  # fmt: skip


def refused(code: str, status: int = 0) -> bool:
    """Whether an S3 error (its code, and its HTTP status where there is one) is a refusal, not an outage. A HEAD's
    answer has no body, so its code is its status: 400 is then an expired or malformed token, 301 another region's
    bucket."""
    return status == 403 or code in REFUSED_CODES or (code == str(status) and status in (301, 400))


@dataclass(frozen=True)
class Stored:
    key: str
    sha256: str
    bytes: int
    existed: bool  # True when if_absent found an object already there and adopted it


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_s3(url: str) -> bool:
    return str(url).startswith("s3://")


def join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


class Storage:
    """Base: a root location and key-level operations."""

    url: str

    def put(self, key: str, data: bytes, *, if_absent: bool = False, content_type: str = "") -> Stored:
        raise NotImplementedError

    def get(self, key: str) -> bytes:
        raise NotImplementedError

    def head(self, key: str) -> Stored | None:
        """The object's size and recorded sha256 (computed when the object carries none), or None if absent."""
        raise NotImplementedError

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        """(key, size) of every object under prefix, recursively."""
        raise NotImplementedError

    def delete(self, keys: list[str]) -> None:
        raise NotImplementedError

    def open_input(self, key: str):
        """A seekable binary file object, for pyarrow to read Parquet from."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        """Whether the key holds an object (never reads or hashes it)."""
        raise NotImplementedError

    def location(self, key: str = "") -> str:
        return join(self.url, key) if key else self.url


class LocalStorage(Storage):
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.url = str(self.root)

    def location(self, key: str = "") -> str:
        return str(self.root / key) if key else self.url  # (join would drop the root's leading /)

    def _path(self, key: str) -> Path:
        # Checked as written (.. and absolute keys), not resolved: a link the user put inside the folder is theirs.
        path = Path(os.path.normpath(self.root / key))
        if path != self.root and self.root not in path.parents:
            raise StorageError(f"key {key!r} escapes the output folder {self.root}")
        return path

    def put(self, key: str, data: bytes, *, if_absent: bool = False, content_type: str = "") -> Stored:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        digest = sha256_hex(data)
        # Write a temporary file beside the target, then link (fails if the target exists) or rename it into place:
        # a reader never sees a partial file. Made as open() makes a file (0o666 less the umask), not as mkstemp
        # does (0o600): the images of a render farm's shared folder are for its other users too.
        tmp = str(path.parent / f".tmp-{uuid.uuid4().hex}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileNotFoundError:  # the folder, empty, was removed by a delete in between (delete prunes them)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            if if_absent:
                for _ in range(WRITE_CONFLICT_ATTEMPTS):
                    try:
                        os.link(tmp, path)
                        break
                    except FileExistsError:
                        existing = self.head(key)
                        if existing is not None:
                            return Stored(key, existing.sha256, existing.bytes, existed=True)
                        if os.path.lexists(path) and not path.is_file():  # a folder or a dangling link: no object
                            raise StorageError(f"{self.location(key)} is in the way: not a file") from None
                        # Taken, then gone by the head (deleted meanwhile): link again, as S3's put writes again.
                else:
                    raise StorageError(f"writing {self.location(key)} failed: it kept appearing and going")
            else:
                os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return Stored(key, digest, len(data), existed=False)

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise StorageNotFound(f"{self.location(key)}: not found") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def head(self, key: str) -> Stored | None:
        path = self._path(key)
        if not path.is_file():
            return None
        data = path.read_bytes()
        return Stored(key, sha256_hex(data), len(data), existed=True)

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        base = self._path(prefix) if prefix else self.root
        if base.is_file():
            yield prefix, base.stat().st_size
            return
        if not base.is_dir():
            return
        for dirpath, _, files in os.walk(base):
            for name in sorted(files):
                if name.startswith(".tmp-"):
                    continue
                path = Path(dirpath) / name
                yield path.relative_to(self.root).as_posix(), path.stat().st_size

    def delete(self, keys: list[str]) -> None:
        """Remove the files, then the folders they leave empty (up to the root, which stays), as S3 has no folders
        to leave behind: --overwrite of a files-layout output used to leave 256 empty images/xx/ folders."""
        parents = set()
        for key in keys:
            path = self._path(key)
            path.unlink(missing_ok=True)
            parents.update(p for p in path.parents if self.root in p.parents)
        for folder in sorted(parents, key=lambda p: len(p.parts), reverse=True):  # the deepest first
            with contextlib.suppress(OSError):  # not empty (or gone): kept
                folder.rmdir()

    def open_input(self, key: str):
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError:
            raise StorageNotFound(f"{self.location(key)}: not found") from None


def s3_client(max_attempts: int = 10):
    """A boto3 S3 client from the standard AWS configuration, path-style, with standard-mode retries."""
    import boto3
    from botocore.config import Config

    config = Config(
        s3={"addressing_style": "path"},
        retries={"mode": "standard", "total_max_attempts": max_attempts},  # (max_attempts counts retries only)
        connect_timeout=10,
        read_timeout=60,
        # Newer botocore adds CRC checksums that some S3-compatible servers reject; only send them when required.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    session = boto3.session.Session()
    return session.client("s3", region_name=session.region_name or "us-east-1", config=config)


def _error_code(exc) -> tuple[str, int]:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    return code, int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


WRITE_CONFLICT_ATTEMPTS = 4  # a conditional write that met another write of its key (409), or a key taken then gone
DELETE_KEY_ATTEMPTS = 3  # for keys a multi-object delete reports as failed (the request itself has botocore's retries)


class S3Storage(Storage):
    """An `s3://bucket/prefix` location. Clients are created lazily per process (they do not pickle)."""

    def __init__(self, url: str, max_attempts: int = 10):
        if not is_s3(url):
            raise ValueError(f"not an s3:// URL: {url!r}")
        bucket, _, prefix = url[len("s3://") :].partition("/")
        if len(bucket) < 3:
            raise ValueError(f"{url!r}: the bucket name must have at least 3 characters")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.url = f"s3://{bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.max_attempts = max_attempts
        self._local = threading.local()
        self._conditional = True  # turned off once if the server rejects If-None-Match as not implemented

    def __getstate__(self):
        return {"bucket": self.bucket, "prefix": self.prefix, "url": self.url, "max_attempts": self.max_attempts}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()
        self._conditional = True

    @property
    def client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = s3_client(self.max_attempts)
        return client

    def _key(self, key: str) -> str:
        return join(self.prefix, key)

    def _fail(self, what: str, key: str, exc: Exception) -> StorageError:
        code, status = _error_code(exc)
        detail = f"{code} (HTTP {status})" if code else type(exc).__name__
        no_credentials = type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError")
        kind = StorageRefused if refused(code, status) or no_credentials else StorageError
        return kind(f"{what} {self.location(key)} failed: {detail}")

    def put(self, key: str, data: bytes, *, if_absent: bool = False, content_type: str = "") -> Stored:
        from botocore.exceptions import BotoCoreError, ClientError

        digest = sha256_hex(data)
        args = {"Bucket": self.bucket, "Key": self._key(key), "Body": data, "Metadata": {SHA256_META: digest}}
        if content_type:
            args["ContentType"] = content_type
        if if_absent and not self._conditional:
            existing = self.head(key)  # the server has no conditional writes: check, then write (a small race)
            if existing is not None:
                return existing
        elif if_absent:
            args["IfNoneMatch"] = "*"
        for attempt in range(WRITE_CONFLICT_ATTEMPTS):
            try:
                self.client.put_object(**args)
                return Stored(key, digest, len(data), existed=False)
            except ClientError as e:
                code, status = _error_code(e)
                if if_absent and (status == 412 or code == "PreconditionFailed"):
                    existing = self.head(key)
                    if existing is not None:
                        return existing
                    # Taken, then gone by the HEAD (deleted meanwhile): write again.
                elif if_absent and (status == 409 or code == "ConditionalRequestConflict"):
                    pass  # another write of this key was in flight (a retried request's first try): AWS says retry
                elif if_absent and code in ("NotImplemented", "InvalidArgument") and self._conditional:
                    warnings.warn(
                        f"{self.url}: the server does not support conditional writes (If-None-Match); "
                        "falling back to check-then-write",
                        stacklevel=2,
                    )
                    self._conditional = False
                    return self.put(key, data, if_absent=True, content_type=content_type)
                else:
                    raise self._fail("writing", key, e) from None
            except BotoCoreError as e:
                raise self._fail("writing", key, e) from None
            if attempt + 1 < WRITE_CONFLICT_ATTEMPTS:
                time.sleep(0.2 * 2**attempt)
        raise StorageError(
            f"writing {self.location(key)} failed: still in conflict with another write of it after "
            f"{WRITE_CONFLICT_ATTEMPTS} attempts"
        )

    def _get_object(self, key: str, **args) -> tuple[dict, bytes]:
        """A GET's response and its whole body. botocore retries a request until its headers come, not a body cut
        short or stalled after them (a connection reset mid-stream): that is retried here, as often, with backoff
        and jitter. Other errors are raised as botocore raises them (after its own retries: not retried again)."""
        from botocore.exceptions import IncompleteReadError, ResponseStreamingError
        from botocore.exceptions import ReadTimeoutError as BodyTimeout

        attempt = 1
        while True:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key), **args)
            try:
                return response, response["Body"].read()
            except (ResponseStreamingError, IncompleteReadError, BodyTimeout):
                if attempt >= self.max_attempts:
                    raise
                time.sleep(random.uniform(0, min(20.0, 2.0 ** (attempt - 1))))
                attempt += 1

    def get(self, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self._get_object(key)[1]
        except (ClientError, BotoCoreError) as e:
            raise self._fail("reading", key, e) from None

    def _head_object(self, key: str, what: str = "checking") -> dict | None:
        """The HEAD response, or None when the key holds no object."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as e:
            code, status = _error_code(e)
            if status == 404 or code in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._fail(what, key, e) from None
        except BotoCoreError as e:
            raise self._fail(what, key, e) from None

    def exists(self, key: str) -> bool:
        return self._head_object(key) is not None

    def head(self, key: str) -> Stored | None:
        response = self._head_object(key)
        if response is None:
            return None
        digest = response.get("Metadata", {}).get(SHA256_META)
        if not digest:  # written by something else: hash it once
            digest = sha256_hex(self.get(key))
        return Stored(key, digest, int(response["ContentLength"]), existed=True)

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        from botocore.exceptions import BotoCoreError, ClientError

        full = self._key(prefix)
        # List "prefix/" for folders so that "images" does not also match "images2/...".
        if full and not full.endswith("/") and prefix:
            full += "/"
        strip = len(self.prefix) + 1 if self.prefix else 0
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                for obj in page.get("Contents", []):
                    yield obj["Key"][strip:], int(obj["Size"])
        except (ClientError, BotoCoreError) as e:
            raise self._fail("listing", prefix, e) from None

    def delete(self, keys: list[str]) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        for start in range(0, len(keys), 1000):
            chunk = [{"Key": self._key(k)} for k in keys[start : start + 1000]]
            # The request can succeed while some of its keys fail (HTTP 200 with an Errors list: access denied, or
            # an internal error on one key). Those keys are tried again, then the delete fails naming one: a key
            # left behind would leave stale manifest rows or a stale _SUCCESS in the output.
            for attempt in range(DELETE_KEY_ATTEMPTS):
                try:
                    response = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": chunk, "Quiet": True})
                except (ClientError, BotoCoreError) as e:
                    raise self._fail("deleting under", "", e) from None
                errors = response.get("Errors") or []
                if not errors:
                    break
                chunk = [{"Key": e["Key"]} for e in errors]
                if attempt + 1 < DELETE_KEY_ATTEMPTS:
                    time.sleep(0.2 * 2**attempt)
            else:
                first, strip = errors[0], len(self.prefix) + 1 if self.prefix else 0
                kind = StorageRefused if refused(first.get("Code", "")) else StorageError  # AccessDenied: no s3:Delete
                raise kind(
                    f"deleting {self.location(first['Key'][strip:])} failed: {first.get('Code', 'an error')} "
                    f"({len(errors)} of the keys were not deleted after {DELETE_KEY_ATTEMPTS} attempts)"
                )

    def open_input(self, key: str):
        """The object's last TAIL_BYTES and its size come in one request (in place of a HEAD, then the footer)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response, tail = self._get_object(key, Range=f"bytes=-{TAIL_BYTES}")
        except ClientError as e:
            code, status = _error_code(e)
            if status == 404 or code in ("404", "NoSuchKey", "NotFound"):
                raise StorageNotFound(f"{self.location(key)}: not found") from None
            if status == 416 or code == "InvalidRange":
                # An empty object has no last bytes; a server without suffix ranges may say so of any object: the
                # size then comes from a HEAD, and the object is read without a tail.
                head = self._head_object(key, "reading")
                if head is None:
                    raise StorageNotFound(f"{self.location(key)}: not found") from None
                return _RangeReader(self, key, int(head["ContentLength"]), b"")
            raise self._fail("reading", key, e) from None
        except BotoCoreError as e:
            raise self._fail("reading", key, e) from None
        # "bytes 936-1959/1960"; a server that ignores the range sends the whole object, without it
        content_range = response.get("ContentRange") or ""
        size = int(content_range.rpartition("/")[2]) if content_range else len(tail)
        return _RangeReader(self, key, size, tail)


TAIL_BYTES = 64 * 1024  # what pyarrow reads first for a Parquet footer; all of a small file


class _RangeReader(io.RawIOBase):
    """A read-only, seekable file over ranged GETs, so pyarrow reads only the footer and the row groups it needs. The
    object's last bytes, read when it was opened, are served without a request."""

    def __init__(self, storage: S3Storage, key: str, size: int, tail: bytes):
        self.storage, self.key, self.size, self.pos = storage, key, size, 0
        self.tail, self.tail_start = tail, size - len(tail)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def read(self, n: int = -1) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        end = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        if end <= self.pos:
            return b""
        if self.pos >= self.tail_start:
            data = self.tail[self.pos - self.tail_start : end - self.tail_start]
            self.pos += len(data)
            return data
        s = self.storage
        try:
            _, data = s._get_object(self.key, Range=f"bytes={self.pos}-{end - 1}")
        except (ClientError, BotoCoreError) as e:
            raise s._fail("reading", self.key, e) from None
        self.pos += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def open_storage(url: str | os.PathLike, max_attempts: int = 10) -> Storage:
    """`s3://bucket/prefix` or a local folder."""
    url = str(url)
    return S3Storage(url, max_attempts) if is_s3(url) else LocalStorage(url)
