"""Measure the peak resident memory (RSS) of `cascade.weights.load_stage` on a full-size bf16 Stage C.

A benchmark command, not a test. It generates a random-weight Stage C (3,589,103,632 parameters, ~7.18 GB in bf16)
in the official Stability single-file layout (`stage_c_bf16.safetensors`: our state_dict keys, BF16, no cascade
metadata), streaming it to disk one tensor at a time, then loads it in a fresh subprocess per case so that the RSS
is the loader's alone.

    python scripts/measure_load_memory.py --generate /work/scratch_rss/stage_c_bf16.safetensors
    python scripts/measure_load_memory.py --load /work/scratch_rss/stage_c_bf16.safetensors
    python scripts/measure_load_memory.py --generate P --load P --delete   # all in one go

Each case reports: peak RSS (getrusage ru_maxrss and /proc/self/status VmHWM, which include pages of the mapped
file), the RSS after imports (baseline), the largest RssAnon and RssFile seen by a 10 ms sampler thread during the
load, RssAnon / RssFile at the end, the model's parameter bytes, wall time and peak / model bytes.

By default the file's pages are dropped from the page cache (posix_fadvise DONTNEED) before each case so the timings
start equally cold; --warm keeps them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHUNK = 1 << 24  # elements generated at once for big tensors: 64 MB of float32 + 32 MB of bf16
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
LOADERS = {"load_stage": "cascade.weights.load_stage"}


# ---------------------------------------------------------------------------------------------------------------------
# Generating the file
# ---------------------------------------------------------------------------------------------------------------------


def generate(path: Path, seed: int = 0) -> None:
    import torch

    from cascade.stage_c import STAGE_C_3B, StageC

    with torch.device("meta"):
        model = StageC(STAGE_C_3B)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    del model
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        nbytes = 2 * _numel(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # safetensors pads the header with spaces to a multiple of 8
    path.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    t0, written = time.perf_counter(), 0
    print(f"writing {path}: {len(shapes)} tensors, {_numel_total(shapes):,} parameters, {offset / 1e9:.2f} GB of data")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for i, shape in enumerate(shapes.values()):
            n = _numel(shape)
            for start in range(0, n, CHUNK):
                m = min(CHUNK, n - start)
                chunk = torch.randn(m, generator=g).mul_(0.02).to(torch.bfloat16)
                f.write(memoryview(chunk.view(torch.uint8).numpy()))
                written += 2 * m
                del chunk
            if i % 100 == 0 or i == len(shapes) - 1:
                print(f"  {i + 1:5d}/{len(shapes)} tensors, {written / 1e9:5.2f} GB, {time.perf_counter() - t0:6.1f} s")
        f.flush()
        os.fsync(f.fileno())
        _drop_cache(f.fileno())
    size = path.stat().st_size
    assert size == 8 + len(head) + offset, (size, 8 + len(head) + offset)
    print(f"wrote {size:,} bytes in {time.perf_counter() - t0:.1f} s; generator peak RSS {_maxrss_mb():.0f} MB")
    verify_file(path, shapes)


def verify_file(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    import torch
    from safetensors import safe_open

    from cascade.weights import read_header

    tensors, metadata = read_header(path)
    assert {k: t.shape for k, t in tensors.items()} == shapes, "read_header: names or shapes differ"
    assert all(t.dtype == "BF16" for t in tensors.values())
    with safe_open(str(path), framework="pt", device="cpu") as f:
        keys = set(f.keys())
        assert keys == set(shapes), "safe_open: names differ"
        last = list(shapes)[-1]
        t = f.get_tensor(last)
        assert t.dtype == torch.bfloat16 and tuple(t.shape) == shapes[last]
        assert torch.equal(t, read_raw(path, last)), "safe_open and a raw read disagree"
    print(f"verified: safe_open opens it ({len(keys)} keys), read_header accepts it (metadata {metadata})")


def _offsets(path: Path) -> tuple[dict, int]:
    """The safetensors header and the byte offset where tensor data starts."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return header, 8 + n


def read_raw(path: Path, name: str):
    """One tensor, read with plain file reads (used to check values independently of safetensors)."""
    import torch

    hdr, base = _offsets(path)
    info = hdr[name]
    begin, end = info["data_offsets"]
    with open(path, "rb") as f:
        f.seek(base + begin)
        data = bytearray(f.read(end - begin))
    return torch.frombuffer(data, dtype=torch.bfloat16).reshape(info["shape"]) if data else torch.empty(info["shape"])


