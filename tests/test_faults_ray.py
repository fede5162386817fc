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


# The killed stage is made the slow one, so it still has work left when the first image is stored: Stage C gets
# about 1 s per batch of 2 here (8 s in all), so a late-starting Stage B/A actor still finds it mid-job. (At 24
# steps it could finish all 8 batches before the decoder's first image on a busy CI machine, and the kill missed.)
@pytest.mark.parametrize(
    "stage,column,slow",
    [
        ("PriorStage", "prior_actor", ["--prior-steps", "60"]),
        ("DecoderStage", "decoder_actor", ["--decoder-steps", "12"]),
    ],
)
def test_an_actor_killed_mid_job_is_replaced_and_every_image_is_stored_once(tmp_path, stage, column, slow):
    pq.write_table(prompts_table(16), tmp_path / "prompts.parquet")
    out = LocalStorage(tmp_path / "out")
    killer = Killer(out, stage, after=1)
    killer.start()
    flags = ["--prior-pool-batch-size", "2", "--decoder-pool-batch-size", "2", "--manifest-rows", "4", *slow]
    try:
        code = main(["--prompts", str(tmp_path / "prompts.parquet"), "--out", str(out.root), *FAST, *flags])
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed, f"no {stage} actor was found to kill"
    assert code == 0
    manifest = check_output(out, 16)
    # The killed actor did part of the work and its replacement the rest.
    actors = set(manifest.column(column).to_pylist())
    pids = {int(name.split(":")[1].split("/")[0]) for name in actors}
    assert set(killer.killed) & pids, f"the killed actor rendered nothing: {actors}, killed {killer.killed}"
    assert pids - set(killer.killed), f"the kill came after the stage's last batch: {actors}, killed {killer.killed}"
