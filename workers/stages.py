"""The pipeline's operators for Ray Data's `map_batches`: two GPU actor pools and a CPU writer.

- `PriorStage` (actor): text encoder + Stage C. Adds per image the Stage C latent and the pooled text embeddings of
  the prompt and the negative prompt, as raw bf16/fp16/fp32 bytes: the latent queue between the pools.
- `DecoderStage` (actor): Stage B + Stage A. Replaces those with the image's RGB pixels.
- `write_images` (task): encodes each image, stores it at its key with a conditional write and returns manifest rows.

Batches are Arrow tables; columns the stages do not know (the input's extra columns) pass through untouched. A row
with an `error` passes through every stage without work. Each actor loads its models once, onto the GPU Ray gave it
(CUDA_VISIBLE_DEVICES) or the CPU when there is none, and runs each block it gets as model batches of at most its
pool's batch size, each of one bucket (equal size, steps and cfg). A block is small (a batch, or a few at small batch
sizes: jobs.generate.block_rows) so that the two pools overlap.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import time

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from cascade.float8 import float8_linears, float8_supported
from cascade.geometry import OFFICIAL
from cascade.lora import apply_lora_file
from cascade.pipeline import PriorOutput, Result, run_decoder, run_prior
from cascade.request import Request, buckets, latent_sizes
from cascade.speed import allow_recompiles, compile_blocks

from .models import load_part
from .rows import REQUEST_FIELDS, request_of, requests_of, set_columns

WIRE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LATENT_COLUMNS = ("latent", "clip_pooled", "clip_pooled_negative")


def to_wire(t: torch.Tensor, dtype: str) -> bytes:
    """A tensor as raw little-endian bytes of `dtype` (bf16 travels as its 16-bit pattern)."""
    t = t.detach().to("cpu", WIRE_DTYPES[dtype]).contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def from_wire(data: bytes, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The inverse of to_wire, as float32."""
    if dtype == "bf16":
        return torch.from_numpy(np.frombuffer(data, dtype=np.int16).copy()).view(torch.bfloat16).reshape(shape).float()
    np_dtype = {"fp16": np.float16, "fp32": np.float32}[dtype]
    return torch.from_numpy(np.frombuffer(data, dtype=np_dtype).copy()).reshape(shape).float()


# Dry runs skip the model maths but move the same data: full-size latents and pooled embeddings (zeros) through the
# queue, full-size images (flat grey) to the writers. For testing storage, manifests and the plumbing at scale.
DRY_CLIP_DIM = 1280  # CLIP-G's pooled width, as the official model


def dry_prior(requests: list[Request], geometry=OFFICIAL) -> list[PriorOutput]:
    outputs = []
    for r in requests:
        shape_c, _ = latent_sizes(r.width, r.height, geometry)
        zeros = torch.zeros(1, DRY_CLIP_DIM)
        outputs.append(PriorOutput(r, torch.zeros(shape_c), zeros, zeros))
    return outputs


def dry_decoder(priors: list[PriorOutput]) -> list[Result]:
    return [Result(p.request, Image.new("RGB", (p.request.width, p.request.height), (128, 128, 128))) for p in priors]


def _actor_name(stage: str) -> str:
    """stage@host:pid/node: which process, and which Ray node (several nodes can share a host)."""
    node = "local"  # outside Ray (in-process use, tests)
    try:
        import ray

        if ray.is_initialized():  # (asking for the runtime context would start a Ray)
            node = ray.get_runtime_context().get_node_id()[:12]
    except Exception:
        pass
    return f"{stage}@{socket.gethostname()}:{os.getpid()}/{node}"


class SettingRefused(ValueError):
    """A job setting an actor's node cannot honour (fp8 on a GPU without float8 products); the message names the
    setting. The job exits 2 for it, as for a setting refused before Ray starts: a rerun would meet it again."""


