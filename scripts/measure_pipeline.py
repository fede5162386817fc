"""Measure the Ray pipeline: driver memory as the input grows, pool overlap, and the latent queue's bytes per image.

    .venv/bin/python scripts/measure_pipeline.py --prompts 1000 10000 100000 --dry-run
    .venv/bin/python scripts/measure_pipeline.py --prompts 200 --prior-steps 6 --decoder-steps 4
    .venv/bin/python scripts/measure_pipeline.py --prompts 40000 --dry-run --segment-rows 4000 [--no-trim]

Each size runs the real job (`jobs.generate`) in this process on a local Ray, into a fresh local folder, while a thread
samples the driver's RSS every 0.2 s. Prints one row per size; --json writes them too. `--dry-run` skips the model
maths but moves the same data (full-size latents, full-size images), so large inputs finish in minutes on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.argtypes import positive  # noqa: E402 (after the path above)


def rss() -> int:
    """This process's resident set size in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_parts() -> dict[str, int]:
    """RSS split by kind, in MB: `anon` is the process's own memory; `shmem` counts the pages of Ray's shared object
    store this process has touched (reading blocks maps them), which grows towards the store's size without being
    memory the driver holds."""
    parts = {}
    with open("/proc/self/status") as f:
        for line in f:
            for name, key in (("RssAnon:", "anon"), ("RssFile:", "file"), ("RssShmem:", "shmem")):
                if line.startswith(name):
                    parts[key] = round(int(line.split()[1]) / 1024)
    return parts


def seconds_per_1000(table) -> list[float]:
    """Wall seconds between the 1,000th, 2,000th, ... image written (by each image's write time)."""
    ends = sorted(t for t in table.column("write_end").to_pylist() if t is not None)
    marks = ends[999::1000]
    return [round(b - a, 1) for a, b in zip(marks, marks[1:])]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=positive, nargs="+", default=[1000, 10000])
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--size", type=positive, default=256, help="pixels (the job checks it against the tiny model's)")
    p.add_argument("--prior-steps", type=positive, default=2)
    p.add_argument("--decoder-steps", type=positive, default=2)
    p.add_argument("--batch-size", type=positive, default=8)
    p.add_argument("--manifest-rows", type=positive, default=5000)
    p.add_argument("--segment-rows", type=positive, help="the job's segment_rows (default: the job's own)")
    p.add_argument("--no-trim", action="store_true", help="skip the job's heap trims between segments (jobs/heap.py)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.generate import main as generate
    from jobs.manifest import read_manifests, read_success
    from jobs.report import STAT_COLUMNS, pool_stats
    from workers.storage import LocalStorage

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if args.no_trim:  # the comparison in docs/RELIABILITY.md: the driver's memory without the trims
        import jobs.heap

        jobs.heap.trim = lambda: False
    results = []
    for n in args.prompts:
        work = Path(tempfile.mkdtemp(prefix="measure-"))
        pq.write_table(pa.table({"prompt": [f"a red circle number {i}" for i in range(n)]}), work / "p.parquet")
        peak, stop, trace = [rss()], threading.Event(), []
        t0 = time.monotonic()

        def sample(peak=peak, stop=stop, trace=trace, t0=t0) -> None:
            last = 0.0
            while not stop.is_set():
                peak.append(rss())
                if time.monotonic() - last >= 10:  # a coarse trace: does memory grow while the job streams?
                    last = time.monotonic()
                    trace.append((round(last - t0), round(peak[-1] / 2**20), rss_parts()))
                time.sleep(0.2)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        start = time.perf_counter()
        code = generate(
            [
                "--prompts", str(work / "p.parquet"), "--out", str(work / "out"),
                "--width", str(args.size), "--height", str(args.size),
                "--prior-steps", str(args.prior_steps), "--decoder-steps", str(args.decoder_steps),
                "--prior-pool-batch-size", str(args.batch_size), "--decoder-pool-batch-size", str(args.batch_size),
                "--progress-seconds", "30", "--manifest-rows", str(args.manifest_rows),
                *(["--segment-rows", str(args.segment_rows)] if args.segment_rows else []),
                *(["--dry-run"] if args.dry_run else []),
            ]
        )  # fmt: skip
        wall = time.perf_counter() - start
        stop.set()
        thread.join()
        if code != 0:  # no figure for a job that did not finish (its own message says why)
            shutil.rmtree(work, ignore_errors=True)
            sys.exit(f"the job exited {code} at {n} prompts: no figures")
        out = LocalStorage(work / "out")
        summary = read_success(out) or {}
        table = read_manifests(out, STAT_COLUMNS)
        stats = pool_stats(table) if table is not None else None
        per_1000 = seconds_per_1000(table) if table is not None else []
        row = {
            "prompts": n,
            "exit": code,
            "wall_s": round(wall, 1),
            "images_per_s": round(n / wall, 2),
            "driver_rss_start_mb": round(peak[0] / 2**20),
            "driver_rss_peak_mb": round(max(peak) / 2**20),
            "driver_anon_end_mb": rss_parts()["anon"],
            "queue_bytes_per_image": summary.get("latent_queue_bytes_per_image"),
            "rss_trace_s_mb": trace,
            # Is the job as fast at its end as at its start? Seconds per 1,000 images, by when they were written.
            "s_per_1000_images": per_1000,
        }
        if stats is not None:
            for pool in ("prior", "decoder"):
                row[f"{pool}_busy"] = round(stats["pools"][pool]["busy_fraction"], 3)
            row["both_busy_fraction"] = round(stats["both_busy_s"] / stats["wall_s"], 3) if stats["wall_s"] else 0
        results.append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(work, ignore_errors=True)  # (about 10 KB per image)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
