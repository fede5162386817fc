"""The batch job: `python -m jobs.generate --prompts PROMPTS --out OUT [--config job.yaml] [flags]`.

    Parquet prompts -> read tasks -> Stage C actor pool -> latent queue -> Stage B/A actor pool -> writer tasks
                                                                                   -> images, manifests, _SUCCESS

Everything runs on Ray Data's streaming executor: the pools are `map_batches` operators with `ActorPoolStrategy`, the
latent queue is the stream of blocks between them, bounded by Ray Data's backpressure. The driver only plans, reads
the stream of manifest rows, writes manifests and reports progress; it holds 8 bytes per image of the input.

Runs on a laptop (a local Ray is started for the job) or on a cluster (`RAY_ADDRESS`, `ray job submit`).

Exit codes: 0 complete (`_SUCCESS` written; rows that failed are in the manifest with their error); 1 incomplete
(no `_SUCCESS`: rerun the same command, less any --overwrite, to resume); 2 bad configuration or input; 3 the model
cannot be loaded; 130 interrupted (Ctrl-C, or SIGTERM as `ray job stop` sends).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import inspect
import math
import os
import platform
import resource
import sys
import threading
import time
from pathlib import Path

from cascade.signals import interrupt_on_sigterm, sigterm_interrupts

EXIT_OK, EXIT_INCOMPLETE, EXIT_INPUT, EXIT_MODEL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130  # 130: Ctrl-C or SIGTERM


def log(message: str) -> None:
    print(f"[generate] {message}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    from .config import Parser, add_arguments

    parser = Parser(
        prog="python -m jobs.generate",
        description="Render every prompt of a Parquet data set with Stable Cascade on a Ray cluster.",
        epilog="Exit codes: 0 complete; 1 incomplete (rerun, without --overwrite, to resume); 2 bad configuration or "
        "input; 3 model not loadable; 130 interrupted (Ctrl-C or SIGTERM). Credentials come from the standard AWS "
        "chain only.",
    )
    add_arguments(parser)
    return parser


def check_model(config):
    """Fail before Ray starts when the weights folder is unusable (the message names the file); return the family's
    geometry."""
    from cascade.family import BUILTIN_MODELS, locate_stage, locate_text_encoder
    from cascade.geometry import family_geometry
    from cascade.request import family_sampling
    from cascade.weights import WeightsError, inspect_stage
    from workers.models import torch_dtype

    geometry = family_geometry(config.model)  # a broken family.json names itself
    family_sampling(config.model)  # (its sampling defaults too)
    if config.lora:
        from cascade.lora import lora_info

        lora_info(config.lora)  # a missing or foreign file names itself (its layers are checked when actors load)
    if config.model in BUILTIN_MODELS:
        return geometry
    folder = Path(config.model)
    if not folder.is_dir():
        where = (
            " here; on a cluster the job's driver (on the head node) reads the weights folder too, to check and hash "
            "it: make it available there at the same path"
            if os.environ.get("RAY_ADDRESS")
            else ""
        )
        near = difflib.get_close_matches(config.model, list(BUILTIN_MODELS), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near and os.sep not in config.model else ""
        raise WeightsError(
            f"model: {config.model!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}) nor a weights "
            f"folder{where}{hint}"
        )
    import torch

    on = ("cuda", "cpu") if config.dtype == "auto" else ("cuda",)  # auto: the actors' device picks the file
    for stage in ("stage_c", "stage_b", "stage_a"):
        for path in {locate_stage(folder, stage, config.lite, torch_dtype(config.dtype, torch.device(d))) for d in on}:
            inspect_stage(path, expect=stage)
    locate_text_encoder(folder)
    return geometry


_own_ray = False  # True once init_ray started a private Ray: its one node is all there will be (no autoscaler)
_machine_cpus = 0  # the CPUs of the machine a private Ray runs on (its slots are more: local_cpus)


# Tasks of the job that hold a CPU while they mostly wait: the one reading a segment (a generator, paused while its
# blocks wait for the Stage C pool) holds its CPU until the pools have taken the segment's last rows, and the cut
# before the Stage B/A pool holds one while blocks keep coming. On a machine of 2 CPUs they held both, the writers
# got none until the segment was read, and rendered images piled up in Ray's object store (docs/RELIABILITY.md).
WAITING_TASK_CPUS = 2


def local_cpus(config, machine: int) -> int:
    """The CPUs a private Ray gets on a machine of `machine` CPUs: the machine's, or, where that is fewer, enough for
    the two waiting tasks, a writer and the pools' actors at once. Ray's CPUs are slots, not cores: the waiting tasks
    use little of one, and the writers then run beside them."""
    actors = sum(p.actors * p.cpus for p in (config.prior_pool, config.decoder_pool))
    return max(machine, math.ceil(WAITING_TASK_CPUS + config.writer_cpus + actors))


def machine_cpus() -> int:
    """The CPUs Ray would take this machine to have (its cgroup's limit included)."""
    try:
        from ray._private.utils import get_num_cpus  # (private; os.cpu_count ignores a container's limit)
    except ImportError:
        return os.cpu_count() or 1
    return int(get_num_cpus())


def init_ray(config):
    global _own_ray, _machine_cpus
    import ray

    if ray.is_initialized():
        return ray
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        # A private local Ray for this job (even if another local cluster runs: set RAY_ADDRESS to use that one),
        # dashboard off.
        _machine_cpus = machine_cpus()
        cpus = local_cpus(config, _machine_cpus)
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=True)
        _own_ray = True
    interrupt_on_sigterm()  # again: ray.init() sets its own SIGTERM handler (a bare sys.exit)
    return ray


