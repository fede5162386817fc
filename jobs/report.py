"""`{out}/report.html`: one self-contained page (no scripts, no external files).

Its head is the summary of _SUCCESS, in two parts: the whole output (every image of the input, whichever run made
it) and this run. The rest is drawn from this run's manifest rows only (every run's, when the run rendered nothing
itself), and says so:
- Throughput over time for each pool: images finished per time bin by the Stage C pool, the Stage B/A pool and the
  writers.
- Each pool's busy fraction: the union of its actors' batch intervals over (actors x the pool's span), and the
  fraction of the time from the first batch's start to the last image written during which both pools were busy.
- Each pool's images per model batch (below its batch size: rows of mixed buckets, the input's tail, or batches
  halved after running out of device memory).
- A timeline of every actor's batches, which shows whether the pools overlap.
- A contact sheet of sample images with their prompts (escaped: a prompt is text, never markup), and the first
  errors.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from workers.storage import Storage

from .manifest import MANIFEST_DIR, REPORT, manifest_keys, read_manifests, read_part

POOLS = (("prior", "Stage C pool", "#4878d0"), ("decoder", "Stage B/A pool", "#ee854a"))
SHEET_IMAGES, ERRORS_SHOWN, THUMB = 24, 20, 160


def _merge(starts: np.ndarray, ends: np.ndarray, gap: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """The union of the intervals [starts[i], ends[i]] as two sorted arrays of disjoint intervals. Intervals that
    touch, or are at most `gap` apart, become one."""
    if len(starts) == 0:
        return starts, ends
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], np.maximum.accumulate(ends[order])  # ends[i]: the furthest end so far
    first = np.flatnonzero(np.concatenate(([True], starts[1:] - ends[:-1] > gap)))  # where a merged interval begins
    return starts[first], ends[np.append(first[1:] - 1, len(starts) - 1)]


def _length(starts: np.ndarray, ends: np.ndarray) -> float:
    return float(np.sum(ends - starts))


STAT_COLUMNS = [f"{pool}_{x}" for pool, _, _ in POOLS for x in ("actor", "start", "end", "batch")]
STAT_COLUMNS += ["write_end", "status"]


def images_per_batch(table: pa.Table, pool: str) -> float | None:
    """The mean number of images in the pool's model batches: each image records the size of the batch it ran in
    (`<pool>_batch`), so a batch of b images is b rows of 1/b. None where no row records one (older manifests)."""
    name = f"{pool}_batch"
    if name not in table.column_names:
        return None
    sizes = table.column(name).drop_null()
    if len(sizes) == 0:
        return None
    return len(sizes) / pc.sum(pc.divide(1.0, pc.cast(sizes, pa.float64()))).as_py()


def pool_stats(table: pa.Table) -> dict:
    """Per pool: actors, the number of batches, each actor's batches, busy fraction, images per model batch;
    and the time both pools were busy.

    A batch is one distinct (actor, start, end) of the rows. Everything is Arrow and NumPy arrays, a few numbers per
    row: a run of a million images has hundreds of thousands of batches, which as Python tuples took about 1 KB each."""
    stats, busy = {}, {}
    for pool, _, _ in POOLS:
        names = [f"{pool}_actor", f"{pool}_start", f"{pool}_end"]
        code = np.zeros(0, np.int32)
        if set(names) <= set(table.column_names):
            actor = pc.cast(table.column(names[0]), pa.string())  # (a part whose rows all lack one has type null)
            actors = pc.unique(actor).drop_null().sort()  # (the order Python sorts str in)
            code = pc.index_in(actor, value_set=actors).fill_null(-1).to_numpy()
            starts, ends = (table.column(n).to_numpy(zero_copy_only=False).astype(float, copy=False) for n in names[1:])
            known = (code >= 0) & ~np.isnan(starts) & ~np.isnan(ends)  # (a null reads as NaN)
            code, starts, ends = code[known], starts[known], ends[known]
        if len(code) == 0:
            stats[pool] = {"actors": 0, "batches": 0, "actor_batches": [], "busy_fraction": 0.0, "span_s": 0.0}
            stats[pool]["images_per_batch"] = None
            busy[pool] = (np.zeros(0), np.zeros(0))
            continue
        order = np.lexsort((ends, starts, code))  # by actor, then start: each batch's rows side by side
        code, starts, ends = code[order], starts[order], ends[order]
        first = np.concatenate(([True], (np.diff(code) != 0) | (np.diff(starts) != 0) | (np.diff(ends) != 0)))
        code, starts, ends = code[first], starts[first], ends[first]  # one per batch
        cut = np.flatnonzero(np.diff(code)) + 1
        per_actor = list(zip(np.split(starts, cut), np.split(ends, cut)))
        busy_s = sum(_length(*_merge(s, e)) for s, e in per_actor)
        span = (float(starts.min()), float(ends.max()))
        stats[pool] = {
            "actors": len(per_actor),
            "batches": len(starts),
            "actor_batches": per_actor,  # per actor, in the order of their names: its batches' starts and ends
            "busy_fraction": busy_s / (len(per_actor) * (span[1] - span[0])) if span[1] > span[0] else 1.0,
            "span_s": span[1] - span[0],
            "span": span,
            "images_per_batch": images_per_batch(table, pool),
        }
        busy[pool] = _merge(starts, ends)
    # |A and B| = |A| + |B| - |A or B|, each a union of disjoint intervals.
    either = _merge(*(np.concatenate(x) for x in zip(busy["prior"], busy["decoder"])))
    both = max(0.0, _length(*busy["prior"]) + _length(*busy["decoder"]) - _length(*either))
    starts = [s["span"][0] for s in stats.values() if s.get("span")]
    ends = [s["span"][1] for s in stats.values() if s.get("span")]
    writes = "write_end" in table.column_names and table.column("write_end").null_count < table.num_rows
    if writes:
        ends.append(pc.max(table.column("write_end")).as_py())
    wall = (max(ends) - min(starts)) if starts else 0.0
    # wall_s runs from the first batch's start to the last image written (the last batch's end in manifests that
    # predate write_end).
    return {
        "pools": stats,
        "both_busy_s": both,
        "wall_s": wall,
        "t0": min(starts) if starts else 0.0,
        "wall_to_write": writes,
    }


def _svg_throughput(table: pa.Table, t0: float, wall: float) -> str:
    bins = 40
    width, height, pad = 720, 200, 30
    step = max(wall, 1e-6) / bins
    lines = []
    peak = 1e-9
    series = []
    for pool, label, color in (*POOLS, ("write", "writers", "#6acc64")):
        name = f"{pool}_end"
        ends = table.column(name).drop_null().to_numpy() if name in table.column_names else np.zeros(0)
        counts, _ = np.histogram(ends, bins=bins, range=(t0, t0 + bins * step))
        rates = (counts / step).tolist()
        peak = max(peak, *rates)
        series.append((label, color, rates))
    for label, color, rates in series:
        points = " ".join(
            f"{pad + (i + 0.5) * (width - 2 * pad) / bins:.1f},{height - pad - r / peak * (height - 2 * pad):.1f}"
            for i, r in enumerate(rates)
        )
        lines.append(
            f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{points}">'
            f"<title>{label}</title></polyline>"
        )
    legend = "".join(
        f'<text x="{pad + 10 + k * 160}" y="16" fill="{color}" font-size="12">{html.escape(label)}</text>'
        for k, (label, color, _) in enumerate(series)
    )
    axes = (
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#888"/>'
        f'<text x="{pad}" y="{height - 8}" font-size="11">0 s</text>'
        f'<text x="{width - pad - 40}" y="{height - 8}" font-size="11">{wall:.1f} s</text>'
        f'<text x="2" y="{pad}" font-size="11">{peak:.2f}/s</text>'
    )
    return f'<svg width="{width}" height="{height}" role="img">{axes}{legend}{"".join(lines)}</svg>'


def _svg_timeline(stats: dict) -> str:
    """One lane per actor, a bar per batch (1 px at least), drawn at the page's resolution: bars that overlap or are
    under half a pixel apart are drawn as one, which looks the same, so a lane has at most one bar per 1.5 px whatever
    the number of batches (a rect per batch made a 32 MB page of a million images, most of them in one strip)."""
    rows_svg, y, width, pad, lane = [], 10, 720, 140, 16
    t0, wall = stats["t0"], max(stats["wall_s"], 1e-6)
    scale = (width - pad - 10) / wall  # px per second
    for pool, label, color in POOLS:
        for k, (starts, ends) in enumerate(stats["pools"][pool]["actor_batches"]):
            rows_svg.append(f'<text x="0" y="{y + 11}" font-size="11">{html.escape(f"{label} {k}")}</text>')
            x0 = pad + (starts - t0) * scale
            x0, x1 = _merge(x0, x0 + np.maximum(1.0, (ends - starts) * scale), gap=0.5)
            bars = "".join(
                f'<rect x="{a:.1f}" y="{y}" width="{b - a:.1f}" height="{lane - 4}"/>'
                for a, b in zip(x0.tolist(), x1.tolist())
            )
            rows_svg.append(f'<g fill="{color}">{bars}</g>')
            y += lane
    return f'<svg width="{width}" height="{y + 10}" role="img">{"".join(rows_svg)}</svg>'


def _sample_images(storage: Storage, rows: list[dict]) -> dict[tuple[str, str | None], bytes]:
    """(key, member) -> the image's bytes, for the rows that could be read: an image object whole, a WebDataset
    shard's member read through the tar's headers (ranged reads on S3: not the whole shard, which may be hundreds of
    MB). Best effort, like the contact sheet."""
    found: dict[tuple[str, str | None], bytes] = {}
    members: dict[str, set[str]] = {}
    for r in rows:
        if r.get("member"):
            members.setdefault(r["key"], set()).add(r["member"])
            continue
        with contextlib.suppress(Exception):
            found[r["key"], None] = storage.get(r["key"])
    for key, wanted in members.items():
        with contextlib.suppress(Exception), storage.open_input(key) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for info in tar:
                if info.name in wanted:
                    found[key, info.name] = tar.extractfile(info).read()
                    wanted.discard(info.name)
                    if not wanted:
                        break
    return found


def _shown_rows(storage: Storage, run_id: str | None, errors: int) -> tuple[list[dict], list[dict]]:
    """The first ok rows (the contact sheet's) and the first `errors` error rows of the run (of every run: None). Only
    those become Python, and parts are read one at a time, until both are found: a run's prompts are never all in
    memory at once (a million of them are hundreds of MB as Arrow)."""
    columns = ["id", "image_index", "seed", "prompt", "key", "member", "status", "error"]
    ok: list[dict] = []
    failed: list[dict] = []
    for key in manifest_keys(storage, run_id):
        if len(ok) == SHEET_IMAGES and len(failed) >= errors:
            break
        part = read_part(storage, key, columns)
        status = part.column("status")
        ok += part.filter(pc.equal(status, "ok")).slice(0, SHEET_IMAGES - len(ok)).to_pylist()
        failed += part.filter(pc.not_equal(status, "ok")).slice(0, max(0, errors - len(failed))).to_pylist()
    return ok, failed


def _thumbnail(data: bytes) -> str:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    image.thumbnail((THUMB, THUMB))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=80)
    return base64.b64encode(out.getvalue()).decode()


def _per_batch(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def build_report(storage: Storage, run_id: str | None, summary: dict) -> str:
    """The page for one run (run_id), or for every run in the manifests (None); `summary` is _SUCCESS's."""
    table = read_manifests(storage, STAT_COLUMNS, run_id=run_id)
    if table is None:
        table = pa.table({c: pa.array([], pa.string()) for c in ("status",)})
    stats = pool_stats(table)
    failed = int(pc.sum(pc.not_equal(table.column("status"), "ok")).as_py() or 0)
    samples, errors = _shown_rows(storage, run_id, min(failed, ERRORS_SHOWN))
    esc = html.escape
    pool_rows = "".join(
        f"<tr><td>{esc(label)}</td><td>{p['actors']}</td><td>{p['busy_fraction']:.1%}</td><td>{p['span_s']:.1f} s</td>"
        f"<td>{_per_batch(p['images_per_batch'])}</td></tr>"
        for pool, label, _ in POOLS
        for p in [stats["pools"][pool]]
    )
    images = _sample_images(storage, samples)
    cells = []
    for r in samples:
        try:
            thumb = _thumbnail(images[r["key"], r.get("member")])
        except Exception:  # a contact sheet is best effort; the manifest is the record
            continue
        cells.append(
            f'<figure><img src="data:image/jpeg;base64,{thumb}" alt=""><figcaption>{esc(r["prompt"] or "")}'
            f"<br><small>{esc(r['id'])} #{r['image_index']} seed {r['seed']}</small></figcaption></figure>"
        )
    error_rows = "".join(
        f"<tr><td>{esc(str(r['id']))}</td><td>{r['image_index']}</td><td>{esc(r['error'] or '')}</td></tr>"
        for r in errors
    )
    # The summary (_SUCCESS) counts the whole output, earlier runs' images included; everything under it is drawn from
    # the manifest rows of this run (of every run, when the run rendered nothing itself).
    whole = {k: summary[k] for k in ("images", "ok", "errors", "resumed") if k in summary}
    this_run = {
        k: summary[k] for k in ("rendered_this_run", "errors_this_run", "wall_s", "images_per_s") if k in summary
    }
    here = "this run" if run_id else "all runs"
    if run_id:
        scope = (
            f"From here on, this page covers this run's {table.num_rows:,} images only (manifest rows of run {run_id})"
        )
        resumed = summary.get("resumed") or 0
        scope += f", not the {resumed:,} that earlier runs made." if resumed else "."
    else:
        scope = (
            f"This run rendered nothing itself: from here on, this page covers the manifest rows of every run on this "
            f"output ({table.num_rows:,} images), and its times span all of those runs and the time between them."
        )
    earlier = (summary.get("errors") or 0) - failed if run_id else 0
    errors_html = (
        f"<table><tr><th>id</th><th>image</th><th>error</th></tr>{error_rows}</table>" if errors else "<p>None.</p>"
    )
    if earlier > 0:
        errors_html += (
            f"<p>The output's {earlier:,} other errors were recorded by earlier runs: their rows are in the manifests "
            f"under {esc(MANIFEST_DIR)}/ (status error, another run_id).</p>"
        )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>cascade-batch report {esc(run_id or "all runs")}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:900px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px}}
