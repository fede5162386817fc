"""One run at a time per output (`jobs.lease`), on a local folder and on a real S3 server (SeaweedFS)."""

import json
import subprocess
import sys
import threading
import time

import pytest

from jobs.lease import LEASE, LeaseHeld, read, take, write
from workers.storage import LocalStorage, StorageError, open_storage


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return LocalStorage(tmp_path / "out")
    return open_storage(f"s3://{request.getfixturevalue('s3_bucket')}/out")


def _eventually(condition, seconds: float = 10.0) -> bool:
    """Whether `condition()` holds within `seconds` (the machine is shared: timings are not exact)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _elsewhere(run_id: str, renewed: float, renew: float = 0.2) -> dict:
    return {"run_id": run_id, "host": "another-host", "pid": 1, "renewed": renewed, "renew_seconds": renew}


def test_a_second_run_on_this_host_is_refused_while_the_first_runs_and_the_lease_goes_with_the_first(storage):
    said = []
    with take(storage, "r1", said.append, renew=0.1):
        first = read(storage)
        assert first["run_id"] == "r1"
        assert _eventually(lambda: read(storage)["renewed"] > first["renewed"])  # renewed as it runs
        with pytest.raises(LeaseHeld, match=r"another run is writing to this output: run r1 \(host .*, pid \d+"):
            take(storage, "r2", said.append)  # its process runs here: no waiting
    assert not storage.exists(LEASE) and said == []
    with take(storage, "r3", said.append):  # free again
        assert read(storage)["run_id"] == "r3"


def test_a_create_whose_reply_was_lost_finds_its_own_lease_and_keeps_it(storage):
    """The conditional create retried after its reply was lost (a fault the S3 tests inject) meets its own lease."""

    class LostReply(type(storage)):
        def put(self, key, data, **kw):
            super().put(key, data, **kw)  # stored; the reply is lost and botocore sends it again
            return super().put(key, data, **kw)

    lossy = LostReply.__new__(LostReply)
    lossy.__dict__.update(storage.__dict__)
    with take(lossy, "mine", print):
        assert read(storage)["run_id"] == "mine"
    assert not storage.exists(LEASE)


def test_a_lease_of_a_process_of_this_host_that_is_gone_is_taken_over_at_once(storage):
    with take(storage, "killed", print):
        body = read(storage)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    body["pid"] = int(dead.stdout)  # a process that has ended (a SIGKILLed driver leaves its lease so)
    write(storage, body)
    said, start = [], time.monotonic()
    with take(storage, "rerun", said.append, settle=0.1):
        assert read(storage)["run_id"] == "rerun" and time.monotonic() - start < 2
    assert said == [f"the output's lease is stale: run killed (host {body['host']}, pid {body['pid']}, started "
                    f"{body['started']}) no longer runs; this run takes it over"]  # fmt: skip


def test_another_hosts_run_that_renews_its_lease_is_waited_for_then_refused(storage):
    write(storage, _elsewhere("remote", time.time()))
    stop = threading.Event()

    def renewing():  # the other host's run, alive
        while not stop.wait(0.2):
            write(storage, _elsewhere("remote", time.time()))

    threading.Thread(target=renewing, daemon=True).start()
    said = []
    try:
        with pytest.raises(LeaseHeld, match="run remote .host another-host"):
            take(storage, "mine", said.append, stale=5)
    finally:
        stop.set()
    assert "watching it for up to 5 s to see whether that run still renews it" in said[0]


def test_a_renewed_lease_is_refused_whatever_the_clock_of_its_host_says(storage):
    """Another host's clock 100 s behind: its renewals read as 'stale' by this one's clock, yet it runs. The watch
    times by this process's clock alone and sees the lease change."""
    stop = threading.Event()

    def renewing():
        while not stop.wait(0.1):
            write(storage, _elsewhere("behind", time.time() - 100))

    write(storage, _elsewhere("behind", time.time() - 100))
    threading.Thread(target=renewing, daemon=True).start()
    try:
        with pytest.raises(LeaseHeld, match="run behind"):
            take(storage, "mine", print, stale=2)
    finally:
        stop.set()


