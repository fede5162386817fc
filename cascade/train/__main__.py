"""python -m cascade.train: train the demo family from scratch, a stage at a time or all at once, and evaluate it.

    python -m cascade.train all --out runs/demo            # every stage, two at a time as their inputs are ready
    python -m cascade.train stage-c --out runs/demo        # one stage (its inputs must be trained)
    python -m cascade.train eval --model runs/demo         # the checker's verdict and a contact sheet
    python -m cascade.train lora --model runs/demo --out zorp.safetensors   # teach "[zorp]", a new shape (8 min)

Each stage resumes from its checkpoint when interrupted; a finished stage is skipped by `all`. Exit codes: 0 done,
1 failed, 2 bad arguments, 130 interrupted (Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from ..paths import blocked_by_a_file
from ..signals import sigterm_interrupts
from .demo import STAGES, Recipe, train
from .lora import NEW_SHAPE
from .schedule import StageFailed
from .shapes import UNNAMED_SHAPES


class _WithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default in its help, where it has one (not None, not a flag's False)."""

    def _get_help_string(self, action):
        return action.help if action.default is None or action.default is False else super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    # No flag taken from a prefix of it (argparse's default): `--step 5` would set --steps, say, unasked.
    p = argparse.ArgumentParser(
        prog="python -m cascade.train", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("all", *(s.replace("_", "-") for s in STAGES)):
        what = "every stage not yet trained, as their inputs are ready (--jobs at once)"
        s = sub.add_parser(name, help=what if name == "all" else f"train {name} only", allow_abbrev=False)
        s.add_argument("--out", type=Path, default=Path("runs/demo"), help="the family folder (default runs/demo)")
        s.add_argument("--recipe", type=Path, help="a recipe JSON (as family.json's 'recipe'); default the built-in")
        s.add_argument("--images", type=int, help="training images (default 8000)")
        s.add_argument(
            "--general-images",
            type=int,
            metavar="N",
            help="uncaptioned images in any colour, for Stage A, the semantic encoder and Stage B (default 8000)",
        )
        for stage in STAGES:
            flag = stage.replace("_", "-")
            s.add_argument(f"--{flag}-steps", type=int, metavar="N", help=f"{stage} training steps")
        s.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
        if name == "all":
            s.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), metavar="N",
                           help="stages trained at once, each in its own process on cores/N threads as its inputs "
                           "are ready (default 2 where there are 2 cores or more; 1: one after another)")  # fmt: skip
    defaults = _WithDefaults
    e = sub.add_parser(
        "eval", help="judge a trained family with the independent checker", formatter_class=defaults, allow_abbrev=False
    )
    e.add_argument("--model", default="runs/demo", help="a family folder, or a built-in model (demo)")
    e.add_argument("--out", type=Path, help="where eval.json and the contact sheet go (default MODEL/eval, or "
                   "runs/eval-NAME for a built-in model)")  # fmt: skip
    e.add_argument("--samples", type=int, default=80, help="images per split (held-out, training combinations)")
    for name, kind in (("prior-steps", int), ("prior-cfg", float), ("decoder-steps", int), ("decoder-cfg", float)):
        e.add_argument(f"--{name}", type=kind, help="default: what the family's users get (the CLI's default)")
    e.add_argument("--checker-steps", type=int, default=600, help="checker training steps")
    e.add_argument("--seed", type=int, default=0, help="which prompts and image noise (each seed its own)")
    e.add_argument("--checker-seed", type=int, default=0, help="the judge's training seed (0: the shipped judge)")
    what = 'train a LoRA that teaches "[zorp]" (a new shape) to a family, and measure it'
    lo = sub.add_parser("lora", help=what, formatter_class=defaults, allow_abbrev=False)
    lo.add_argument("--model", default="runs/demo", help="a family folder, or a built-in model")
    lo.add_argument("--out", type=Path, default=Path("runs/zorp.safetensors"), help="the LoRA file to write")
    lo.add_argument("--steps", type=int, default=2000, help="training steps")
    lo.add_argument("--images", type=int, default=512, help="training images of the new shape")
    lo.add_argument(
        "--regular",
        type=int,
        default=256,
        help="images of the family's own shapes and captions mixed in (prior preservation: other prompts move less)",
    )
    lo.add_argument("--shape", choices=UNNAMED_SHAPES, default=NEW_SHAPE, help="what [zorp] names (no caption does)")
    lo.add_argument("--rank", type=int, default=16, help="Stage C's low-rank updates' rank (the reference's 4)")
    lo.add_argument(
        "--decoder-rank",
        type=int,
        default=4,
        help="rank of updates on Stage B's attention too (0: Stage C only, as the reference)",
    )
    lo.add_argument("--batch-size", type=int, default=32, help="images per step")
    lo.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    lo.add_argument("--samples", type=int, default=24, help="prompts per check after training (0: no check)")
    lo.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    return p