def auto_gpus(pools, cluster_gpus: float) -> float:
    """What `gpus: auto` gives each actor of those pools: 0 on a cluster without GPUs; 1 when the GPUs left by the
    pools set explicitly hold every auto actor the pools start with; else those actors share what is left, k to a
    GPU (1/k each), or, where less than one GPU is left, an equal part of it. One GPU and one actor per pool: 0.5
    each, both pools on the one GPU, instead of a Stage B/A actor that waits forever for a second GPU while the
    Stage C actor holds the only one."""
    from .config import gpu_share

    if cluster_gpus <= 0:
        return 0.0
    auto = sum(p.actors for p in pools if p.gpus == "auto")
    left = cluster_gpus - sum(p.actors * p.gpus for p in pools if p.gpus != "auto") + 1e-9
    if auto == 0 or auto <= left:
        return 1.0
    if left >= 1:  # k to a GPU
        return gpu_share(math.ceil(auto / math.floor(left)))
    if left >= 0.01 * auto:  # part of one GPU left (the explicit pools took fractions)
        return math.floor(100 * left / auto) / 100
    return 1.0  # nothing left: the explicit pools took every GPU; the auto actors wait (the job warns)


def pool_args(pool, auto: float) -> dict:
    """Ray's resource arguments for one actor of the pool; auto: what `gpus: auto` is (auto_gpus)."""
    gpus = auto if pool.gpus == "auto" else pool.gpus
    args = {"num_gpus": gpus, "num_cpus": pool.cpus}
    if pool.resources:
        args["resources"] = dict(pool.resources)
    return args


def pool_strategy(pool):
    """A fixed pool of `actors`, or one that Ray Data scales between `actors` and `max_actors` by its queue."""
    import ray

    if pool.autoscales:
        return ray.data.ActorPoolStrategy(min_size=pool.actors, max_size=pool.max_actors)
    return ray.data.ActorPoolStrategy(size=pool.actors)


def pool_size(pool) -> str:
    return f"{pool.actors}-{pool.max_actors}" if pool.autoscales else str(pool.actors)


def actor_needs(pool, auto: float) -> dict[str, float]:
    """What one actor of the pool needs from a node, in Ray's resource names."""
    args = pool_args(pool, auto)
    return {"GPU": args["num_gpus"], "CPU": args["num_cpus"], **args.get("resources", {})}


def versions() -> dict:
    """The versions that made the images, for `_SUCCESS`. Read from the installed metadata where importing would be
    slow: the driver never imports transformers (seconds; and its import resolves a path against the current
    directory, which raised FileNotFoundError at the end of a `ray job submit` job on the two-node test cluster)."""
    from importlib.metadata import PackageNotFoundError, version

    import pyarrow
    import ray
    import torch

    try:
        own = version("cascade-batch")
    except PackageNotFoundError:
        own = "source"
    return {
        "cascade-batch": own,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "ray": ray.__version__,
        "pyarrow": pyarrow.__version__,
    }


MIN_RATE_SPAN_S = 1.0  # the progress line's rate needs images over this long at least


