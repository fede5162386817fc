"""The job on a real two-node local Ray cluster: its driver killed mid-run, then resumed with `ray job submit`, each
pool on its own node and every image exactly once; the decoder's node lost mid-run, then finished on what remains."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from tests.jobhelpers import FAST, check_output, prompts_table
from tests.servers import ray_binary
from workers.storage import LocalStorage

ROOT = Path(__file__).resolve().parents[1]
POOLS = ["--prior-pool-resources", '{"stage_c": 1}', "--decoder-pool-resources", '{"stage_b": 1}']


def job_on_cluster(cluster, tmp_path, *flags: str) -> tuple[list[str], dict, LocalStorage]:
    """The command line and environment of a 48-image job on the cluster, in small batches, and its output. 48, not
    fewer: on a fast CPU a 12-image job could finish between two looks at its output, before the fault came."""
    pq.write_table(prompts_table(48), tmp_path / "prompts.parquet")
    out = LocalStorage(tmp_path / "out")
    argv = [
        sys.executable,
        "-m",
        "jobs.generate",
        "--prompts",
        str(tmp_path / "prompts.parquet"),
        "--out",
        str(out.root),
    ]
    argv += [*FAST, *POOLS, "--manifest-rows", "2", "--prior-pool-batch-size", "2", "--decoder-pool-batch-size", "2"]
    env = {**os.environ, "RAY_ADDRESS": cluster.address, "PYTHONPATH": str(ROOT)}
    return [*argv, *flags], env, out


def wait_until(driver: subprocess.Popen, ready, seconds: float = 300) -> None:
    """Wait for ready() while the job runs (the fault must come mid-job)."""
    deadline = time.monotonic() + seconds
    while not ready():
        assert driver.poll() is None, "the job ended before the fault could be injected"
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_driver_killed_mid_run_then_ray_job_submit_resumes_with_each_pool_on_its_node(two_node_cluster, tmp_path):
    argv, env, out = job_on_cluster(two_node_cluster, tmp_path)
    driver = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(driver, lambda: sum(1 for _ in out.list("manifests")) >= 2)  # some manifests written, more to come
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert not out.exists("_SUCCESS")
    before = sum(1 for _ in out.list("images"))
    assert 0 < before < 48

    # The same job, as users run it on a cluster: `ray job submit`, the driver on the head, the code uploaded.
    rerun = subprocess.run(
        [ray_binary(), "job", "submit", "--address", two_node_cluster.dashboard, "--working-dir", str(ROOT), "--",
         *argv],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stdout[-4000:] + rerun.stderr[-2000:]
    assert "succeeded" in rerun.stdout and "resuming:" in rerun.stdout  # the driver's log, streamed back
    manifest = check_output(out, 48)  # every image once in the manifests and in storage, nothing lost, nothing extra
    nodes = two_node_cluster.nodes
    prior_nodes = {a.rsplit("/", 1)[1] for a in manifest.column("prior_actor").to_pylist()}
    decoder_nodes = {a.rsplit("/", 1)[1] for a in manifest.column("decoder_actor").to_pylist()}
    assert prior_nodes == {nodes["stage_c"][:12]} and decoder_nodes == {nodes["stage_b"][:12]}
    assert len(set(manifest.column("run_id").to_pylist())) == 2  # part from the killed run, the rest from the rerun
    # The prompts and --out are local folders: on a cluster of machines each is the driver's machine's disk, so the
    # tasks that read and write them ran on the driver's node (the head), both times, though the second node had
    # CPUs for them.
    assert "local paths on a cluster of 2 nodes: the tasks that read the prompts and write the images" in rerun.stdout
    assert task_nodes(two_node_cluster, ("read_fragments", "write_images")) == {nodes["stage_c"]}


def task_nodes(cluster, names: tuple[str, ...]) -> set[str]:
    """The nodes that ran the cluster's tasks whose names hold one of `names` (asked from a separate process). A
    task listed without a node never ran (one the killed driver had queued; seen on a loaded machine): left out."""
    script = (
        "import json, ray; from ray.util.state import list_tasks;"
        f"tasks = list_tasks(address={cluster.address!r}, limit=10000, raise_on_missing_output=False);"
        "print(json.dumps([[t.name, t.node_id] for t in tasks"
        f" if t.node_id and any(n in t.name for n in {list(names)!r})]))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    tasks = json.loads(done.stdout.strip().splitlines()[-1])
    assert {n for n in names if any(n in name for name, _ in tasks)} == set(names), tasks  # each name seen
    return {node for _, node in tasks}


def test_losing_the_decoder_node_stops_the_job_clearly_and_a_rerun_completes(two_node_cluster, tmp_path):
    """The Stage B/A pool is pinned to the second node (`stage_b`); that node dies mid-job. No other node can run the
    pool, so the job stops with exit 1 and says why; a rerun with the pools placed on what remains (the head) finishes
    with every image once."""
    argv, env, out = job_on_cluster(two_node_cluster, tmp_path, "--node-wait-seconds", "5")
    log = tmp_path / "driver.log"
    with open(log, "w") as stderr:
        driver = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            wait_until(driver, lambda: sum(1 for _ in out.list("images")) >= 2)
            two_node_cluster.kill_node("stage_b")
            code = driver.wait(timeout=240)
        finally:
            if driver.poll() is None:
                driver.kill()
    text = log.read_text()
    assert code == 1, text[-4000:]
    assert "no live node can run the Stage B/A pool (one actor needs GPU 1, stage_b 1)" in text, text[-4000:]
    assert "rerun the same command to resume" in text
    assert not out.exists("_SUCCESS")
    assert sum(1 for _ in out.list("images")) < 48

    # Finish on what remains: both pools on the head's one GPU, half each by `gpus: auto` (the pools' GPUs are
    # auto in the test's config). Nothing lost, nothing twice.
    head_only = ["--prior-pool-resources", "{}", "--decoder-pool-resources", "{}"]
    rerun = subprocess.run([*argv, *head_only], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "Stage B/A 1 x {'num_gpus': 0.5" in rerun.stderr and "they share them, 0.5 each" in rerun.stderr
    rows = check_output(out, 48).to_pylist()
    latest = max(r["run_id"] for r in rows)
    nodes = {r["decoder_actor"].rsplit("/", 1)[1] for r in rows if r["run_id"] == latest}
    assert nodes == {two_node_cluster.nodes["stage_c"][:12]}  # Stage B/A ran on the head this time