def test_another_hosts_lease_that_is_not_renewed_goes_stale_and_so_does_a_garbled_one(storage):
    write(storage, _elsewhere("crashed", time.time()))
    said, start = [], time.monotonic()
    with take(storage, "mine", said.append, stale=1.0, settle=0.1):
        assert read(storage)["run_id"] == "mine" and time.monotonic() - start >= 0.5  # it waited
    assert "watching it for up to 1 s" in said[0] and "run crashed (host another-host" in said[1]
    assert said[1].endswith("went 1 s without a renewal; this run takes it over")
    storage.put(LEASE, b"{not json")
    with take(storage, "again", said.append, stale=0.5, settle=0.1):
        assert json.loads(storage.get(LEASE))["run_id"] == "again"


def test_a_run_whose_lease_was_taken_over_writes_no_manifest_part_and_leaves_the_lease_to_the_other(storage):
    """A run can lose its lease all the same (a process paused past `stale`, a takeover write that landed late): the
    lease is checked before each manifest part (and the report and _SUCCESS), so the run stops instead of writing a
    second row for every image."""
    import pyarrow as pa

    from jobs.lease import LeaseLost
    from jobs.manifest import ManifestWriter, manifest_keys

    with take(storage, "paused", print, renew=0.05) as held:
        held.check()  # still its own
        write(storage, _elsewhere("taker", time.time()))
        with pytest.raises(LeaseLost, match="lease was taken over by run taker .* this run stops without writing"):
            held.check()
        writer = ManifestWriter(storage, "paused", rows=1, seconds=60, guard=held.check)
        with pytest.raises(LeaseLost):
            writer.add(pa.table({"id": ["a"], "image_index": [0], "status": ["ok"]}))
        assert manifest_keys(storage) == []
        time.sleep(0.2)  # the renewals leave the taker's lease as it is
    assert read(storage)["run_id"] == "taker"  # and so does the end of the run


def test_the_renewals_outlive_an_error_that_is_not_the_storages(storage, monkeypatch):
    """A full disk under a local output (OSError, not StorageError) ended the renewal thread for good."""
    said, calls, failed_at = [], [], []
    real = type(storage).put

    def put(self, key, data, **kw):
        calls.append(key)
        if len(calls) == 2:  # the first renewal
            failed_at.append(time.time())
            raise OSError(28, "No space left on device")
        return real(self, key, data, **kw)

    monkeypatch.setattr(type(storage), "put", put)
    with take(storage, "mine", said.append, renew=0.05):
        assert _eventually(lambda: failed_at and read(storage)["renewed"] > failed_at[0])  # renewed again since
    assert said == ["warning: renewing the output's lease failed (OSError: [Errno 28] No space left on device); "
                    "trying again"]  # fmt: skip


def test_a_lease_gone_is_a_lease_lost_and_the_renewals_never_write_it_back(storage):
    """Taken over while this run was paused, then deleted by the run that took it when it finished: the lease is gone.
    This run made it before anything else, so gone means lost: it must not write it back, nor pass the fence."""
    from jobs.lease import LeaseLost

    with take(storage, "paused", print, renew=0.05) as held:
        storage.delete([LEASE])
        with pytest.raises(LeaseLost, match="taken over, and deleted since"):
            held.check()
        time.sleep(0.3)
        assert not storage.exists(LEASE)  # the renewals stopped
        write(storage, _elsewhere("next", time.time()))  # a new run takes the output
        with pytest.raises(LeaseLost):
            held.check()
        time.sleep(0.2)
    assert read(storage)["run_id"] == "next"


def test_a_lease_key_that_is_not_a_file_is_an_error_not_a_hang(tmp_path):
    storage = LocalStorage(tmp_path)
    (tmp_path / LEASE).mkdir()
    with pytest.raises(StorageError, match="_LEASE is in the way: not a file"):
        take(storage, "mine", print)


def test_the_fence_reads_the_lease_again_after_a_failure(storage, monkeypatch):
    """One failed read of the lease (a connection reset while reading its body: botocore does not retry that) would
    stop a healthy run at its next manifest part; it is read again first."""
    monkeypatch.setattr("jobs.lease.time.sleep", lambda s: None)
    with take(storage, "mine", print) as held:
        real, fails = type(storage).get, [1]

        def get(self, key):
            if fails:
                fails.pop()
                raise StorageError(f"reading {key} failed: ConnectionResetError")
            return real(self, key)

        monkeypatch.setattr(type(storage), "get", get)
        held.check()  # no LeaseLost, no StorageError
        assert not fails