class Progress:
    """A progress line every `every` seconds, whether images arrive or not (a stall shows as lines that do not move
    and say for how long): images done / total, images/s over the last minute, ETA. The rate is counted from the
    first images on, so start-up (Ray, the models loading) does not read as a slow rate and a far ETA. `start`
    begins the lines a stall still gets (a thread), `stop` ends them; `update` counts the images written."""

    def __init__(self, total: int, every: float, clock=time.monotonic):
        self.total, self.every, self.clock = total, every, clock
        self.done = self.errors = 0
        self.created = self.last = self.clock()  # when made, and when the last line was printed
        self.last_images: float | None = None  # when images last arrived
        self.history: list[tuple[float, int]] = []  # (time, done) over the last minute, from the first images on
        self.lock = threading.Lock()
        self._stopped = threading.Event()
        self._ticker: threading.Thread | None = None

    def update(self, done: int, errors: int) -> None:
        with self.lock:
            self.done += done
            self.errors += errors
            now = self.last_images = self.clock()
            self.history.append((now, self.done))
            while len(self.history) > 2 and now - self.history[0][0] > 60:
                self.history.pop(0)
            if now - self.last >= self.every or self.done == self.total:
                self._print(now)

    def tick(self) -> None:
        """A line if none was printed for `every` seconds: the ticker's, while no images arrive."""
        with self.lock:
            now = self.clock()
            if now - self.last >= self.every and self.done < self.total:
                self._print(now)

    def start(self) -> None:
        def run():
            while not self._stopped.wait(min(self.every, 1.0)):
                self.tick()

        self._ticker = threading.Thread(target=run, name="progress", daemon=True)
        self._ticker.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._ticker is not None:
            self._ticker.join()

    def _print(self, now: float) -> None:
        self.last = now
        log(self.line(now))

    def rate(self, now: float | None = None) -> float:
        """Images/s over the last minute, up to `now` (a stall lowers it as it lasts), from the first images on: 0
        until images have come over a second or more (two batches written together would read as hundreds a
        second). Once all are done, the whole run's, start-up included: the last line's rate is the run's."""
        end = self.history[-1][0] if self.history else self.created
        end = end if now is None else max(now, end)
        if self.done == self.total:
            return self.done / (end - self.created) if end > self.created else 0.0
        if len(self.history) < 2:
            return 0.0
        (t0, d0), (_, d1) = self.history[0], self.history[-1]
        return (d1 - d0) / (end - t0) if end - t0 >= MIN_RATE_SPAN_S else 0.0

    def line(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        rate = self.rate(now)
        left = self.total - self.done
        eta = "0m00s" if left == 0 else f"{int(left / rate // 60)}m{int(left / rate % 60):02d}s" if rate > 0 else "?"
        pct = 100 * self.done / self.total if self.total else 100
        line = f"{self.done}/{self.total} images ({pct:.1f}%), {rate:.2f} images/s, ETA {eta}, {self.errors} errors"
        if self.done < self.total and self.last_images is None:
            line += f"; waiting for the first images ({int(now - self.created)}s)"
        elif self.done < self.total and now - self.last_images >= self.every:
            line += f"; none for {int(now - self.last_images)}s"
        return line


class NeverFits(Exception):
    """On the job's own Ray (one machine, no autoscaler) a pool or the writers can never be placed."""


def check_fits_here(needs: dict[str, dict[str, float]]) -> None:
    """On the Ray this job started, refuse at once what the node watch would wait node_wait_seconds for: nothing
    will add a node. (On a cluster, RAY_ADDRESS, an autoscaler may: the watch waits.)"""
    from .placement import describe, live_nodes, short_of, unplaceable

    if not _own_ray:
        return
    # Against the machine's CPUs, not the private Ray's slots: those beyond them are for the tasks that wait
    # (local_cpus), and an actor's cpus are its threads.
    nodes = [{**n, "CPU": min(n.get("CPU", 0.0), _machine_cpus)} for n in live_nodes()]
    missing = unplaceable(needs, nodes)
    has = describe({k: v for k, v in nodes[0].items() if k in ("CPU", "GPU")}) if nodes else "nothing"
    if missing:
        what = " or ".join(f"the {name} (one needs {describe(needs[name])})" for name in missing)
        problem = f"this machine ({has}) can never run {what}"
    elif shortage := short_of(needs, nodes):
        problem = f"this machine cannot run an actor of each pool and a writer at once: {shortage}"
    else:
        return
    raise NeverFits(
        f"{problem}; the job started its own Ray here, which adds no nodes. Lower the pools' gpus, cpus or "
        "resources, or writer_cpus (gpus: auto shares the GPUs there are), or submit the job to a cluster (RAY_ADDRESS)"
    )


class LocalPathError(Exception):
    """Local --prompts or --out whose tasks cannot run on the driver's node (they must: a local path is its disk)."""


def local_path_tasks(config, plan, out, say: bool = False) -> tuple[dict, dict]:
    """Ray's arguments for the read tasks and the writer tasks: a local folder is the disk of the machine the driver
    runs on, so on a cluster of several machines the tasks that read local prompts or write a local --out run there
    (or the images would land on whichever node wrote them). Raises LocalPathError when that node lacks the CPUs
    they need (a head started with 0 CPUs, as Ray advises for big clusters): they could never run. `say`: log where
    they run, on a cluster of several nodes."""
    from workers.storage import LocalStorage

    ray = init_ray(config)
    node_id = ray.get_runtime_context().get_node_id()
    # Every node carries its id as a label. (A scheduling_strategy would do the same, but Ray Data takes it only
    # in the ray_remote_args it deprecates, due to go in Ray 2.64.)
    here = {"label_selector": {"ray.io/node-id": node_id}}
    read_args = here if any(isinstance(s.storage, LocalStorage) for s in plan.sources) else {}
    write_args = here if isinstance(out, LocalStorage) else {}
    tasks = (("read the prompts", read_args, 1), ("write the images", write_args, config.writer_cpus))
    pinned = " and ".join(what for what, args, _ in tasks if args)
    if not pinned:
        return read_args, write_args
    nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n.get("Alive")}
    need = max(cpus for _, args, cpus in tasks if args)  # a read task takes 1 CPU, Ray Data's default
    have = nodes.get(node_id, {}).get("CPU", 0)
    if need > have:
        raise LocalPathError(
            f"local paths: the tasks that {pinned} must run on the driver's node, which has {have:g} CPUs; they need "
            f"{need:g} (writer_cpus for the writers, 1 for a read): use s3:// paths, lower writer_cpus, or run the "
            "driver on a node with CPUs"
        )
    if say and len(nodes) > 1:
        log(
            f"local paths on a cluster of {len(nodes)} nodes: the tasks that {pinned} run on this node, "
            "the driver's (s3:// spreads them over the cluster)"
        )
    return read_args, write_args


