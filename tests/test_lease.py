"""One run at a time per output (`jobs.lease`), on a local folder and on a real S3 server (SeaweedFS)."""

import json
import subprocess
import sys
import threading
import time

import pytest

from jobs.lease import LEASE, LeaseHeld, read, take, write
from workers.storage import LocalStorage, open_storage


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return LocalStorage(tmp_path / "out")
    return open_storage(f"s3://{request.getfixturevalue('s3_bucket')}/out")


def _elsewhere(run_id: str, renewed: float, renew: float = 0.2) -> dict:
    return {"run_id": run_id, "host": "another-host", "pid": 1, "renewed": renewed, "renew_seconds": renew}


def test_a_second_run_on_this_host_is_refused_while_the_first_runs_and_the_lease_goes_with_the_first(storage):
    said = []
    with take(storage, "r1", said.append, renew=0.1):
        assert read(storage)["run_id"] == "r1"
        time.sleep(0.3)
        assert read(storage)["renewed"] > time.time() - 0.3  # renewed as it runs
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
    assert "waiting up to" in said[0] and "whether that run still renews it" in said[0]


def test_another_hosts_lease_that_is_not_renewed_goes_stale_and_a_garbled_one_at_once(storage):
    write(storage, _elsewhere("crashed", time.time()))
    said, start = [], time.monotonic()
    with take(storage, "mine", said.append, stale=1.0, settle=0.1):
        assert read(storage)["run_id"] == "mine" and time.monotonic() - start >= 0.5  # it waited
    assert "waiting up to 1 s" in said[0] and "run crashed (host another-host" in said[1]
    storage.put(LEASE, b"{not json")
    with take(storage, "again", said.append, settle=0.1):
        assert json.loads(storage.get(LEASE))["run_id"] == "again"
