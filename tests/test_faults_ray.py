"""Process faults on a local Ray with fake GPUs: a pool's actor SIGKILLed mid-job. Ray restarts the actor and retries
its batch; the job completes with every image exactly once in manifests and storage."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.generate import main
from tests.jobhelpers import FAST, check_output, prompts_table
from tests.servers import with_descendants
from workers.storage import LocalStorage

pytestmark = pytest.mark.usefixtures("local_ray")


def actor_pids(stage: str) -> list[int]:
    """This test's Ray actors running `stage` (Ray names actor processes after their class)."""
    pids = []
    for pid in with_descendants({os.getpid()}) - {os.getpid()}:
        try:
            if stage.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
        except OSError:
            continue
    return pids


class Killer(threading.Thread):
    """SIGKILLs the `stage` actor once `after` images are stored, while the job goes on in the main thread."""

    def __init__(self, out: LocalStorage, stage: str, after: int):
        super().__init__(daemon=True)
        self.out, self.stage, self.after = out, stage, after
        self.killed: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            if sum(1 for _ in self.out.list("images")) >= self.after:
                for pid in actor_pids(self.stage):
                    os.kill(pid, signal.SIGKILL)
                    self.killed.append(pid)
                if self.killed:
                    return
            time.sleep(0.05)


# One job, both pools' actors killed: Stage C's after the first image is stored, Stage B/A's after the fourth. Stage C
# is the slow stage here (about 1 s per batch of 2 at 60 steps, 8 s in all), so it is still mid-job when the first
# image is stored (a late-starting Stage B/A actor could otherwise find all the latents made), and Stage B/A keeps
# getting new latents to the end, so its kill too comes with work left.
def test_actors_killed_mid_job_are_replaced_and_every_image_is_stored_once(tmp_path):
    pq.write_table(prompts_table(16), tmp_path / "prompts.parquet")
    out = LocalStorage(tmp_path / "out")
    killers = {"prior_actor": Killer(out, "PriorStage", after=1), "decoder_actor": Killer(out, "DecoderStage", after=4)}
    for killer in killers.values():
        killer.start()
    flags = ["--prior-pool-batch-size", "2", "--decoder-pool-batch-size", "2", "--manifest-rows", "4"]
    flags += ["--prior-steps", "60"]  # after FAST's, so it wins
    try:
        code = main(["--prompts", str(tmp_path / "prompts.parquet"), "--out", str(out.root), *FAST, *flags])
    finally:
        for killer in killers.values():
            killer.stop.set()
            killer.join()
    assert code == 0
    manifest = check_output(out, 16)
    for column, killer in killers.items():
        assert killer.killed, f"no {killer.stage} actor was found to kill"
        # The killed actor did part of the work and its replacement the rest.
        actors = set(manifest.column(column).to_pylist())
        pids = {int(name.split(":")[1].split("/")[0]) for name in actors}
        assert set(killer.killed) & pids, f"the killed actor rendered nothing: {actors}, killed {killer.killed}"
        assert pids - set(killer.killed), f"the kill came after the stage's last batch: {actors}, {killer.killed}"