def run(config) -> int:
    from cascade.weights import WeightsError
    from workers.storage import StorageError, StorageRefused, open_storage

    from . import inputs, lease, manifest

    started = time.time()
    made_by = versions()  # at the start: nothing at the end of a long job should depend on the environment
    try:
        plan = inputs.plan(config)
    except inputs.InputError as e:
        log(f"error: {e}")
        return EXIT_INPUT
    except StorageRefused as e:  # (one found past the listing, as the ids are read)
        log(f"error: prompts: {e}: {REFUSED_HINT}")
        return EXIT_INPUT
    except StorageError as e:  # the prompts' storage failed past its retries: an outage, which a rerun may not meet
        log(f"error: prompts: {e}")
        log("nothing in the output was changed: rerun the same command when the storage answers again")
        return EXIT_INCOMPLETE
    try:
        geometry = check_model(config)
    except WeightsError as e:
        log(f"error: {e}")
        return EXIT_MODEL
    log(f"{plan.rows} prompts in {len(plan.sources)} file(s): {plan.images} images")

    out = open_storage(config.out, config.storage_attempts)
    if config.overwrite:  # a job refused for its local paths must not have deleted the output first
        try:
            local_path_tasks(config, plan, out)
        except LocalPathError as e:
            log(f"error: {e}")
            return EXIT_INPUT
    run_id = manifest.new_run_id()
    try:  # before anything in the output changes: one run at a time per output
        # A read first: some S3-compatible servers (SeaweedFS) create a missing bucket on a write, where it must be
        # refused as a configuration error.
        manifest.manifest_keys(out)
        held = lease.take(out, run_id, log)
    except lease.LeaseHeld as e:
        log(f"error: --out: {e}")
        return EXIT_INPUT
    except StorageError as e:
        return stopped_before_work(e, config)
    with held:
        return render(config, plan, geometry, out, held, started, made_by)


def stopped_before_work(e, config) -> int:
    """Say why the output's storage stopped the job before any work, and its exit code: a refusal (a missing bucket,
    credentials) is a configuration error, which a rerun as it is would meet again; anything else, how to resume."""
    from workers.storage import StorageRefused

    if isinstance(e, StorageRefused):
        log(f"error: --out: {e}: {REFUSED_HINT}")
        return EXIT_INPUT
    log(f"error: {e}")
    log(resume_hint(config))
    return EXIT_INCOMPLETE


