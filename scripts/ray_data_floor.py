"""Ray Data's own cost per block on this machine: the job's chain of operators with no work in it.

    python scripts/ray_data_floor.py --rows 1000 --block 1

The chain is the job's (jobs/generate.py): a read task, a repartition into blocks of `--block` rows, an actor,
a repartition, a second actor, a writer task, and the driver taking the rows; every function returns its input.
It prints the steady rate (rows after the first block, over the time from the first block out to the last) and
the share of the machine's CPU that was busy meanwhile, so the CPU per block is (busy share x cores / blocks per s).
The job's throughput at a batch size cannot pass this rate x batch size (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import os
import time

from jobs.argtypes import positive


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq = (int(v) for v in f.readline().split()[1:8])
    busy = user + nice + system + irq + softirq
    return busy, busy + idle + iowait


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=positive, default=1000)
    parser.add_argument(
        "--block", type=positive, default=1, help="rows per block (the job's: at least 4, jobs.generate.block_rows)"
    )
    parser.add_argument("--cpus", type=positive, default=os.cpu_count())
    args = parser.parse_args(argv)
    if args.rows < 2 * args.block:  # the rate is taken after the first block
        parser.error(f"--rows: {args.rows} leaves no steady state to time with --block {args.block}; use at least "
                     f"{2 * args.block}")  # fmt: skip

    import pyarrow as pa
    import ray
    import ray.data

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.target_max_block_size = 1 << 20  # as the job sets it
    ctx.enable_progress_bars = False

    def read(_batch):
        return pa.table({"x": list(range(args.rows))})

    class Stage:
        def __call__(self, batch):
            return batch

    def write(batch):
        return batch

    ds = ray.data.from_items([{"item": 0}], override_num_blocks=1)
    ds = ds.map_batches(read, batch_size=1, batch_format="pyarrow")
    for _ in range(2):  # the Stage C pool, then the Stage B/A pool, as the job builds them (no GPUs here)
        ds = ds.repartition(target_num_rows_per_block=args.block)
        pool = ray.data.ActorPoolStrategy(size=1)
        ds = ds.map_batches(Stage, compute=pool, batch_size=args.block, batch_format="pyarrow", num_cpus=0)
    ds = ds.map_batches(write, batch_size=args.block, batch_format="pyarrow", num_cpus=1)

    times, cpu = [], None
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        if cpu is None:
            cpu = cpu_times()
        times += [time.perf_counter()] * batch.num_rows
    busy, total = (end - start for end, start in zip(cpu_times(), cpu))
    rate = (len(times) - args.block) / (times[-1] - times[0])
    print(
        f"{len(times)} rows in blocks of {args.block}: {rate:.1f} rows/s, {rate / args.block:.1f} blocks/s steady; "
        f"CPU {100 * busy / total:.0f} % busy over {args.cpus} cores meanwhile"
    )
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