def free_device_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _Stage:
    part = ""
    title = ""  # the pool's name in messages

    def __init__(
        self,
        model: str,
        lite: bool,
        dtype: str,
        latent_dtype: str,
        dry_run: bool = False,
        geometry=OFFICIAL,
        lora: str = "",
        compile: bool = False,
        fp8: bool = False,
        batch_size: int | None = None,
        warm_up: Request | None = None,
    ):
        """batch_size: the most images per model batch (None: a block's rows, all of one bucket, are one batch). A
        block may carry several batches: Ray Data's cost is per block (docs/PERFORMANCE.md).
        fp8: Stage C's token linear layers as float8 products, on the prior actors only (Stage B in float8 measured
        2 % slower on an H200); SettingRefused where this device cannot run them.
        warm_up: the job's usual request (its default size, cfg and sampler): the actor runs one batch of it at one
        step before it takes work (`_warm_up`)."""
        start = time.perf_counter()
        self.batch_size = batch_size
        self.name = _actor_name(self.part)
        self.models = None if dry_run else load_part(model, lite, dtype, self.part)
        if lora and self.models is not None:
            # Text encoder + Stage C on the prior actors; Stage B on the decoder actors if the file has a part for it.
            apply_lora_file(self.models, lora)
        if fp8 and self.part == "prior" and self.models is not None:
            self._float8()  # after the LoRA merge (it copies the merged weights) and before compiling
        self.compiled = compile and self.models is not None
        if self.compiled:
            # After the LoRA merge; each block compiles on the first batch of each bucket (shape), then is cached.
            compile_blocks(self.models.stage_c if self.part == "prior" else self.models.stage_b)
        self.geometry = geometry if self.models is None else self.models.geometry
        self.latent_dtype = latent_dtype
        self.fit = 1 << 30  # the largest batch known to fit in the device's memory (lowered on out-of-memory)
        self.load_s = time.perf_counter() - start
        self.warm_s = 0.0
        if warm_up is not None and self.models is not None:
            start = time.perf_counter()
            self._warm_up(dataclasses.replace(warm_up, prior_steps=1, decoder_steps=1), batch_size or 1)
            self.warm_s = time.perf_counter() - start
            # One line per actor as it becomes ready: where a slow start went (loading, or compiling while warming).
            print(
                f"[{self.title} actor {self.name}] ready: models loaded in {self.load_s:.1f} s, warmed up in "
                f"{self.warm_s:.1f} s",
                file=sys.stderr,
                flush=True,
            )

    def _float8(self) -> None:
        """Stage C's token linear layers as float8 products (cascade.float8), or SettingRefused naming the setting
        and why this node's device or torch cannot: a GPU before Ada, a model not in bf16, an old torch."""
        # Asked here rather than caught from float8_linears: its RuntimeError would also catch a CUDA out-of-memory
        # error (a subclass), which is no refusal of the setting.
        first = next(self.models.stage_c.parameters())
        reason = float8_supported(first.device, first.dtype)
        if reason is not None:
            raise SettingRefused(
                f"fp8: True is not allowed on the {self.title} actor {self.name}: {reason}; set fp8: false (leave out "
                "--fp8) for this cluster"
            )
        count = float8_linears(self.models.stage_c)
        # A CPU runs the GPU's float8 arithmetic (torch 2.13's reference kernels): the same pixels, none of the speed.
        slow = (
            " (on a CPU: a GPU's arithmetic, emulated, slower than without fp8)" if first.device.type == "cpu" else ""
        )
        print(
            f"[{self.title} actor {self.name}] {count} linear layers of Stage C as float8 products{slow}",
            file=sys.stderr,
        )

    def _warm_up(self, request: Request, batch_size: int) -> None:
        """Run one batch of `request` (a whole batch of the pool's size, so the same shapes as the job's) and drop
        it. What a device does once per process happens here, while the job starts, rather than in the first
        batch of work: CUDA's context and cuBLAS/cuDNN handles, kernel choice, the allocator's blocks, and with
        `compile` the compilation of the job's usual bucket (tens of seconds), all in parallel with the other
        pool's actors doing the same. Best effort: a batch that does not fit is left for the work to split
        (`_fitted`), because the rows may ask for smaller images than the usual one."""
        try:
            self._warm_batch(request, batch_size)
            return
        except torch.cuda.OutOfMemoryError:
            pass  # handled below, outside the handler: its traceback holds the batch's activations
        free_device_memory()
        print(
            f"note: {self.title}: the warm-up batch ({batch_size} of {request.width}x{request.height}) ran out of "
            "GPU memory; the work's batches will be split where they do not fit",
            file=sys.stderr,
            flush=True,
        )

    def _warm_batch(self, request: Request, batch_size: int) -> None:
        """One model batch of batch_size copies of `request` through this actor's models (each stage its own)."""
        raise NotImplementedError

    def _batch_columns(self, spans: list, batches: list) -> dict[str, pa.Array]:
        """When each row's model batch ran, and on which actor: the report's busy fractions and timeline come from
        these. spans: (start, end) of each row's group; batches: the size of the model batch each row ran in, None
        for rows that ran in none (they came with an error, or did not fit the device alone): those get no span."""
        ran = [s if b is not None else None for s, b in zip(spans, batches, strict=True)]
        return {
            f"{self.part}_start": pa.array([s and s[0] for s in ran], pa.float64()),
            f"{self.part}_end": pa.array([s and s[1] for s in ran], pa.float64()),
            f"{self.part}_actor": pa.array([self.name] * len(spans), pa.string()),
        }

    def _fitted(self, run, items: list, failed) -> list[tuple]:
        """(result, images in the model batch it ran in) per item: run(items) in chunks the device's memory holds.
        A chunk that runs out of memory is split in half and retried, and later batches stay at the size that
        fitted; one image that does not fit alone becomes an error row (failed(item, reason), in no batch) that
        names the size, and the job goes on."""
        if self.compiled:  # in this thread too: Ray Data calls an actor on another thread than the one it built it on
            allow_recompiles()
        results, start = [], 0
        while start < len(items):
            chunk = items[start : start + self.fit]
            try:
                results += [(result, len(chunk)) for result in run(chunk)]
                start += len(chunk)
                continue
            except torch.cuda.OutOfMemoryError:
                pass  # handled below, outside the handler: its traceback holds the failed batch's activations
            free_device_memory()
            if len(chunk) == 1:
                r = getattr(chunk[0], "request", chunk[0])  # a Request (Stage C) or a PriorOutput
                reason = f"{self.title}: out of GPU memory for one {r.width}x{r.height} image; use a smaller size"
                results.append((failed(chunk[0], reason), None))
                start += 1
                continue
            self.fit = len(chunk) // 2  # and the same items again, in batches of that size
            print(
                f"warning: {self.title}: a batch of {len(chunk)} ran out of GPU memory; running batches of "
                f"{self.fit} on this actor from now on (set {self.part}_pool.batch_size to {self.fit} or less)",
                file=sys.stderr,
                flush=True,
            )
        return results

    def _groups(self, rows: list[dict]) -> list[list[int]]:
        """Indices of the rows to work on as model batches: grouped by bucket (size, steps, cfg), at most batch_size
        each, in input order."""
        todo = [i for i, row in enumerate(rows) if row["error"] is None]
        requests = requests_of([rows[i] for i in todo])
        return [[todo[j] for j in group] for group in buckets(requests, batch_size=self.batch_size or len(rows) or 1)]