def _recipe(args) -> Recipe:
    try:
        text = args.recipe.read_text() if args.recipe else None
    except OSError as e:
        raise ValueError(f"--recipe: cannot read {args.recipe}: {e.strerror or e}") from None
    recipe = Recipe.from_dict(json.loads(text)) if text is not None else Recipe()
    if args.images is not None:
        if args.images < 1:
            raise ValueError(f"--images: {args.images} is not allowed; use 1 or more")
        recipe.images = args.images
    if args.general_images is not None:
        if args.general_images < 0:
            raise ValueError(f"--general-images: {args.general_images} is not allowed; use 0 or more")
        recipe.general_images = args.general_images
    for stage in STAGES:
        steps = getattr(args, f"{stage}_steps")
        if steps is not None:
            if steps < 1:
                raise ValueError(f"--{stage.replace('_', '-')}-steps: {steps} is not allowed; use 1 or more")
            recipe = recipe.with_steps(stage, steps)
    return recipe


def _check_eval(args) -> None:
    """eval's numbers, checked before the family loads."""
    from ..request import MAX_STEPS

    for name in ("samples", "checker_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: {getattr(args, name)} is not allowed; use 1 or more")
    for name in ("prior_steps", "decoder_steps"):
        steps = getattr(args, name)
        if steps is not None and not 1 <= steps <= MAX_STEPS:
            raise ValueError(
                f"--{name.replace('_', '-')}: {steps} is not allowed; use an integer from 1 to {MAX_STEPS}"
            )
    for name in ("prior_cfg", "decoder_cfg"):
        cfg = getattr(args, name)
        if cfg is not None and not 0 <= cfg <= 100:  # (NaN fails too)
            raise ValueError(f"--{name.replace('_', '-')}: {cfg} is not allowed; use a number from 0 to 100")


def _check_out(args) -> None:
    """--out, checked before any work: a folder (a family's, an evaluation's) or a LoRA's .safetensors file."""
    out = args.out
    if out is None:
        return
    blocked = blocked_by_a_file(out)
    if blocked is not None:
        raise ValueError(blocked)
    if args.command != "lora":
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out: {out} is a file; give a folder")
    elif out.is_dir():
        raise ValueError(f"--out: {out} is a folder; give the LoRA's file name, e.g. {out / 'zorp.safetensors'}")
    elif out.suffix != ".safetensors":  # the format it is written in, so that its name says it
        raise ValueError(f"--out: {out.name!r}: a LoRA is written as safetensors; give a name ending in .safetensors")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with sigterm_interrupts():  # `kill`, a scheduler: stop as on Ctrl-C (the stages `all` started stop too)
        return _run(args)


