"""Pool balancing from measured stage times: how to split a cluster's GPUs between the Stage C pool and the
Stage B/A pool so that neither waits for the other.

A finished (or partial) run's manifests record, per image, the seconds its Stage C actor and its Stage B/A actor
spent on it (`prior_s`, `decoder_s`: a batch's time over its images). A pool of n actors renders n / t images per
second, so the split of G GPUs that maximises the job's rate, min(n_C / t_C, n_B / t_B) with n_C + n_B = G, is about
G t_C / (t_C + t_B) for Stage C. With one GPU both pools share it (fractional GPUs, in the same proportion); with a
few GPUs whose whole split leaves one pool idle, several actors share each GPU (`split`).

On a cluster whose node types each serve one pool (cluster.yaml: `stage_c_gpu` and `stage_b_gpu` nodes), GPUs come
in whole nodes: `--node-gpus N` splits the nodes instead (`split_nodes`), one actor per GPU.

    python -m jobs.balance --run s3://bucket/renders/run-1 --gpus 8     # prints the pool settings to use
    python -m jobs.balance --run s3://bucket/renders/run-1 --gpus 24 --node-gpus 8   # 3 nodes of 8 GPUs
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass

import pyarrow.compute as pc

from .config import gpu_share


@dataclass(frozen=True)
class Split:
    prior_actors: int
    decoder_actors: int
    prior_gpus: float  # per actor
    decoder_gpus: float
    images_per_s: float  # the job's expected rate: the slower pool's
    nodes: tuple[int, int, int] | None = None  # split_nodes: (Stage C nodes, Stage B/A nodes, GPUs per node)

    def yaml(self) -> str:
        """The pools' actors and GPUs, to merge into a job's settings (its batch sizes and resources stay)."""
        text = ""
        if self.nodes is not None:
            prior, decoder, per_node = self.nodes
            text = (
                f"# nodes: {prior} for the Stage C pool and {decoder} for the Stage B/A pool, {per_node} GPUs each "
                "(in cluster.yaml: the node types' min_workers, their max_workers at least as many, and the "
                f"top-level max_workers at least {prior + decoder})\n"
            )
        packed = min(self.prior_gpus, self.decoder_gpus) < 1
        text += (
            "# merge into your job's prior_pool / decoder_pool (keep their batch_size"
            + (")\n" if packed else " and resources)\n")
            + f"prior_pool:\n  actors: {self.prior_actors}\n  gpus: {self.prior_gpus:g}\n"
            f"decoder_pool:\n  actors: {self.decoder_actors}\n  gpus: {self.decoder_gpus:g}\n"
        )
        if packed:
            text += (
                "# packed: a pool pinned to a node type by a custom resource counted per GPU (cluster.yaml's\n"
                "# {stage_c: 8} on 8 GPUs) must ask for the same share of it per actor as of a GPU, e.g.\n"
                f"# resources: {{stage_c: {self.prior_gpus:g}}} and {{stage_b: {self.decoder_gpus:g}}}, or the packed "
                "actors do not fit\n"
            )
        return text


PACKING_GAIN = 1.05  # packing more actors per GPU must promise at least 5 % more throughput to be chosen


def _whole_split(slots: int, prior_s: float, decoder_s: float) -> tuple[int, float]:
    """The Stage C share of `slots` equal GPU slots (the rest to Stage B/A) and its rate, in slot-seconds."""
    best = max(range(1, slots), key=lambda n: min(n / prior_s, (slots - n) / decoder_s))
    return best, min(best / prior_s, (slots - best) / decoder_s)


def split(gpus: int, prior_s: float, decoder_s: float, max_per_gpu: int = 4) -> Split:
    """The split of `gpus` GPUs (1 or more) for measured per-image seconds on one actor of each pool (alone on a GPU).

    Whole GPUs per actor when that is within 5 % of the best; otherwise k actors per GPU (`gpus: 1/k`, k up to
    `max_per_gpu`), which splits the GPUs in finer steps: 2 GPUs for a Stage C that takes half Stage B/A's time
    are 1 + 1 whole (the Stage C GPU idles half the time), or 2 + 4 actors at a third of a GPU each (both busy).
    A GPU shared by k busy actors is taken to give each 1/k of its rate (time slicing; kernels of one process at a
    time), so packing pays by balance here, not by overlap; each packed actor holds its own copy of its stage's
    weights, which `max_per_gpu` bounds."""
    if gpus < 1 or prior_s <= 0 or decoder_s <= 0 or max_per_gpu < 1:
        raise ValueError(
            f"gpus {gpus}, prior_s {prior_s}, decoder_s {decoder_s}, max_per_gpu {max_per_gpu}: "
            "all must be positive (gpus and max_per_gpu >= 1)"
        )
    if gpus == 1:
        # Both pools on the one GPU: each gets the share of it that its work takes, and the GPU's rate is shared.
        share = round(prior_s / (prior_s + decoder_s), 2)
        share = min(max(share, 0.05), 0.95)
        return Split(1, 1, share, round(1 - share, 2), 1 / (prior_s + decoder_s))
    plan = None
    for k in range(1, max_per_gpu + 1):
        n, rate = _whole_split(gpus * k, prior_s * k, decoder_s * k)
        if plan is None or rate >= plan.images_per_s * PACKING_GAIN:
            plan = Split(n, gpus * k - n, gpu_share(k), gpu_share(k), rate)
    return plan


def split_nodes(gpus: int, node_gpus: int, prior_s: float, decoder_s: float) -> Split:
    """The split of `gpus` GPUs in nodes of `node_gpus`, each node serving one pool (a node type per pool, pinned by
    a custom resource): the Stage C share of the nodes that maximises the slower pool's rate, one actor per GPU.
    Packing does not help here: a pool's nodes are its own whatever their actors' shares."""
    if prior_s <= 0 or decoder_s <= 0:
        raise ValueError(f"prior_s {prior_s}, decoder_s {decoder_s}: both must be positive")
    if node_gpus < 1 or gpus % node_gpus or gpus < 2 * node_gpus:
        raise ValueError(
            f"gpus {gpus}, node_gpus {node_gpus}: the GPUs must be whole nodes, at least one per pool "
            f"(a multiple of {node_gpus}, from {2 * node_gpus})"
        )
    nodes = gpus // node_gpus
    prior_nodes, rate = _whole_split(nodes, prior_s / node_gpus, decoder_s / node_gpus)
    decoder_nodes = nodes - prior_nodes
    return Split(
        prior_nodes * node_gpus, decoder_nodes * node_gpus, 1.0, 1.0, rate, (prior_nodes, decoder_nodes, node_gpus)
    )


def measured_seconds(table) -> tuple[float, float]:
    """The median per-image seconds of each pool's actors over a run's ok rows (manifest columns prior_s, decoder_s)."""
    if not {"status", "prior_s", "decoder_s"} <= set(table.column_names):
        raise ValueError("the run's manifests hold no stage timings (prior_s, decoder_s)")
    ok = table.filter(pc.equal(table.column("status"), "ok"))
    if ok.num_rows == 0:
        raise ValueError("the run has no rendered images to measure")
    prior = [v for v in ok.column("prior_s").to_pylist() if v is not None]
    decoder = [v for v in ok.column("decoder_s").to_pylist() if v is not None]
    if not prior or not decoder:
        raise ValueError("the run's manifests hold no stage timings (prior_s, decoder_s): a dry run records none")
    return statistics.median(prior), statistics.median(decoder)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.balance", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--run", required=True, help="a run's output (local folder or s3:// prefix) with its manifests")
    p.add_argument("--gpus", type=int, required=True, help="the GPUs the pools will share")
    p.add_argument(
        "--max-per-gpu",
        type=int,
        default=4,
        help="at most this many actors on one GPU when packing them balances the pools better (default 4; 1: whole "
        "GPUs only)",
    )
    p.add_argument(
        "--node-gpus",
        type=int,
        metavar="N",
        help="GPUs per node, where each node type serves one pool (cluster.yaml): split whole nodes, --gpus of them "
        "in all, one actor per GPU (--max-per-gpu does not apply)",
    )
    args = p.parse_args(argv)
    for name in ("gpus", "max_per_gpu", "node_gpus"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')}: {value} is not allowed; use 1 or more")
    if args.node_gpus is not None and (args.gpus % args.node_gpus or args.gpus < 2 * args.node_gpus):
        p.error(
            f"--gpus: {args.gpus} is not allowed with --node-gpus {args.node_gpus}: give whole nodes, at least one "
            f"per pool (a multiple of {args.node_gpus}, from {2 * args.node_gpus})"
        )
    from jobs.manifest import read_manifests, read_success
    from workers.storage import StorageError, open_storage

    try:
        storage = open_storage(args.run)
        table = read_manifests(storage, ["status", "prior_s", "decoder_s"])
        if table is None:
            raise ValueError(f"{args.run}: no manifests found")
        prior_s, decoder_s = measured_seconds(table)
        if args.node_gpus is None:
            plan = split(args.gpus, prior_s, decoder_s, args.max_per_gpu)
        else:
            plan = split_nodes(args.gpus, args.node_gpus, prior_s, decoder_s)
    except (ValueError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"# measured per image on one actor: Stage C {prior_s:.3g} s, Stage B/A {decoder_s:.3g} s "
        f"({table.num_rows} manifest rows); expected {plan.images_per_s:.3g} images/s on {args.gpus} "
        + ("GPUs" if args.gpus > 1 else "GPU")
    )
    summary = read_success(storage)
    if summary is not None and summary.get("actor_gpus") and not any(summary["actor_gpus"].values()):
        print("# note: the last run on this output had no GPU (a CPU run): these are CPU times, not a GPU's")
    shared, maybe = shared_pools(summary)
    if shared:
        print(
            f"# note: in the last run on this output {shared} shared GPUs"
            + (" (or may have: gpus auto, on fewer GPUs than actors)" if maybe else "")
            + ", so its times read slower than one actor alone; measure a run with gpus: 1 per actor"
        )
    print(plan.yaml(), end="")
    return 0


def shared_pools(summary: dict | None) -> tuple[str, bool]:
    """The pools of the last run on an output (the one that wrote its _SUCCESS; the manifests' timings are every
    run's) whose actors had part of a GPU each ('' if none), and whether that is a guess. From the GPUs its actors
    had, which the summary records since 2026-11-29; for earlier runs, from its settings, where `gpus: auto` may or
    may not have shared."""
    names = {"prior_pool": "the Stage C pool", "decoder_pool": "the Stage B/A pool"}
    summary = summary or {}
    if "actor_gpus" in summary:  # (null where the run rendered nothing, e.g. only wrote _SUCCESS: no pool ran)
        had = summary["actor_gpus"] or {}
        return " and ".join(title for key, title in names.items() if 0 < had.get(key, 1) < 1), False
    config = summary.get("config", {})
    gpus = {key: config.get(key, {}).get("gpus", 1) for key in names}
    shared = [title for key, title in names.items() if gpus[key] == "auto" or 0 < gpus[key] < 1]
    return " and ".join(shared), "auto" in gpus.values()


if __name__ == "__main__":
    sys.exit(main())
