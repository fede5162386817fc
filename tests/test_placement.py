"""The node watch on its own: it interrupts the main thread when a pool has no live node, again if the first
interrupt is swallowed, and ends the process (exit 1, the reason said) if the main thread never stops."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.placement import NodeWatch

ROOT = Path(__file__).resolve().parents[1]
NEEDS = {"Stage B/A pool": {"GPU": 1.0, "stage_b": 1.0}}


@pytest.fixture
def default_sigint():
    """Python's own SIGINT handler (KeyboardInterrupt), whatever an earlier test in this process left: set through
    `_signal`, because Ray's DeferSigint replaces `signal.signal` itself while it holds SIGINT back."""
    import _signal

    before = _signal.getsignal(signal.SIGINT)
    _signal.signal(signal.SIGINT, signal.default_int_handler)
    mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    yield
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    _signal.signal(signal.SIGINT, before)


def test_the_main_thread_is_interrupted_again_when_a_library_swallows_the_first_interrupt(default_sigint):
    logged = []
    watch = NodeWatch(NEEDS, timeout=0.1, log=logged.append, period=0.05, nodes=lambda: [{"CPU": 2.0}], resend=0.2)
    watch.start()
    interrupts = 0
    deadline = time.monotonic() + 20
    try:
        while interrupts < 2 and time.monotonic() < deadline:
            try:
                time.sleep(0.01)
            except KeyboardInterrupt:  # the first one is swallowed, as a library's handler might
                interrupts += 1
    finally:
        watch.stop()
    assert interrupts == 2
    assert "no live node can run the Stage B/A pool (one actor needs GPU 1, stage_b 1)" in watch.reason
    assert logged[0].startswith("warning: no live node can run the Stage B/A pool")


def test_a_main_thread_that_never_stops_ends_the_process_with_the_reason():
    script = (
        "import signal, time\n"
        "from jobs.placement import NodeWatch\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)  # a main thread the interrupt cannot reach\n"
        f"w = NodeWatch({NEEDS!r}, timeout=0.1, log=print, period=0.05, nodes=lambda: [], grace=0.5, resend=0.1)\n"
        "w.start()\n"
        "time.sleep(30)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "error: the job stopped: no live node can run the Stage B/A pool" in proc.stdout
    assert "did not stop within 0.5 s" in proc.stdout and "rerun the same command to resume" in proc.stdout


def stopped_by(watch: NodeWatch) -> NodeWatch:
    """Start the watch and wait for the interrupt it sends when it gives up (within 10 s)."""
    watch.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            time.sleep(10)
    finally:
        watch.stop()
    return watch


def test_pools_whose_actors_each_fit_a_node_but_not_together_are_waited_for_then_stopped(default_sigint):
    """One GPU, and a Stage C pool with gpus 1 beside a Stage B/A pool with gpus 1: each actor fits the node, but
    not both at once, and the Stage B/A pool would never start. The watch checks one actor of every pool together."""
    from jobs.placement import short_of

    needs = {"Stage C pool": {"GPU": 1.0, "CPU": 0.0}, "Stage B/A pool": {"GPU": 1.0, "CPU": 0.0}}
    one_gpu = [{"CPU": 2.0, "GPU": 1.0}]
    assert short_of(needs, one_gpu) == "GPU 2 (Stage C pool 1, Stage B/A pool 1) against 1 on the live nodes"
    assert short_of(needs, one_gpu * 2) == ""  # two such nodes hold both
    assert short_of({k: {"GPU": 0.5} for k in needs}, one_gpu) == ""  # half a GPU each: both fit

    logged = []
    watch = stopped_by(NodeWatch(needs, timeout=0.1, log=logged.append, period=0.05, nodes=lambda: one_gpu))
    assert watch.reason.startswith("the pools cannot each run an actor at once on the live nodes: GPU 2 (Stage C")
    assert logged[0].startswith("warning: the pools cannot each run an actor at once")


def test_actors_that_leave_the_writers_no_cpu_are_named_with_the_settings_to_change(default_sigint):
    """Pools with cpus 4 each on two 4-CPU nodes: both actors run, and the writer tasks (writer_cpus 1) never do. The
    watch says it is the writers that cannot run beside the actors, and which settings free CPUs for them."""
    needs = {"Stage C pool": {"GPU": 1.0, "CPU": 4.0}, "Stage B/A pool": {"GPU": 1.0, "CPU": 4.0}}
    needs["writer tasks"] = {"CPU": 1.0}
    nodes = [{"CPU": 4.0, "GPU": 1.0}] * 2 + [{"CPU": 0.0}]  # and a head that runs nothing
    watch = stopped_by(NodeWatch(needs, timeout=0.1, log=[].append, period=0.05, nodes=lambda: nodes))
    assert watch.reason.startswith(
        "the pools' actors and the writer tasks cannot all run at once on the live nodes: "
        "CPU 9 (Stage C pool 4, Stage B/A pool 4, writer tasks 1) against 8"
    )
    assert "gpus, cpus or resources, or writer_cpus" in watch.reason
