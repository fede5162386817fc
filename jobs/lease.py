"""One run at a time per output: a lease object (`_LEASE`) that the running job renews and deletes at its end.

Two runs on one output (a double `ray job submit`, a retried pipeline step) would each render every image, and each
end with a `_SUCCESS` over manifests that hold two rows per image (the next resume keeps one, but the work was done
twice). So a run takes the lease before it changes anything in the output, renews it every `renew` seconds while it
runs, and deletes it at the end, whatever the ending. A lease whose run was killed goes stale: at once when it names
a process of this host that no longer exists (a rerun on the same machine, or the same head node, after a crash),
else when this run has watched it go `stale` seconds without a renewal (timed by this run's clock alone: the hosts'
clocks need not agree). A run that finds such a lease watches it: renewed, another run is writing and this one stops
(exit 2); not, it takes the lease over.

The lease is created with a conditional write, so of two runs that start together one gets it. Taking over a stale
lease is a plain write, then a second read after `settle` seconds: of two runs taking it over together, the one whose
write did not last sees the other's and waits again. And since a run can lose its lease all the same (a takeover
write that landed late, a process paused for a minute), the lease is a fence too: `check` reads it before each
manifest part and `_SUCCESS` is written, and a run that no longer holds it stops (LeaseLost) before it writes them.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable

from workers.storage import Storage, StorageError, StorageRefused

LEASE = "_LEASE"
RENEW_SECONDS = 15.0
STALE_SECONDS = 60.0


class LeaseHeld(RuntimeError):
    """Another run is writing to the output."""


class LeaseLost(StorageError):
    """This run's lease was taken over: another run writes the output now, so this one writes no more of it."""


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), which tells a pid reused by another process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()  # after the command name, which may hold spaces
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]  # state, then starttime (the stat fields 3 and 22)


def _gone_here(holder: dict) -> bool:
    """Whether the lease names a process of this host that no longer runs (or has become another process)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process: it runs
        pass
    if os.path.exists("/proc/self/stat"):
        return _process_start(holder["pid"]) != holder.get("process_start")
    return False


def describe(holder: dict) -> str:
    where = f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}"
    return f"run {holder.get('run_id')} ({where})"


class Lease:
    """The lease this run holds; a context manager that renews it in a thread and deletes it on exit."""

    def __init__(self, storage: Storage, body: dict, renew: float, log: Callable[[str], None]):
        self.storage, self.body, self.renew, self.log = storage, body, renew, log
        self._stop = threading.Event()
        self._lost: dict | None = None  # the holder found in this run's place (None read as {}), once lost for good
        self._thread = threading.Thread(target=self._renewing, name="output-lease", daemon=True)

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        try:
            if (read(self.storage) or {}).get("run_id") == self.body["run_id"]:
                self.storage.delete([LEASE])
        except StorageError as e:  # it goes stale by itself
            self.log(f"warning: the output's lease could not be deleted ({e}); the next run waits for it to go stale")

    def check(self) -> None:
        """Raise LeaseLost unless this run still holds the lease: called before each manifest part, the report and
        _SUCCESS. A lease gone counts as lost too: this run made it before anything else, so another run took it
        over and, finished, deleted it."""
        if self._lost is None:
            holder = self._read_patiently()
            if holder is None or holder.get("run_id") != self.body["run_id"]:
                self._lost = holder or {}
        if self._lost is not None:
            by = f"taken over by {describe(self._lost)}" if self._lost else "taken over, and deleted since"
            raise LeaseLost(
                f"the output's lease was {by} (this run went unrenewed, or lost a race to take it over): another run "
                "writes the output, so this run stops without writing more of it"
            )

    def _read_patiently(self, attempts: int = 3) -> dict | None:
        """`read`, tried again after a failure (1 s, then 2 s): a fence that failed once would stop a healthy run,
        where the write it guards would have been retried. A refusal (credentials) is not tried again."""
        for attempt in range(attempts - 1):
            try:
                return read(self.storage)
            except StorageRefused:
                raise
            except StorageError:
                time.sleep(2.0**attempt)
        return read(self.storage)

    def _renewing(self) -> None:
        failing = False
        while self._lost is None and not self._stop.wait(self.renew):
            try:
                holder = read(self.storage)
                if holder is None or holder.get("run_id") != self.body["run_id"]:
                    self._lost = holder or {}  # never written again: `check` stops the run before its next part
                    return
                self.body["renewed"] = time.time()
                write(self.storage, self.body)
                failing = False
            except Exception as e:  # an outage, a full disk: the next renewal tries again (never end the thread)
                if not failing:
                    self.log(f"warning: renewing the output's lease failed ({type(e).__name__}: {e}); trying again")
                failing = True


def read(storage: Storage) -> dict | None:
    """The lease's holder; None when there is no lease. An unreadable lease reads as one of no run, which a new run
    watches and then takes over as it would another host's."""
    try:
        data = storage.get(LEASE)
    except StorageError:
        if storage.exists(LEASE):
            raise
        return None
    try:
        holder = json.loads(data)
        float(holder["renewed"])
        return holder
    except (ValueError, KeyError, TypeError):
        return {"run_id": None, "renewed": 0.0}