class PriorStage(_Stage):
    """Text encoder + Stage C."""

    part = "prior"
    title = "Stage C"

    def _warm_batch(self, request: Request, batch_size: int) -> None:
        run_prior(self.models, [request] * batch_size)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.select(["error", *REQUEST_FIELDS]).to_pylist()
        n = len(rows)
        latent, pooled, negative = [None] * n, [None] * n, [None] * n
        tokens, truncated, errors = [None] * n, [None] * n, [row["error"] for row in rows]
        seconds, batches, spans = [None] * n, [None] * n, [None] * n
        for group in self._groups(rows):
            start = time.time()
            requests = requests_of([rows[i] for i in group])
            if self.models is not None:
                outputs = self._fitted(
                    lambda chunk: run_prior(self.models, chunk),
                    requests,
                    lambda r, reason: PriorOutput(r, None, None, None, error=reason),
                )
            else:
                outputs = [(out, len(requests)) for out in dry_prior(requests, self.geometry)]
            for i, (out, batch_images) in zip(group, outputs, strict=True):
                tokens[i], truncated[i] = out.prompt_tokens, out.prompt_truncated
                seconds[i] = out.seconds if self.models is not None else None  # (a dry run times nothing: null)
                batches[i] = batch_images
                if out.error is not None:
                    errors[i] = out.error
                    continue
                latent[i] = to_wire(out.latent, self.latent_dtype)
                pooled[i] = to_wire(out.clip_text_pooled, self.latent_dtype)
                negative[i] = to_wire(out.clip_text_pooled_negative, self.latent_dtype)
            span = (start, time.time())  # one model batch: the same interval on each of its rows
            for i in group:
                spans[i] = span
        table = set_columns(
            batch,
            {
                "error": pa.array(errors, pa.string()),
                "latent": pa.array(latent, pa.binary()),
                "clip_pooled": pa.array(pooled, pa.binary()),
                "clip_pooled_negative": pa.array(negative, pa.binary()),
                "prompt_tokens": pa.array(tokens, pa.int64()),
                "prompt_truncated": pa.array(truncated, pa.bool_()),
                "prior_s": pa.array(seconds, pa.float64()),
                "prior_batch": pa.array(batches, pa.int64()),
                **self._batch_columns(spans, batches),
            },
        )
        # What one image costs in the latent queue: its share of this block's Arrow bytes, metadata included.
        return table.append_column("queue_bytes", pa.array([table.nbytes // max(n, 1)] * n, pa.int64()))


class DecoderStage(_Stage):
    """Stage B + Stage A."""

    part = "decoder"
    title = "Stage B/A"

    def _warm_batch(self, request: Request, batch_size: int) -> None:
        shape_c, _ = latent_sizes(request.width, request.height, self.geometry)
        pooled = torch.zeros(1, self.models.stage_b.config.c_clip)
        run_decoder(self.models, [PriorOutput(request, torch.zeros(shape_c), pooled, pooled)] * batch_size)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.select(["error", *REQUEST_FIELDS, *LATENT_COLUMNS, "prompt_tokens", "prompt_truncated"])
        rows = rows.to_pylist()
        n = len(rows)
        pixels, errors, seconds, batches = [None] * n, [row["error"] for row in rows], [None] * n, [None] * n
        spans = [None] * n
        for group in self._groups(rows):
            start = time.time()
            priors = []
            for i in group:
                row = rows[i]
                shape_c, _ = latent_sizes(row["width"], row["height"], self.geometry)
                pooled = from_wire(row["clip_pooled"], self.latent_dtype, (1, -1))
                negative = from_wire(row["clip_pooled_negative"], self.latent_dtype, (1, -1))
                priors.append(
                    PriorOutput(
                        request=request_of(row),
                        latent=from_wire(row["latent"], self.latent_dtype, shape_c),
                        clip_text_pooled=pooled,
                        clip_text_pooled_negative=negative,
                        prompt_tokens=row["prompt_tokens"],
                        prompt_truncated=row["prompt_truncated"],
                    )
                )
            if self.models is not None:
                results = self._fitted(
                    lambda chunk: run_decoder(self.models, chunk),
                    priors,
                    lambda p, reason: Result(p.request, None, reason, p.prompt_truncated, p.prompt_tokens),
                )
            else:
                results = [(result, len(priors)) for result in dry_decoder(priors)]
            for i, (result, batch_images) in zip(group, results, strict=True):
                seconds[i], batches[i] = result.timings.get("decoder_s"), batch_images
                if result.error is not None:
                    errors[i] = result.error
                else:
                    pixels[i] = np.asarray(result.image, dtype=np.uint8).tobytes()
            span = (start, time.time())  # one model batch: the same interval on each of its rows
            for i in group:
                spans[i] = span
        table = batch.drop_columns([c for c in LATENT_COLUMNS if c in batch.column_names])
        return set_columns(
            table,
            {
                "error": pa.array(errors, pa.string()),
                "pixels": pa.array(pixels, pa.binary()),
                "decoder_s": pa.array(seconds, pa.float64()),
                "decoder_batch": pa.array(batches, pa.int64()),
                **self._batch_columns(spans, batches),
            },
        )
