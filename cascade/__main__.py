"""Generate images on one machine: `python -m cascade "a prompt" --weights DIR --out out.png --seed 7`.

Each image is written as soon as it is made. Exit codes: 0 every image written; 1 an image failed (e.g. NaN/Inf) or
could not be written (reported on stderr); 2 bad arguments; 3 the weights could not be loaded; 130 interrupted (Ctrl-C
or SIGTERM; the images written are kept).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from .family import BUILTIN_MODELS, check_folder, device_problem, load_models
from .geometry import DEFAULT_MODEL, family_geometry
from .imagefile import encode
from .lora import apply_lora_file, lora_info
from .paths import blocked_by_a_file
from .pipeline import generate, img2img_steps
from .request import MAX_SEED, Request, sampling_defaults, validate, validate_strength
from .signals import sigterm_interrupts
from .weights import WeightsError

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
# One prompt's images in one run: each is a file checked before the run starts (a billion made the checks alone run
# out of memory); the batch job is for more.
MAX_IMAGES = 10_000
DEFAULT_STRENGTH = 0.8  # img2img: as cascade.pipeline.generate
EXIT_OK, EXIT_FAILED, EXIT_ARGUMENTS, EXIT_WEIGHTS, EXIT_INTERRUPTED = 0, 1, 2, 3, 130  # 130: Ctrl-C or SIGTERM


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default, except where there is none to show (None: the help says where it comes from)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m cascade",
        description="Generate images with Stable Cascade on one machine.",
        epilog="Exit codes: 0 all images written; 1 an image failed or could not be written; 2 bad arguments; "
        "3 weights not loadable; 130 interrupted (Ctrl-C or SIGTERM), the images written kept.",
        formatter_class=_Help,
        allow_abbrev=False,  # a prefix (--prior-step) is refused, not taken for a flag
    )
    p.add_argument("prompt", help="the text prompt")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--weights", type=Path, help="folder laid out as the official stable-cascade(-prior) repos")
    src.add_argument("--model", choices=sorted(BUILTIN_MODELS), help=f"a built-in model (default: {DEFAULT_MODEL})")
    p.add_argument(
        "--lora",
        type=Path,
        help="a LoRA file (python -m cascade.train lora) merged into the text encoder and Stage C (and Stage B if "
        "it adapts it)",
    )
    p.add_argument("--lite", action="store_true", help="use Stage C lite and Stage B lite from --weights")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("out.png"),
        help="the image file: .png (or no extension), .webp or .jpg, parameters embedded; with --num-images N, "
        "-0..-N-1 before the extension; files of those names are replaced",
    )
    p.add_argument("--negative-prompt", default="", help="what to steer away from (the unconditional input)")
    p.add_argument("--seed", type=int, default=0, help=f"0 to {MAX_SEED}; image i uses seed + i")
    p.add_argument("--num-images", type=int, default=1, help="images of the prompt, one seed each")
    p.add_argument("--width", type=int, help="default: the family's (1024 for the official one); sizes it supports")
    p.add_argument("--height", type=int, help="default: the family's (1024 for the official one)")
    # Unset, these are the family's (its family.json's "sampling"), else the reference's.
    p.add_argument("--prior-steps", type=int, help="Stage C sampling steps (default: the family's, else 20)")
    p.add_argument("--prior-cfg", type=float, help="Stage C guidance scale (default: the family's, else 4.0)")
    p.add_argument("--decoder-steps", type=int, help="Stage B sampling steps (default: the family's, else 10)")
    p.add_argument("--decoder-cfg", type=float, help="Stage B guidance scale (default: the family's, else 1.1)")
    p.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim"], help="ddpm as the reference; ddim is eta 0")
    p.add_argument("--init-image", type=Path, help="img2img: start Stage C from this image")
    p.add_argument(
        "--strength", type=float, help=f"img2img: how far to noise the image, in (0, 1] (default {DEFAULT_STRENGTH})"
    )
    p.add_argument("--batch-size", type=int, default=4, help="images per forward pass")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="e.g. cpu, cuda, cuda:1")
    p.add_argument("--dtype", choices=["auto", *sorted(DTYPES)], default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    return p.parse_args(argv)


# The Request fields this command line sets from a flag of the same name: validate()'s messages start with the field.
FLAG_FIELDS = ("negative_prompt", "seed", "width", "height", "prior_steps", "prior_cfg", "decoder_steps", "decoder_cfg")


def flag_message(message: str) -> str:
    """validate()'s message with the field it names as this command line's flag ('width: 250 ...' -> '--width: 250
    ...'), as the CLI's own messages name them; the batch job keeps the field names (its input's columns)."""
    field, sep, rest = message.partition(": ")
    return f"--{field.replace('_', '-')}: {rest}" if sep and field in FLAG_FIELDS else message


SUFFIXES = {".png": "png", ".webp": "webp", ".jpg": "jpeg", ".jpeg": "jpeg"}


def output_paths(out: Path, n: int) -> list[Path]:
    """The files to write: `out` itself (`.png` added where it has no extension), or -0..-N-1 before its extension."""
    suffix = out.suffix or ".png"
    if n == 1:
        return [out.with_name(out.name + suffix) if not out.suffix else out]
    return [out.with_name(f"{out.stem}-{i}{suffix}") for i in range(n)]


def unwritable(out: Path, n: int) -> str | None:
    """Why the files a run of `n` images writes to `out` cannot be (a name that is a folder, a folder that takes no
    new file), or None: found before the models load and the images are made, not when the first is saved."""
    paths = output_paths(out, n)
    for path in paths:
        if path.is_dir():
            return f"--out: {path} is a folder; this run writes an image file of that name"
    # The nearest folder that exists (the rest are made): a file made and removed there says whether it takes the
    # images (os.access does not: root passes it for /proc and for read-only folders on a writable mount).
    folder = next((p for p in [paths[0].parent, *paths[0].parent.parents] if p.is_dir()), None)
    if folder is None:
        return None
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".cascade-probe-")
    except OSError as e:
        return f"--out: {paths[0]} cannot be written: {folder} takes no new file ({e.strerror or e})"
    os.close(fd)
    os.unlink(probe)
    return None


def write_image(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all (a hidden file beside it, renamed): an interrupt or a full disk leaves no
    truncated image under an image's name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_bytes(data)
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        raise


def check_arguments(args) -> str | None:
    """What is wrong with the arguments that need no model (the message), or None: checked before any load."""
    if not args.prompt.strip():  # as the batch job refuses such a row
        return "prompt: empty; give the text of the image"
    if args.lite and args.weights is None:
        return (
            "--lite picks the lite files of a --weights folder; the built-in random-lite is the lite architecture "
            "with random weights"
        )
    if not 1 <= args.num_images <= MAX_IMAGES:
        return (
            f"--num-images: {args.num_images} is not allowed; use 1 to {MAX_IMAGES} "
            "(for more, the batch job: python -m jobs.generate)"
        )
    if args.batch_size < 1:
        return f"--batch-size: {args.batch_size} is not allowed; use 1 or more"
    if not 0 <= args.seed <= MAX_SEED:
        return f"--seed: {args.seed} is not allowed; use an integer from 0 to 2**63 - 1"
    if args.seed + args.num_images - 1 > MAX_SEED:  # image i uses seed + i
        return (
            f"--seed: {args.seed} with --num-images {args.num_images} goes past 2**63 - 1 (image i uses seed + i); "
            f"use at most {MAX_SEED - args.num_images + 1}"
        )
    if args.out.is_dir():
        return f"--out: {args.out} is a folder; give a file name, e.g. {args.out / 'image.png'}"
    blocked = blocked_by_a_file(args.out)
    if blocked is not None:
        return blocked
    if args.out.suffix and args.out.suffix.lower() not in SUFFIXES:
        return f"--out: {args.out.suffix!r} is not an image format this writes; use .png, .webp or .jpg"
    problem = unwritable(args.out, args.num_images)  # every name the run writes
    if problem is not None:
        return problem
    problem = device_problem(args.device)
    if problem is not None:
        return f"--device: {problem}"
    if args.init_image is None and args.strength is not None:
        return "--strength: applies to img2img only; give --init-image too"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    written: list[Path] = []  # the images written so far, kept and counted when interrupted
    with sigterm_interrupts():  # `kill`, a scheduler: stop as on Ctrl-C
        try:
            return _run(args, written)
        except KeyboardInterrupt:
            print(f"interrupted: {len(written)} of {args.num_images} image(s) written", file=sys.stderr)
            return EXIT_INTERRUPTED


def _run(args: argparse.Namespace, written: list[Path]) -> int:
    problem = check_arguments(args)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_ARGUMENTS
    model = args.weights if args.weights is not None else args.model or DEFAULT_MODEL
    strength = DEFAULT_STRENGTH if args.strength is None else args.strength  # (used with --init-image only)
    try:
        if args.weights is not None:  # first: sizes checked against a folder that is not there would blame them
            check_folder(args.weights)
        geometry, sampling = family_geometry(model), sampling_defaults(model)
    except WeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_WEIGHTS
    for key, default in sampling.items():  # what the command line does not set
        if getattr(args, key) is None:
            setattr(args, key, default)
    requests = [
        Request(
            prompt=args.prompt,
            negative_prompt=args.negative_prompt,
            seed=args.seed + i,
            width=geometry.default_size if args.width is None else args.width,
            height=geometry.default_size if args.height is None else args.height,
            prior_steps=args.prior_steps,
            prior_cfg=args.prior_cfg,
            decoder_steps=args.decoder_steps,
            decoder_cfg=args.decoder_cfg,
            sampler=args.sampler,
        )
        for i in range(args.num_images)
    ]
    try:
        for r in requests:
            validate(r, geometry)
    except ValueError as e:
        print(f"error: {flag_message(str(e))}", file=sys.stderr)
        return EXIT_ARGUMENTS
    init_image, img2img = None, ""
    if args.init_image is not None:
        try:
            init_image = Image.open(args.init_image).convert("RGB")
            digest = hashlib.sha256(args.init_image.read_bytes()).hexdigest()
        except (OSError, Image.DecompressionBombError) as e:  # (PIL's refusal of a huge image is no OSError)
            print(f"error: --init-image: cannot read {args.init_image}: {e}", file=sys.stderr)
            return EXIT_ARGUMENTS
        # The image's parameters name what it started from, so that it can be made again.
        img2img = f"strength={strength} init_image_sha256={digest}"
        try:
            validate_strength(strength)
        except ValueError as e:
            print(f"error: --{e}", file=sys.stderr)
            return EXIT_ARGUMENTS
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    # The dtype changes the pixels (bf16 against fp32: up to 18 of 255 here), so the image says which it was made in.
    made_with = " ".join(w for w in (f"dtype={next(k for k, v in DTYPES.items() if v == dtype)}", img2img) if w)

    # No transformers 'Loading weights' bar (as the job's actors and cascade.train --no-progress): this command's
    # progress is its own lines (loaded ..., generated i/N), and the bar covered the text encoder only.
    from transformers.utils import logging as transformers_logging  # (the text encoder loads it anyway)

    transformers_logging.disable_progress_bar()
    start = time.perf_counter()
    try:
        if args.lora is not None:
            lora_info(args.lora)  # a missing or foreign file is named before the models load (GBs for the official)
        if args.weights is not None:
            models = load_models(
                args.weights, lite=args.lite, dtype=dtype, device=device, with_effnet=init_image is not None
            )
        else:
            models = BUILTIN_MODELS[args.model or DEFAULT_MODEL](
                device=device, dtype=dtype, with_effnet=init_image is not None
            )
        if args.lora is not None:
            words = apply_lora_file(models, args.lora)
            models.name = f"{models.name}+{args.lora.name}"  # the PNG's parameters name the LoRA too
            print(f"LoRA {args.lora.name} merged; its words: {', '.join(words) or 'none'}", file=sys.stderr)
    except WeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_WEIGHTS
    print(f"loaded {models.name} on {device} ({dtype}) in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    r = requests[0]
    prior_steps = r.prior_steps if args.init_image is None else img2img_steps(r.prior_steps, strength)
    print(
        f"{r.width}x{r.height}, {prior_steps} Stage C steps at cfg {r.prior_cfg}, {r.decoder_steps} Stage B steps "
        f"at cfg {r.decoder_cfg}",
        file=sys.stderr,
    )

    start = time.perf_counter()
    paths, failed, warned = output_paths(args.out, len(requests)), 0, False
    # A batch at a time, each image written as soon as it is made: an interrupt or a write error keeps those written,
    # and a long --num-images run holds one batch, not every image. (The requests share one bucket: generate() would
    # make the same batches.)
    for first in range(0, len(requests), args.batch_size):
        batch = requests[first : first + args.batch_size]
        images = None if init_image is None else [init_image] * len(batch)
        results = generate(models, batch, batch_size=args.batch_size, init_images=images, strength=strength)
        print(f"generated {first + len(batch)}/{len(requests)}", file=sys.stderr)
        for result, path in zip(results, paths[first:]):
            if result.prompt_truncated and not warned:  # (one prompt: said once)
                warned = True
                print(
                    f"warning: the prompt has {result.prompt_tokens} tokens; CLIP reads the first 77, the rest was cut",
                    file=sys.stderr,
                )
            if result.error:
                failed += 1
                print(f"error: seed {result.request.seed}: {result.error}; no image written", file=sys.stderr)
                continue
            data = encode(result.image, result.request, models.name, SUFFIXES[path.suffix.lower()], extra=made_with)
            try:
                write_image(path, data)
            except OSError as e:  # (checked before the load; changed since, or a full disk): the rest would fail too
                print(
                    f"error: --out: cannot write {path}: {e.strerror or e}; {len(written)} of {len(requests)} "
                    "image(s) written",
                    file=sys.stderr,
                )
                return EXIT_FAILED
            written.append(path)
            print(path, flush=True)  # (a pipe reading the names gets each as it is written)
    print(f"{len(written)} image(s) in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