def render(config, plan, geometry, out, held, started: float, made_by: dict) -> int:
    """The run, once it holds the output's lease (`held`): resume planning, the stream, the manifests and _SUCCESS.
    Each manifest part, the report and _SUCCESS are written only after `held.check()` finds the lease still this
    run's."""
    from workers.storage import StorageError

    from . import heap, inputs, manifest
    from .lease import LeaseLost

    run_id = held.body["run_id"]

    try:
        if config.overwrite:
            log(f"--overwrite: removed {manifest.clear_outputs(out)} earlier output files")
        previous = manifest.previous_work(out, plan.image_hashes, config.retry_errors, config.verify)
        changed = inputs.changed_positions(plan, previous.inputs)
        if changed:  # before anything changes: a resume would take other prompts' images as theirs
            log(
                f"error: prompts: {', '.join(changed)} changed since earlier runs wrote this output, and its rows "
                "have no id column: a row's id is its position, so the prompts now at positions those runs rendered "
                "would be taken as done, with other prompts' images. Give the rows an id column, or rerun with "
                "--overwrite (or write to another --out)"
            )
            return EXIT_INPUT
        # Order matters for a crash in between: first _SUCCESS (the output is about to change: it is not complete
        # until we say so) and the report of the run it described, then bad objects, then the rows that point at them.
        if len(previous.done) < plan.images:
            manifest.remove_marks(out)
        if previous.stale_keys:
            out.delete(previous.stale_keys)
            log(
                f"removed {len(previous.stale_keys)} stored objects that no manifest row names (a stopped run's, "
                "stored after its last manifest part) or whose bytes changed: their images are rendered again"
            )
        manifest.drop_rows(out, previous.drop)
        heap.trim()  # the planning's listing and rows, freed, go back to the system before the models load
    except inputs.InputError as e:  # a file without ids read again for its digest, refused or gone meanwhile
        log(f"error: {e}")
        return EXIT_INPUT
    except StorageError as e:
        return stopped_before_work(e, config)
    todo = plan.images - len(previous.done)
    if len(previous.done):
        log(
            f"resuming: {previous.ok} images done and {previous.errors} errors recorded by earlier runs; "
            f"{previous.missing} recorded images missing from storage (or changed) will be rendered again"
        )
    if previous.repeated:
        log(
            f"warning: removed {previous.repeated} manifest rows that were an image's second row, one row kept per "
            "image: two runs wrote this output at once? Run one job per output (they would render each image twice)"
        )
    changes = manifest.settings_changes(previous.settings, config.image_settings())
    if changes:
        log(
            f"warning: images kept from earlier runs were made with other settings: {'; '.join(changes)}. They stay "
            "as they are, so the output mixes settings; to render every image with this run's, rerun with "
            "--overwrite (or write to another --out)"
        )
    if todo == 0 and out.exists(manifest.SUCCESS):
        log(f"nothing to do: {out.location()} is complete (its _SUCCESS and report stay as they are)")
        return EXIT_OK

    if config.dry_run:
        log("dry run: no model maths; zero latents and grey images of the requested sizes")
    writer = manifest.ManifestWriter(
        out,
        run_id,
        config.manifest_rows,
        config.manifest_seconds,
        settings=config.image_settings(),
        inputs={s.name: [plan.positional[s.name], s.rows] for s in plan.sources if s.name in plan.positional},
        guard=held.check,
    )
    progress = Progress(todo, config.progress_seconds)
    queue_bytes, digest, actor_gpus = 0, None, None
    if todo:
        try:
            queue_bytes, digest, actor_gpus = stream(config, plan, previous, out, writer, progress, geometry)
        except KeyboardInterrupt:
            writer.flush()
            log(f"interrupted: {resume_hint(config)}")
            return EXIT_INTERRUPTED
        except (LocalPathError, NeverFits) as e:  # before any work
            log(f"error: {e}")
            return EXIT_INPUT
        except Exception as e:  # Ray, storage: keep what is done, say how to go on
            with contextlib.suppress(Exception):  # storage may be what failed
                writer.flush()
            if isinstance(e, LeaseLost):  # another run writes the output now: no "rerun" (it is running)
                log(f"error: {e}")
                return EXIT_INCOMPLETE
            unusable = model_failure(e)
            if unusable is not None:  # a rerun would fail the same way: exit 3, as when the driver's check finds it
                log(f"error: the model cannot be loaded on a node: {unusable}")
                return EXIT_MODEL
            refused = setting_failure(e)
            if refused is not None:  # a setting this cluster's devices cannot run: exit 2, as a setting refused earlier
                log(f"error: {refused}")
                return EXIT_INPUT
            damaged = raised(e, inputs.InputError)
            if damaged is not None:  # a damaged input file, found as it is read: so would a rerun be, until replaced
                log(f"error: {damaged}; the images stored so far are kept: after that, rerun the same command")
                return EXIT_INPUT
            log(f"error: the job stopped: {failure(e)}")
            log(resume_hint(config))
            return EXIT_INCOMPLETE
    writer.flush(everything=True)  # the stream has ended: every shard's rows are in
    finished = time.time()

    rendered = progress.done  # this run's manifest rows: the images it made and its error rows
    made = rendered - progress.errors
    accounted = len(previous.done) + rendered
    if accounted != plan.images:
        log(f"incomplete: {accounted} of {plan.images} images accounted for; no _SUCCESS written")
        log(resume_hint(config))
        return EXIT_INCOMPLETE
    from .report import write_report

    ok = previous.ok + rendered - progress.errors
    summary = {
        "complete": True,
        "images": plan.images,
        "prompts": plan.rows,
        "ok": ok,
        "errors": plan.images - ok,
        "rendered_this_run": rendered,
        "errors_this_run": progress.errors,
        "resumed": len(previous.done),
        "run_id": run_id,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(finished)),
        "wall_s": round(finished - started, 3),
        "images_per_s": round(made / (finished - started), 4),  # images made (error rows are no work done)
        "latent_queue_bytes_per_image": round(queue_bytes / rendered, 1) if rendered else None,
        "driver_max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "actor_gpus": actor_gpus,  # per actor of each pool, as run (gpus: auto resolved); None if nothing rendered
        "model": model_label(config),  # as the manifests and the images name it (the LoRA too)
        "model_digest": digest or earlier_digests(out),
        "manifests": writer.parts,
        "versions": made_by,
        "config": config.public(),
    }
    held.check()  # (LeaseLost: another run writes the output now) before the report and _SUCCESS
    if config.report:
        # A run that only finished the bookkeeping (e.g. after a crash just before _SUCCESS) reports on all runs.
        write_report(out, run_id if rendered else None, summary)
        held.check()  # (again: a report of a large output takes a while)
    manifest.write_success(out, summary)
    log(
        f"done: {ok} images ok, {plan.images - ok} errors; this run made {made} and met {progress.errors} errors in "
        f"{finished - started:.1f} s -> {out.location()}"
    )
    return EXIT_OK


