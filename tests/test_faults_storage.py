"""Storage faults: the job against the real S3 server (SeaweedFS) behind a fault-injecting proxy.

An outage longer than the retry budget stops the job with a clear message and no `_SUCCESS`; the rerun after it meets
throttling, 500s, connection resets (before and after the server acted) and slow replies, retries them with backoff,
and completes with every image exactly once.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.faultproxy import FAULTS, FaultProxy
from tests.jobhelpers import FAST, check_output, parquet_bytes, prompts_table
from tests.servers import S3_HOST, S3_SECRET_KEY, s3_port
from workers.storage import StorageError, open_storage


@pytest.fixture
def proxy(seaweed):
    p = FaultProxy((S3_HOST, s3_port()), slow_seconds=1.0)
    yield p
    p.stop()


def run_job(bucket: str, proxy: FaultProxy, *flags: str) -> subprocess.CompletedProcess:
    """The job in its own process, as a user runs it, reaching S3 only through the proxy."""
    argv = ["--prompts", f"s3://{bucket}/in/", "--out", f"s3://{bucket}/out", *FAST, *flags]
    argv += ["--prior-pool-batch-size", "2", "--decoder-pool-batch-size", "2", "--manifest-rows", "2"]
    env = {**os.environ, "AWS_ENDPOINT_URL": proxy.url}
    return subprocess.run(
        [sys.executable, "-m", "jobs.generate", *argv], env=env, capture_output=True, text=True, timeout=400
    )


def within_the_retry_budget(proxy: FaultProxy) -> None:
    """The first image writes get each kind of fault once (reset_after first: the write is stored, its reply lost);
    and every third request gets one, in turn: each kind many times, on reads, listings and writes alike."""
    image_puts = []

    def rule(method: str, path: str, n: int) -> str | None:
        if method == "PUT" and "/out/images/" in path:
            image_puts.append(path)
            if len(image_puts) <= len(FAULTS):
                return ("reset_after", *[f for f in FAULTS if f != "reset_after"])[len(image_puts) - 1]
        return FAULTS[(n // 3) % len(FAULTS)] if n % 3 == 0 else None

    proxy.rule = rule


def test_an_outage_stops_the_job_and_a_rerun_through_faults_within_the_retry_budget_completes_it(s3_bucket, proxy):
    bucket = open_storage(f"s3://{s3_bucket}")  # direct to the server: the test's own view
    bucket.put("in/prompts.parquet", parquet_bytes(prompts_table(10)))
    image_puts = []

    def outage_after_three_images(method: str, path: str, n: int) -> str | None:
        if method == "PUT" and "/out/images/" in path:
            image_puts.append(path)
        return "slowdown" if len(image_puts) > 3 else None

    proxy.rule = outage_after_three_images
    failed = run_job(s3_bucket, proxy, "--storage-attempts", "3")
    assert failed.returncode == 1, failed.stderr[-4000:]
    out = open_storage(f"s3://{s3_bucket}/out")
    assert not out.exists("_SUCCESS")
    # The message says what failed, where, and what to do; never a credential.
    assert f"s3://{s3_bucket}/out/" in failed.stderr and "SlowDown (HTTP 503)" in failed.stderr
    assert "rerun the same command to resume" in failed.stderr
    assert "Traceback" not in failed.stderr and "UDF" not in failed.stderr  # one clear line, not Ray's report
    assert S3_SECRET_KEY not in failed.stderr + failed.stdout

    # The outage is over; the rerun (default retry budget) meets every kind of fault, many times, and completes.
    proxy.requests.clear()
    proxy.injected.clear()
    within_the_retry_budget(proxy)
    rerun = run_job(s3_bucket, proxy)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert set(proxy.injected) == set(FAULTS), proxy.injected
    check_output(out, 10)  # every image once, in the manifests and in storage

    # A faulted request was sent again (what botocore's standard retries do, with backoff and jitter).
    for i, (method, path, fault) in enumerate(proxy.requests):
        if fault and fault != "slow":
            assert (method, path) in [(m, p) for m, p, _ in proxy.requests[i + 1 :]], (method, path, fault)
    # A write that reached the server but whose reply was lost was retried as a conditional write: that image is
    # stored once and described once (check_output); the retry adopted it.
    assert any(m == "PUT" and "/out/images/" in p and f == "reset_after" for m, p, f in proxy.requests)
    assert S3_SECRET_KEY not in rerun.stderr + rerun.stdout


def test_a_body_cut_short_mid_stream_is_read_again(s3_bucket, proxy, monkeypatch):
    """botocore retries a request until its reply's headers come, not a body cut off after them (a connection reset
    mid-stream): manifests, --verify, the lease and the Parquet reads would stop at the first such cut."""
    import pyarrow.parquet as pq

    direct = open_storage(f"s3://{s3_bucket}/in")
    data = parquet_bytes(prompts_table(20000))
    assert len(data) > 70_000  # more than open_input's first read: its row group comes in a ranged GET of its own
    direct.put("p.parquet", data)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setattr("workers.storage.time.sleep", lambda s: None)
    through = open_storage(f"s3://{s3_bucket}/in")
    proxy.rule = lambda method, path, n: "cut" if method == "GET" and n % 2 else None  # every other GET
    assert through.get("p.parquet") == data
    with through.open_input("p.parquet") as f:
        assert pq.read_table(f).num_rows == 20000
    cuts = [r for r in proxy.requests if r[2] == "cut"]
    assert len(cuts) >= 3 and all(m == "GET" for m, _, _ in proxy.requests), proxy.requests
    proxy.rule = lambda method, path, n: "cut"  # every one: after storage_attempts, a clear error
    few = open_storage(f"s3://{s3_bucket}/in", max_attempts=2)
    with pytest.raises(StorageError, match=rf"reading s3://{s3_bucket}/in/p.parquet failed: ResponseStreamingError"):
        few.get("p.parquet")


def test_a_get_whose_reply_never_comes_is_tried_storage_attempts_times_in_all(s3_bucket, proxy, monkeypatch):
    """A reply that does not come before the read timeout is botocore's to retry: the body retries must not try
    the whole request again on top (2 attempts became 4, the default 10 a hundred: hours on a hung server)."""
    from workers import storage as storage_module

    open_storage(f"s3://{s3_bucket}/in").put("p.bin", b"x" * 1000)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)

    def made_fast(attempts):  # the job's client, with a read timeout shorter than the proxy's 1 s delay
        import boto3
        from botocore.config import Config

        config = Config(
            s3={"addressing_style": "path"},
            retries={"mode": "standard", "total_max_attempts": attempts},
            read_timeout=0.3,
        )
        return boto3.session.Session().client("s3", region_name="us-east-1", config=config)

    monkeypatch.setattr(storage_module, "s3_client", made_fast)  # (time.sleep stays: the proxy's delay is one)
    proxy.rule = lambda method, path, n: "slow"
    with pytest.raises(StorageError, match="ReadTimeoutError"):
        open_storage(f"s3://{s3_bucket}/in", max_attempts=2).get("p.bin")
    assert len(proxy.requests) == 2, proxy.requests


def test_an_outage_while_planning_is_retried_storage_attempts_times_then_exit_1_with_nothing_changed(
    s3_bucket, proxy, monkeypatch, capsys, tmp_path
):
    """The prompts' storage took the default 10 attempts whatever storage_attempts said, and an outage while
    planning was exit 2, "bad input", where a rerun once the server answers goes on."""
    from jobs.generate import main

    open_storage(f"s3://{s3_bucket}").put("in/prompts.parquet", parquet_bytes(prompts_table(3)))
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    proxy.rule = lambda method, path, n: "slowdown" if method == "GET" and "/in/" in path else None
    argv = ["--prompts", f"s3://{s3_bucket}/in/", "--out", str(tmp_path / "out"), *FAST, "--storage-attempts", "2"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"error: prompts: reading s3://{s3_bucket}/in/prompts.parquet failed: SlowDown (HTTP 503)" in err
    assert "nothing in the output was changed: rerun the same command when the storage answers again" in err
    assert [m for m, p, f in proxy.requests if f == "slowdown"] == ["GET", "GET"], proxy.requests  # attempts: 2
    assert not (tmp_path / "out").exists()
