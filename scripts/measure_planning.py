"""How long the job's planning takes over many input files on S3: the real `jobs.inputs.plan` against a local
SeaweedFS (the tests' server: the test extra installs it) behind the tests' fault proxy, which adds `--rtt` seconds
to every request as a stand-in for the network round trip of a remote S3. Each run is planned with each of
`--threads` (PLAN_THREADS), in one process, so the figures compare as ratios on a shared machine.

    .venv/bin/python scripts/measure_planning.py --files 300 --rtt 0.05 --threads 1 8
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.argtypes import positive  # noqa: E402 (after the path above)

PROXY = """
import sys, time
from tests.faultproxy import FaultProxy
proxy = FaultProxy((sys.argv[1], int(sys.argv[2])), slow_seconds=float(sys.argv[3]))
proxy.rule = lambda method, path, n: "slow"
print(proxy.url, flush=True)
time.sleep(1e9)
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--files", type=positive, default=300, help="Parquet files to plan (default 300)")
    p.add_argument("--rows", type=positive, default=1000, help="rows per file, each with an id (default 1000)")
    p.add_argument("--rtt", type=float, default=0.05, help="seconds added to each request (default 0.05)")
    p.add_argument("--threads", type=positive, nargs="+", default=[1, 8], help="PLAN_THREADS values to time")
    args = p.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq

    import workers.storage as storage_module
    from jobs import inputs
    from jobs.config import from_mapping
    from tests.servers import S3_HOST, SeaweedFS, s3_env, s3_port

    os.environ.update(s3_env())
    scratch = Path(tempfile.mkdtemp(prefix="measure-planning-"))
    server = SeaweedFS(scratch / "seaweedfs")
    proxy = None
    try:
        client = server.client()
        client.create_bucket(Bucket="plan")
        for i in range(args.files):
            ids = [f"f{i}-{r}" for r in range(args.rows)]
            table = pa.table({"id": ids, "prompt": [f"a red circle number {r}" for r in range(args.rows)]})
            data = io.BytesIO()
            pq.write_table(table, data)
            client.put_object(Bucket="plan", Key=f"in/part-{i:05d}.parquet", Body=data.getvalue())
        # The proxy in a process of its own: its threads would otherwise share this one's interpreter lock.
        root = str(Path(__file__).resolve().parents[1])
        argv = [sys.executable, "-c", PROXY, S3_HOST, str(s3_port()), str(args.rtt)]
        proxy = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": root})
        os.environ["AWS_ENDPOINT_URL"] = proxy.stdout.readline().strip()

        requests = collections.Counter()
        made = storage_module.s3_client

        def counted(*a, **kw):  # every planning thread's client
            client = made(*a, **kw)
            client.meta.events.register("before-call.s3", lambda model, **_: requests.update([model.name]))
            return client

        storage_module.s3_client = counted
        config = from_mapping({"prompts": "s3://plan/in/", "out": "s3://plan/out", "model": "tiny"})
        print(f"{args.files} files of {args.rows} rows, {args.rtt * 1000:g} ms added per request")
        print("| threads | seconds | ms per file | requests per file |")
        print("|---|---|---|---|")
        for threads in args.threads:
            inputs.PLAN_THREADS = threads
            requests.clear()
            start = time.perf_counter()
            plan = inputs.plan(config)
            seconds = time.perf_counter() - start
            assert plan.images == args.files * args.rows
            per_file = (sum(requests.values()) - requests["ListObjectsV2"]) / args.files
            print(f"| {threads} | {seconds:.1f} | {seconds / args.files * 1000:.0f} | {per_file:g} |")
    finally:
        if proxy is not None:
            proxy.kill()
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