def write(storage: Storage, body: dict, if_absent: bool = False) -> bool:
    """Store the lease; with if_absent, only where there is none (False when there was)."""
    data = json.dumps(body, sort_keys=True).encode()
    return not storage.put(LEASE, data, if_absent=if_absent, content_type="application/json").existed


def take(
    storage: Storage,
    run_id: str,
    log: Callable[[str], None],
    renew: float = RENEW_SECONDS,
    stale: float = STALE_SECONDS,
    settle: float = 2.0,
) -> Lease:
    """The output's lease for this run, waiting for a lease that may be stale; LeaseHeld if another run renews its."""
    body = {
        "run_id": run_id,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "process_start": _process_start(os.getpid()),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "renewed": time.time(),
        "renew_seconds": renew,
    }
    while True:
        if write(storage, body, if_absent=True):
            return Lease(storage, body, renew, log)
        holder = read(storage)
        if holder is None:  # released in between
            continue
        if holder.get("run_id") == run_id:  # this run's own write, whose reply was lost and retried
            return Lease(storage, body, renew, log)
        if _gone_here(holder):
            why = "no longer runs"
        elif holder.get("host") == socket.gethostname():  # its process runs: no need to watch it
            raise LeaseHeld(_held(holder, stale))
        else:
            holder, why = _watch(storage, holder, stale, log), f"went {stale:.0f} s without a renewal"
            if holder is None:
                continue
        log(f"the output's lease is stale: {describe(holder)} {why}; this run takes it over")
        body["renewed"] = time.time()
        write(storage, body)
        time.sleep(settle)
        if (read(storage) or {}).get("run_id") == run_id:
            return Lease(storage, body, renew, log)


def _watch(storage: Storage, holder: dict, stale: float, log: Callable[[str], None]) -> dict | None:
    """Wait until the lease of another host's run is renewed (LeaseHeld), released (None) or has gone `stale`
    seconds unchanged, by this process's clock (its holder)."""
    log(
        f"the output's lease is held by {describe(holder)}: watching it for up to {stale:.0f} s to see whether that "
        "run still renews it"
    )
    deadline = time.monotonic() + stale
    while time.monotonic() < deadline:
        time.sleep(min(5.0, max(0.05, stale / 20)))
        now = read(storage)
        if now is None:
            return None
        if now.get("run_id") != holder.get("run_id") or now.get("renewed") != holder.get("renewed"):
            raise LeaseHeld(_held(now, stale))
    return holder


def _held(holder: dict, stale: float) -> str:
    return (
        f"another run is writing to this output: {describe(holder)}. Two runs on one output would each render every "
        f"image; wait for it to end, or stop it (a lease whose run was killed is taken over by a rerun: at once on its "
        f"host, else after {stale:.0f} s without a renewal)"
    )