def raised(e: BaseException, kind: type) -> str | None:
    """The message of the `kind` error behind `e`: e itself, or one an actor or task raised. Ray Data wraps a task's
    error in a UserCodeException and the chain does not survive pickling, so it is found by its type's full name in
    the text of Ray's report. None when there is none."""
    import re

    # Ray's error can also be an instance of `kind` (a RayTaskError subclasses the task's error) whose text is the
    # whole report: the line that names the error first.
    found = re.findall(rf"^{kind.__module__}\.{kind.__name__}: (.+)$", str(e), flags=re.MULTILINE)
    if found:
        return found[-1]
    return str(e) if isinstance(e, kind) else None


REFUSED_HINT = "the storage refused it; check the bucket, the endpoint, the region and the credentials"


def failure(e: BaseException) -> str:
    """One clear line for a storage failure, wherever it happened; Ray's full report for anything else."""
    from workers.storage import StorageError, StorageRefused

    message = raised(e, StorageRefused)
    if message is not None:  # not retried: no outage, a setting to fix (credentials can expire during a long job)
        return f"{message}: {REFUSED_HINT}"
    message = raised(e, StorageError)
    if message is not None:
        return f"{message} (after the retries set by storage_attempts)"
    return f"{type(e).__name__}: {e}"


def model_failure(e: BaseException) -> str | None:
    """The message of a WeightsError an actor raised while loading its models (a weights file that reads on the
    driver's check but not in full on a node, a LoRA missing on a GPU node); None for anything else."""
    from cascade.errors import WeightsError

    return raised(e, WeightsError)


def setting_failure(e: BaseException) -> str | None:
    """The message of a SettingRefused an actor raised as it started (fp8 on a GPU without float8 products); None
    for anything else."""
    from workers.stages import SettingRefused

    return raised(e, SettingRefused)


def usual_request(config):
    """The request of a row that sets nothing itself: the job's default size, guidance and sampler. The actors warm
    up on it (workers.stages), so the bucket most rows share is the one ready first."""
    from cascade.request import Request

    return Request(
        "warm-up",
        negative_prompt=config.negative_prompt,
        width=config.width,
        height=config.height,
        prior_steps=config.prior_steps,
        prior_cfg=config.prior_cfg,
        decoder_steps=config.decoder_steps,
        decoder_cfg=config.decoder_cfg,
        sampler=config.sampler,
    )


# Ray Data spends CPU on every block it moves (about 35 ms between the driver, Ray's processes and the workers on a
# 2-core machine: scripts/ray_data_floor.py), as much as a small model's image. A pool's blocks carry this many images
# at least, as whole model batches, so that small batches do not pay it per batch.
MIN_BLOCK_ROWS = 4