# ---------------------------------------------------------------------------------------------------------------------
# Measuring one case (in a fresh child process)
# ---------------------------------------------------------------------------------------------------------------------


def _status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of this process, in kB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0])
    return out


class Sampler(threading.Thread):
    """Largest VmRSS, RssAnon and RssFile seen every `interval` seconds (each may peak at a different moment)."""

    def __init__(self, interval: float = 0.01):
        super().__init__(daemon=True)
        self.interval, self.stop, self.peak, self.at_peak, self.samples = interval, threading.Event(), {}, {}, 0

    def run(self) -> None:
        while not self.stop.is_set():
            s = _status()
            self.samples += 1
            for k, v in s.items():
                self.peak[k] = max(self.peak.get(k, 0), v)
            if s["VmRSS"] >= self.at_peak.get("VmRSS", 0):
                self.at_peak = s
            time.sleep(self.interval)


def child(path: Path, dtype_name: str, loader: str) -> dict:
    import torch

    import cascade  # noqa: F401
    import cascade.weights as W

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    dtype = getattr(torch, DTYPES[dtype_name])

    base, base_maxrss = _status(), _maxrss_kb()
    sampler = Sampler()
    sampler.start()
    t0 = time.perf_counter()
    model = W.load_stage(path, dtype=dtype, device="cpu")
    seconds = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    end, maxrss = _status(), _maxrss_kb()  # read before the checks below touch anything

    params = list(model.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in params)
    model_bytes += sum(b.numel() * b.element_size() for b in model.buffers())
    state = model.state_dict()
    checks = {}
    for name in ("clip_txt_mapper.weight", "up_blocks.1.0.channelwise.0.weight"):
        p = state[name]
        checks[name] = {
            "dtype": str(p.dtype),
            "device": str(p.device),
            "equal_to_file": bool(torch.equal(p, read_raw(path, name).to(dtype))),
        }
    ok = all(c["dtype"] == str(dtype) and c["device"] == "cpu" and c["equal_to_file"] for c in checks.values())
    ok = ok and all(p.dtype == dtype and p.device.type == "cpu" for p in params)
    return {
        "loader": loader,
        "dtype": dtype_name,
        "n_params": sum(p.numel() for p in params),
        "model_bytes": model_bytes,
        "seconds": seconds,
        "baseline_kb": base["VmRSS"],
        "baseline_maxrss_kb": base_maxrss,
        "ru_maxrss_kb": maxrss,
        "vmhwm_kb": end["VmHWM"],
        "peak_sampled_kb": sampler.peak,
        "at_peak_sampled_kb": sampler.at_peak,
        "samples": sampler.samples,
        "end_kb": end,
        "checks": checks,
        "ok": ok,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Running the cases and printing the table
# ---------------------------------------------------------------------------------------------------------------------


def run_case(path: Path, dtype_name: str, loader: str, warm: bool) -> dict:
    if not warm:
        fd = os.open(path, os.O_RDONLY)
        try:
            _drop_cache(fd)
        finally:
            os.close(fd)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(path), dtype_name, loader]
    print(f"\n== {loader} -> {dtype_name}  ({LOADERS[loader]})", flush=True)
    print(f"   available memory before: {_available_mb():,.0f} MB", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout, proc.stderr, sep="\n")
        return {"loader": loader, "dtype": dtype_name, "error": f"exit {proc.returncode}: {proc.stderr[-500:]}"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    g = 1e9 / 1024  # kB -> GB (10^9 bytes)
    print(
        f"   peak RSS {result['ru_maxrss_kb'] / g:.2f} GB (VmHWM {result['vmhwm_kb'] / g:.2f}), baseline "
        f"{result['baseline_kb'] / g:.2f} GB, sampled peak RssAnon {result['peak_sampled_kb']['RssAnon'] / g:.2f} / "
        f"RssFile {result['peak_sampled_kb']['RssFile'] / g:.2f} GB, end RssAnon "
        f"{result['end_kb']['RssAnon'] / g:.2f} / RssFile {result['end_kb']['RssFile'] / g:.2f} GB, model "
        f"{result['model_bytes'] / 1e9:.2f} GB, {result['seconds']:.1f} s, checks {'ok' if result['ok'] else 'FAILED'}"
        f" ({result['samples']} samples)",
        flush=True,
    )
    return result


def table(results: list[dict], warm: bool) -> str:
    import safetensors
    import torch

    lines = [
        f"Peak RSS of `load_stage` on a random-weight full-size Stage C (`stage_c_bf16.safetensors`, "
        f"3,589,103,632 parameters). Machine: {os.cpu_count()}-core CPU, {_total_gib():.0f} GiB RAM, no GPU; "
        f"{datetime.date.today().isoformat()}; Python {platform.python_version()}, torch {torch.__version__}, "
        f"safetensors {safetensors.__version__}; page cache {'warm' if warm else 'dropped before each case'}. "
        "GB = 10^9 bytes. Peak RSS = ru_maxrss (= VmHWM); RssAnon / RssFile peaks are the largest values a 10 ms "
        "sampler saw; *end* is after load_stage returned.",
        "",
        "| loader | file → model | peak RSS | baseline | peak − baseline | peak RssAnon | peak RssFile "
        "| end RssAnon | end RssFile | model bytes | peak / model | (peak − base) / model | time |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['loader']} | bf16 → {r['dtype']} | failed: {r['error'][:80]} |" + " |" * 10)
            continue
        peak, base, mb = r["ru_maxrss_kb"] * 1024, r["baseline_kb"] * 1024, r["model_bytes"]
        gb = lambda kb: f"{kb * 1024 / 1e9:.2f} GB"  # noqa: E731
        name = r["loader"]
        lines.append(
            f"| {name} | bf16 → {r['dtype']} | {peak / 1e9:.2f} GB | {base / 1e9:.2f} GB "
            f"| {(peak - base) / 1e9:.2f} GB "
            f"| {gb(r['peak_sampled_kb']['RssAnon'])} | {gb(r['peak_sampled_kb']['RssFile'])} "
            f"| {gb(r['end_kb']['RssAnon'])} | {gb(r['end_kb']['RssFile'])} | {mb / 1e9:.2f} GB "
            f"| {peak / mb:.2f} | {(peak - base) / mb:.2f} | {r['seconds']:.1f} s |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------------------------


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _numel_total(shapes) -> int:
    return sum(_numel(s) for s in shapes.values())


def _maxrss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux


def _maxrss_mb() -> float:
    return _maxrss_kb() / 1024


def _drop_cache(fd: int) -> None:
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _meminfo(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _available_mb() -> float:
    return _meminfo("MemAvailable") / 1024


def _total_gib() -> float:
    return _meminfo("MemTotal") / 2**20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generate", type=Path, metavar="PATH", help="write a random-weight bf16 Stage C file here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--load", type=Path, metavar="PATH", help="measure loading this file, one fresh process per case")
    ap.add_argument("--dtypes", default="bf16,fp32", help="target dtypes, comma-separated (bf16, fp32)")
    ap.add_argument("--warm", action="store_true", help="keep the file in the page cache between cases")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    ap.add_argument("--delete", action="store_true", help="delete the file when done")
    ap.add_argument("--child", nargs=3, metavar=("PATH", "DTYPE", "LOADER"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        path, dtype_name, loader = args.child
        print(json.dumps(child(Path(path), dtype_name, loader)))
        return 0
    if not (args.generate or args.load):
        ap.error("nothing to do: pass --generate PATH and/or --load PATH")
    if args.load and not args.generate and not args.load.is_file():
        ap.error(f"--load: {args.load} is not a file (--generate PATH writes one)")
    bad = [d for d in args.dtypes.split(",") if d not in ("bf16", "fp32")]
    if bad:
        ap.error(f"--dtypes: {', '.join(bad)} not allowed; use bf16 and/or fp32, comma-separated")
    if args.generate:
        generate(args.generate, args.seed)
    results: list[dict] = []
    if args.load:
        loaders = list(LOADERS)
        dtypes = args.dtypes.split(",")
        for name in loaders + dtypes:
            if name not in LOADERS and name not in DTYPES:
                ap.error(f"unknown loader or dtype {name!r}")
        for loader in loaders:
            for dtype_name in dtypes:
                results.append(run_case(args.load, dtype_name, loader, args.warm))
        print("\n" + table(results, args.warm))
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    if args.delete:
        for p in {args.generate, args.load} - {None}:
            if p.exists():
                p.unlink()
                print(f"deleted {p}")
    return 1 if any("error" in r or not r.get("ok") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