figure{{display:inline-block;width:{THUMB}px;margin:6px;vertical-align:top}}
figcaption{{font-size:11px;overflow-wrap:anywhere}}</style></head><body>
<h1>{esc(f"Run {run_id}" if run_id else "All runs")}</h1>
<p>Model {esc(str(summary.get("model")))} (weights digest {esc(str(summary.get("model_digest")))}).</p>
<h2>The whole output</h2>
<p>Every image of the input, whichever run made it (<code>resumed</code>: those earlier runs had made):</p>
<pre>{esc(json.dumps(whole, indent=1))}</pre>
<h2>This run</h2>
<p>From the job's start (Ray and the models loading included) to <code>_SUCCESS</code>; <code>rendered_this_run</code>
counts its manifest rows, <code>errors_this_run</code> of them error rows, and <code>images_per_s</code> the images it
made:</p>
<pre>{esc(json.dumps(this_run, indent=1))}</pre>
<p><b>{esc(scope)}</b></p>
<h2>Pools ({here})</h2>
<table><tr><th>pool</th><th>actors</th><th>busy</th><th>span</th><th>images per model batch</th></tr>{pool_rows}</table>
<p>{_overlap(stats, summary)}</p>
<h2>Throughput over time ({here}, images/s)</h2>
{_svg_throughput(table, stats["t0"], stats["wall_s"])}
<h2>Timeline ({here}: each actor's batches; those under half a pixel apart are drawn as one bar)</h2>
{_svg_timeline(stats)}
<h2>Samples ({here})</h2>
{"".join(cells) or f"<p>No images in {here}.</p>"}
<h2>Errors in {here}: {failed:,}{f" (the first {ERRORS_SHOWN})" if failed > ERRORS_SHOWN else ""}</h2>
{errors_html}
</body></html>
"""


def _overlap(stats: dict, summary: dict) -> str:
    """The time both pools were busy at once, over what wall_s spans. "GPU" only where the summary says every actor
    had one (`actor_gpus`, per actor of each pool): the same pools run on the CPU."""
    overlap = stats["both_busy_s"] / stats["wall_s"] if stats["wall_s"] else 0.0
    gpus = summary.get("actor_gpus") or {}
    pools = "GPU pools" if gpus and all(gpus.values()) else "pools"
    cpu = " (a CPU run: no actor had a GPU)" if gpus and not any(gpus.values()) else ""
    until = "the last image written" if stats["wall_to_write"] else "the last batch's end"
    return (
        f"Both {pools} busy at once: {overlap:.1%} of the {stats['wall_s']:.1f} s from the first batch's start to "
        f"{until}{cpu}."
    )


def write_report(storage: Storage, run_id: str | None, summary: dict) -> None:
    storage.put(REPORT, build_report(storage, run_id, summary).encode(), content_type="text/html; charset=utf-8")