def _run(args) -> int:
    try:
        _check_out(args)
        if args.command == "eval":
            from ..family import BUILTIN_MODELS
            from .evaluate import evaluate

            _check_eval(args)

            default_out = Path(f"runs/eval-{args.model}") if args.model in BUILTIN_MODELS else Path(args.model) / "eval"
            report = evaluate(
                args.model,
                args.out or default_out,
                samples=args.samples,
                prior_steps=args.prior_steps,
                prior_cfg=args.prior_cfg,
                decoder_steps=args.decoder_steps,
                decoder_cfg=args.decoder_cfg,
                checker_steps=args.checker_steps,
                seed=args.seed,
                checker_seed=args.checker_seed,
            )
            print(json.dumps(report["accuracy"], indent=2))
            return 0
        if getattr(args, "no_progress", False):  # logs only: transformers' bars too (loading, saving)
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()
        if args.command == "lora":
            return _lora(args)
        recipe = _recipe(args)
        stages = STAGES if args.command == "all" else (args.command.replace("-", "_"),)
        jobs = getattr(args, "jobs", 1)
        if jobs < 1:
            raise ValueError(f"--jobs: {jobs} is not allowed; use 1 or more")
        log = lambda m: print(m, file=sys.stderr)  # noqa: E731
        train(args.out, recipe, stages, progress=not args.no_progress, log=log, jobs=jobs)
        return 0
    except KeyboardInterrupt:
        if args.command in ("lora", "eval"):  # (no checkpoints: a rerun starts over)
            print("interrupted: this command keeps no checkpoints; run it again to start over", file=sys.stderr)
        else:
            print("interrupted: run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130
    except json.JSONDecodeError as e:  # (a ValueError: first)
        print(f"error: --recipe: not JSON: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:  # bad settings, a missing input, an --out or --recipe of the wrong kind
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StageFailed as e:  # a stage trained in its own process failed (`all --jobs`); it printed its traceback
        print(f"error: {e}", file=sys.stderr)
        return 1


def _lora(args) -> int:
    import time

    import torch

    from ..family import load_family
    from ..request import sampling_defaults
    from .evaluate import check_shapes_family, contact_sheet
    from .loop import RunConfig
    from .lora import lora_report, train_lora, with_regular, word_data

    for name in ("steps", "images", "rank", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: {getattr(args, name)} is not allowed; use 1 or more")
    for name in ("decoder_rank", "regular", "samples"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')}: {getattr(args, name)} is not allowed; use 0 or more")
    if not 0 < args.lr < math.inf:
        raise ValueError(f"--lr: {args.lr} is not allowed; use a finite number above 0")

    check_shapes_family(args.model, "lora")  # before any load

    def load():  # with the semantic encoder: training encodes the images, the report reads Stage C's latents
        return load_family(args.model, dtype=torch.float32, with_effnet=True)

    models = load()
    data = word_data(args.images, models.geometry.default_size, shape=args.shape)
    data = with_regular(data, args.regular, models.geometry.default_size)
    run = RunConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=min(50, args.steps))
    started = time.perf_counter()
    adapter = train_lora(
        models, data, run, rank=args.rank, progress=not args.no_progress, decoder_rank=args.decoder_rank
    )
    adapter.save(args.out)
    print(f"wrote {args.out} ({args.steps} steps, {time.perf_counter() - started:.0f} s)", file=sys.stderr)
    if args.samples:
        report = lora_report(load, args.out, args.samples, sampling_defaults(args.model), args.shape)
        images = report.pop("images")
        contact_sheet(*sheet_cells(images), columns=len(images["before"])).save(args.out.with_suffix(".png"))
        report["seconds"] = round(time.perf_counter() - started, 1)
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))
    return 0


def sheet_cells(images: dict[str, list]) -> tuple[list, list[str]]:
    """The LoRA report's contact sheet: its images row by row, and each one's label (a row holds `--samples` images,
    up to 8)."""
    rows = {"before": "base [zorp]", "after": "LoRA [zorp]"}
    rows |= {"others_before": "base other", "others_after": "LoRA other"}
    cells = [image for row in rows for image in images[row]]
    return cells, [label for row, label in rows.items() for _ in images[row]]


if __name__ == "__main__":
    sys.exit(main())