def block_rows(batch_size: int) -> int:
    """Rows per block for a pool of this batch size: whole batches, at least MIN_BLOCK_ROWS."""
    return batch_size * -(-MIN_BLOCK_ROWS // batch_size)


def model_label(config) -> str:
    """What the images' embedded parameters and the manifests' `model` column name: the model, and the LoRA merged
    into it (as `python -m cascade` writes it: demo+zorp.safetensors); the digest pins the exact files."""
    if config.dry_run:
        return "dry-run"
    return config.model + (f"+{Path(config.lora).name}" if config.lora else "")


def job_digest(config, prior_gpus: float, decoder_gpus: float) -> str:
    """The manifests' model_digest: the files the pools' actors load, given the GPUs each gets (with dtype auto, a
    folder holding both fp32 and bf16 files is read in bf16 on a GPU and in fp32 on a CPU)."""
    from workers.models import model_digest, pool_dtype

    if config.dry_run:
        return "dry-run"
    dtypes = pool_dtype(config.dtype, prior_gpus), pool_dtype(config.dtype, decoder_gpus)
    return model_digest(
        config.model, config.lite, dtypes[0], lambda p: log(f"hashing {p.name}"), config.lora, decoder_dtype=dtypes[1]
    )


def resume_hint(config) -> str:
    """How to go on after a run that did not finish: the same command, less --overwrite (which would start over)."""
    if config.overwrite:
        return "to resume, rerun the same command without --overwrite (with it, the rerun starts over)"
    return "rerun the same command to resume: finished images are kept"


def earlier_digests(out) -> str | None:
    """The weights digests the manifests record (a run that rendered nothing itself reports what made the images)."""
    from .manifest import read_manifests

    table = read_manifests(out, ["model_digest"])
    found = sorted({d for d in table.column("model_digest").to_pylist() if d}) if table is not None else []
    return ", ".join(found) or None


def no_progress_timeout(node_wait_seconds: float, ray_default: float) -> float:
    """Ray Data's own limit on an execution that moves no block (-1: none). Ray's default (30 minutes) would end a job
    that the node watch lets wait: none with node_wait_seconds 0 ("wait forever" for nodes), and otherwise well past
    the watch's own limit, so that the watch, which names the pool and the resources, is what stops a stalled job."""
    if node_wait_seconds == 0:
        return -1
    return max(ray_default, node_wait_seconds + NO_PROGRESS_MARGIN_S)


NO_PROGRESS_MARGIN_S = 1800  # beyond node_wait_seconds: a model load and a first batch on a slow node


def stream(config, plan, previous, out, writer, progress, geometry) -> tuple[int, str, dict]:
    """Build the Ray Data pipeline and consume its manifest rows as they arrive; return the latent queue's bytes, the
    weights digest written in the manifests and the GPUs each pool's actors had (`gpus: auto` resolved)."""
    init_ray(config)
    import ray
    import ray.data

    from workers.stages import DecoderStage, PriorStage
    from workers.writer import write_images, write_shard

    from . import heap
    from .inputs import pending_images, read_fragments, segments
    from .placement import NodeWatch, PlacementError

    ctx = ray.data.DataContext.get_current()
    # Small blocks keep the two pools streaming at the same time (an actor stage emits one block per input block).
    ctx.target_max_block_size = 1 << 20
    ctx.enable_progress_bars = False  # the job prints its own progress line, in images
    ctx.print_on_execution_start = False
    from ray.data.context import DEFAULT_EXECUTION_NO_PROGRESS_TIMEOUT_S as RAY_DEFAULT

    ctx.execution_no_progress_timeout_s = no_progress_timeout(config.node_wait_seconds, RAY_DEFAULT)
    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    model_args = {"model": config.model, "lite": config.lite, "dtype": config.dtype, "lora": config.lora}
    model_args["latent_dtype"] = config.latent_dtype
    model_args["dry_run"] = config.dry_run
    model_args["compile"] = config.compile
    model_args["fp8"] = config.fp8  # (the Stage B/A actors leave Stage B as it is: workers.stages)
    model_args["geometry"] = geometry
    model_args["warm_up"] = usual_request(config)
    prior, decoder = config.prior_pool, config.decoder_pool
    auto = auto_gpus((prior, decoder), cluster_gpus)
    log(
        f"pools: Stage C {pool_size(prior)} x {pool_args(prior, auto)}, "
        f"Stage B/A {pool_size(decoder)} x {pool_args(decoder, auto)}; cluster GPUs: {cluster_gpus:g}"
    )
    if 0 < auto < 1:
        log(
            f"the cluster has {cluster_gpus:g} GPUs now, fewer than the actors with gpus auto: they share them, "
            f"{auto:g} each (set the pools' gpus to 1 to wait for an autoscaler to add GPU nodes instead; "
            "max_actors grows a pool onto GPUs added later)"
        )
    gpus = [pool_args(p, auto)["num_gpus"] for p in (prior, decoder)]  # per actor
    wanted = prior.actors * gpus[0] + decoder.actors * gpus[1]
    digest = job_digest(config, *gpus)
    needs = {name: actor_needs(pool, auto) for name, pool in (("Stage C pool", prior), ("Stage B/A pool", decoder))}
    # The writers run beside the actors, so their CPUs count with the actors': more than a node holds, or more
    # than the actors leave, and the stream stops at its last stage.
    needs["writer tasks"] = {"CPU": config.writer_cpus}
    check_fits_here(needs)
    if wanted > cluster_gpus:
        later = "start with those that fit" if _own_ray else "wait until an autoscaler adds GPU nodes"
        log(f"warning: the pools ask for {wanted:g} GPUs and the cluster has {cluster_gpus:g} now; actors {later}")

    read_args, write_args = local_path_tasks(config, plan, out, say=True)

    def pipeline(items: list[dict]):
        """One segment's Ray Data pipeline: read -> Stage C pool -> Stage B/A pool -> writers."""
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(
            read_fragments,
            batch_size=1,
            batch_format="pyarrow",
            **read_args,
            fn_kwargs={
                "sources": plan.sources,
                "config": config,
                "extra": plan.extra,
                "done": previous.done,
                "geometry": geometry,
            },
        )
        for stage, pool in ((PriorStage, prior), (DecoderStage, decoder)):
            # Small blocks: an actor emits one block per input block, so a block of many batches would hold the next
            # pool back until all of them are done, and the pools would take turns instead of overlapping.
            rows = block_rows(pool.batch_size)
            ds = ds.repartition(target_num_rows_per_block=rows)
            ds = ds.map_batches(
                stage,
                fn_constructor_kwargs={**model_args, "batch_size": pool.batch_size},
                compute=pool_strategy(pool),
                batch_size=rows,
                batch_format="pyarrow",
                **pool_args(pool, auto),
            )
        webdataset = config.layout == "webdataset"
        if webdataset:
            # Blocks of exactly shard_size rows: map_batches gathers whole blocks up to its batch size, and each
            # gathering's rest became a shard of its own (300 images at shard_size 10 made 25 shards of 10 and 25
            # of 2). `strict` (Ray 2.60; not in every release the project takes) is what makes them exact.
            exact = {"strict": True} if "strict" in inspect.signature(ds.repartition).parameters else {}
            ds = ds.repartition(target_num_rows_per_block=config.shard_size, **exact)
        return ds.map_batches(
            write_shard if webdataset else write_images,
            batch_size=config.shard_size if webdataset else block_rows(decoder.batch_size),
            batch_format="pyarrow",
            num_cpus=config.writer_cpus,
            **write_args,
            fn_kwargs={
                "storage": out,
                "image_format": config.image_format,
                "quality": config.quality,
                "model": model_label(config),
                "digest": digest,
                "overwrite": config.overwrite,
            },
        )

    queue_bytes = 0
    watch = None
    if config.node_wait_seconds > 0:
        watch = NodeWatch(needs, config.node_wait_seconds, log)
        watch.start()
    # One Ray Data execution per segment of the input: the executor's state grows with the blocks it has moved
    # (driver memory measured in docs/RELIABILITY.md), and a new execution starts from a fresh one.
    parts = segments(plan.sources, config.segment_rows)
    progress.start()  # lines while no images arrive too (the actors loading, a stall)
    try:
        for number, items in enumerate(parts, 1):
            heap.trim()  # what the last segment's execution freed (jobs/heap.py)
            if len(parts) > 1:  # (one segment holds all the work left: no need to read its ids again)
                todo = pending_images(plan.sources, items, config.num_images, previous.done)
                if todo == 0:
                    continue
                log(f"segment {number}/{len(parts)}: {todo} images")
            for batch in pipeline(items).iter_batches(batch_size=None, batch_format="pyarrow"):
                if "queue_bytes" in batch.column_names:
                    queue_bytes += sum(v or 0 for v in batch.column("queue_bytes").to_pylist())
                writer.add(batch)
                errors = sum(1 for s in batch.column("status").to_pylist() if s != "ok")
                progress.update(batch.num_rows, errors)
    except KeyboardInterrupt:
        if watch is not None and watch.reason:
            raise PlacementError(watch.reason) from None
        raise
    finally:
        progress.stop()
        if watch is not None:
            watch.stop()
    return queue_bytes, digest, {"prior_pool": gpus[0], "decoder_pool": gpus[1]}


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError, resolve

    args = build_parser().parse_args(argv)
    try:
        config = resolve(args)
    except ConfigError as e:
        log(f"error: {e}")
        return EXIT_INPUT
    from workers.storage import StorageError

    from .lease import LeaseLost

    # SIGTERM (`ray job stop`, a scheduler) stops the job as Ctrl-C does: it writes the manifest rows it holds, says
    # how to resume and exits 130, instead of dying at once (a rerun would render those rows' images again). Set
    # again after ray.init(), which sets its own (init_ray).
    try:
        with sigterm_interrupts():
            return run(config)
    except KeyboardInterrupt:
        log(f"interrupted: {resume_hint(config)}")
        return EXIT_INTERRUPTED
    except LeaseLost as e:  # another run writes the output now: no "rerun" (it is running)
        log(f"error: {e}")
        return EXIT_INCOMPLETE
    except StorageError as e:  # the output's bookkeeping (manifests, report, _SUCCESS): the work done is kept
        log(f"error: {failure(e)}")
        log(resume_hint(config))
        return EXIT_INCOMPLETE


if __name__ == "__main__":
    sys.exit(main())
