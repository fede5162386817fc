"""Whether each pool still has a live node it fits on, and stopping the job when one has had none for too long.

Ray restarts a lost actor (Ray Data asks for unlimited restarts and task retries), so a pool whose node dies comes
back on any node that has what one actor needs. When no live node has it (the pool is pinned to a node type by a
custom resource and the last such node is gone, or it needs GPUs the cluster no longer has), the restart waits for
an autoscaler to add one, forever if none comes. `NodeWatch` turns that wait into a clear stop after
`node_wait_seconds`: finished images are kept, and a rerun resumes once the nodes are back. The writer tasks are
watched the same way: their CPUs (`writer_cpus`) must fit on a node beside the actors.
"""

from __future__ import annotations

import os
import signal
import threading
import time


class PlacementError(RuntimeError):
    """A pool has had no live node it fits on for longer than the job waits."""


def fits(need: dict[str, float], node: dict[str, float]) -> bool:
    return all(node.get(name, 0.0) >= amount for name, amount in need.items() if amount > 0)


def describe(need: dict[str, float]) -> str:
    return ", ".join(f"{name} {amount:g}" for name, amount in sorted(need.items()) if amount > 0) or "nothing"


def _one(name: str) -> str:
    """What one unit of a need is: an actor of a pool, or one of the writer tasks."""
    return "one task" if name.endswith("tasks") else "one actor"


def unplaceable(needs: dict[str, dict[str, float]], nodes: list[dict[str, float]]) -> list[str]:
    """The pools (by name) that fit on none of the nodes (each node's total resources)."""
    return [pool for pool, need in needs.items() if not any(fits(need, node) for node in nodes)]


def short_of(needs: dict[str, dict[str, float]], nodes: list[dict[str, float]]) -> str:
    """'' when the live nodes together hold one actor of every pool at once; else what is short, e.g. 'GPU 2 (Stage
    C pool 1, Stage B/A pool 1) against 1 on the live nodes'. Each pool's actor may fit some node while the two cannot
    run at the same time (gpus 1 for each pool on a 1-GPU machine): then the second pool starts only when the first
    has done its whole segment and let its actors go, so the pools take turns, nothing is written for a segment's
    worth of Stage C time (hours at the official size), and a job stopped meanwhile keeps nothing; the watch stops
    such a job after node_wait_seconds, naming what is short, instead of letting it run so. More actors than fit now
    is not that (the pools run with those that do, while an autoscaler adds nodes)."""
    return _shortage(needs, _over(needs, nodes))


def _shortage(needs: dict[str, dict[str, float]], over: dict[str, tuple[float, float]]) -> str:
    """`over` (from _over) in words, each resource with the needs that want it."""
    short = []
    for name, (wanted, have) in over.items():
        parts = ", ".join(f"{pool} {need[name]:g}" for pool, need in needs.items() if need.get(name))
        short.append(f"{name} {wanted:g} ({parts}) against {have:g} on the live nodes")
    return "; ".join(short)


def _over(needs: dict[str, dict[str, float]], nodes: list[dict[str, float]]) -> dict[str, tuple[float, float]]:
    """The resources that one of every need at once wants more of than the live nodes have: name -> (wanted, have)."""
    over = {}
    for name in sorted({r for need in needs.values() for r in need}):
        wanted = sum(need.get(name, 0.0) for need in needs.values())
        have = sum(node.get(name, 0.0) for node in nodes)
        if wanted > have + 1e-9:
            over[name] = (wanted, have)
    return over


def live_nodes() -> list[dict[str, float]]:
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


class NodeWatch(threading.Thread):
    """Checks every `period` seconds that each pool fits on some live node; after `timeout` seconds without one it
    records why in `reason` and sends the main thread a SIGINT, which turns that into a PlacementError."""

    def __init__(
        self,
        needs: dict[str, dict[str, float]],
        timeout: float,
        log,
        period: float = 2.0,
        nodes=live_nodes,
        grace: float = 30.0,
        resend: float = 10.0,
    ):
        super().__init__(daemon=True, name="node-watch")
        self.needs, self.timeout, self.log, self.period, self.nodes = needs, timeout, log, period, nodes
        self.grace, self.resend = grace, resend
        self.reason: str | None = None
        self._done = threading.Event()

    def run(self) -> None:
        since: float | None = None
        while not self._done.wait(self.period):
            try:
                nodes = self.nodes()
                missing = unplaceable(self.needs, nodes)
                over = {} if missing else _over(self.needs, nodes)
            except Exception:  # the cluster is unreachable for a moment: Ray itself will report a lost cluster
                continue
            if not missing and not over:
                if since is not None:
                    self.log("the live nodes can run every part of the job again")
                since = None
                continue
            if missing:
                pools = " or ".join(f"the {pool} ({_one(pool)} needs {describe(self.needs[pool])})" for pool in missing)
                problem = f"no live node can run {pools}"
            else:
                tasks = [need for name, need in self.needs.items() if _one(name) == "one task"]
                writers = any(need.get(r) for need in tasks for r in over)
                who = (
                    "the pools' actors and the writer tasks cannot all run"
                    if writers
                    else "the pools cannot each run an actor"
                )
                problem = f"{who} at once on the live nodes: {_shortage(self.needs, over)}"
            if since is None:
                since = time.monotonic()
                self.log(f"warning: {problem}; waiting up to {self.timeout:g} s (node_wait_seconds)")
            if time.monotonic() - since >= self.timeout:
                self.reason = (
                    f"{problem} for {self.timeout:g} s (node_wait_seconds): a node was lost, or the autoscaler added "
                    "none. Bring such nodes back (or change the pools' actors, gpus, cpus or resources, or "
                    "writer_cpus), then rerun the same command"
                )
                self._interrupt_main()
                return

    def _interrupt_main(self) -> None:
        """SIGINT the main thread until it stops the job (it calls stop()); after `grace` seconds exit the process.

        A real SIGINT wakes a main thread blocked on a lock, which _thread.interrupt_main() (a flag checked between
        bytecodes) does not. It is sent again every `resend` seconds, and the process ends itself after `grace`
        seconds, because the interrupt can be held back: Ray defers SIGINT while the main thread is inside some of
        its calls (`DeferSigint`), and after a node is lost such a call can wait for good (seen in full test runs).
        The hard exit loses only manifest rows not yet written: a rerun renders their stored images again."""
        deadline = time.monotonic() + self.grace
        while not self._done.is_set():
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            if self._done.wait(self.resend):
                return
            if time.monotonic() >= deadline:
                self.log(f"error: the job stopped: {self.reason}")
                self.log(f"(the driver did not stop within {self.grace:g} s of the interrupt, so it exits now)")
                self.log("rerun the same command to resume: finished images are kept")
                os._exit(1)

    def stop(self) -> None:
        self._done.set()
