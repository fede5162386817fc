"""`python -m cascade`: images with their parameters in PNG text chunks, meaningful exit codes."""

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

import cascade.__main__ as cli
from cascade.__main__ import main
from cascade.geometry import DEFAULT_MODEL

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--width", "256", "--height", "256", "--prior-steps", "2", "--decoder-steps", "2"]


def test_cli_writes_png_with_parameters(tmp_path, capsys):
    out = tmp_path / "out.png"
    assert main(["a red circle", "--model", "tiny", "--out", str(out), "--seed", "7", *FAST]) == 0
    image = Image.open(out)
    assert image.size == (256, 256)
    assert image.text["prompt"] == "a red circle" and image.text["seed"] == "7"
    assert "prior_steps=2" in image.text["parameters"] and "model=tiny" in image.text["parameters"]
    assert image.text["parameters"].endswith(" dtype=fp32")  # (auto on a CPU): it changes the pixels


def test_cli_num_images_use_consecutive_seeds(tmp_path):
    out = tmp_path / "img.png"
    assert main(["x", "--out", str(out), "--num-images", "2", "--seed", "3", *FAST]) == 0
    seeds = [Image.open(tmp_path / f"img-{i}.png").text["seed"] for i in range(2)]
    assert seeds == ["3", "4"]


def test_cli_bad_size_exits_2_with_the_rule(tmp_path, capsys):
    assert main(["x", "--out", str(tmp_path / "o.png"), "--width", "1000", "--model", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "error: --width: 1000 is not supported; use an integer multiple of 32 from 256 to 2048" in err
    assert not (tmp_path / "o.png").exists()


def test_cli_takes_no_prefix_for_a_flag(tmp_path, capsys):
    """argparse's default took --prior-step 3 as --prior-steps 3: a misspelt flag silently set another."""
    with pytest.raises(SystemExit) as e:
        main(["x", "--out", str(tmp_path / "o.png"), "--prior-step", "3"])
    assert e.value.code == 2 and "unrecognized arguments: --prior-step 3" in capsys.readouterr().err


def test_cli_messages_name_the_flag_not_the_request_field(tmp_path, capsys):
    for argv, message in [
        (["--height", "250"], "error: --height: 250 is not supported"),
        (["--prior-steps", "0"], "error: --prior-steps: 0 is not allowed; use an integer from 1 to 1000"),
        (["--decoder-steps", "1001"], "error: --decoder-steps: 1001 is not allowed"),
        (["--prior-cfg", "nan"], "error: --prior-cfg: nan is not allowed; use a finite number from 0 to 100"),
        (["--decoder-cfg", "-1"], "error: --decoder-cfg: -1.0 is not allowed"),
    ]:
        assert main(["x", "--out", str(tmp_path / "o.png"), "--model", "tiny", *argv]) == 2, argv
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


def test_cli_bad_weights_exit_3_naming_the_folder(tmp_path, capsys):
    assert main(["x", "--weights", str(tmp_path / "missing"), "--out", str(tmp_path / "o.png")]) == 3
    assert "missing: weights folder not found" in capsys.readouterr().err
    (tmp_path / "stage_c.safetensors").write_bytes(b"")
    assert main(["x", "--weights", str(tmp_path / "stage_c.safetensors"), "--out", str(tmp_path / "o.png")]) == 3
    assert "stage_c.safetensors: is a file, not a weights folder" in capsys.readouterr().err
    assert main(["x", "--model", "tiny", "--lite", "--out", str(tmp_path / "o.png")]) == 2  # not silently ignored
    assert "--lite picks the lite files of a --weights folder" in capsys.readouterr().err


def test_cli_missing_lora_exits_3_before_any_model_loads(tmp_path, capsys, monkeypatch):
    def no_load(**kw):
        raise AssertionError("the model loaded before the LoRA file was checked")

    monkeypatch.setitem(cli.BUILTIN_MODELS, "tiny", no_load)
    lora = tmp_path / "missing.safetensors"
    assert main(["a red circle", "--model", "tiny", "--lora", str(lora), "--out", str(tmp_path / "o.png")]) == 3
    assert f"error: {lora}: file not found" in capsys.readouterr().err
    assert main(["a red circle", "--model", "tiny", "--lora", str(tmp_path), "--out", str(tmp_path / "o.png")]) == 3
    assert f"error: {tmp_path}: is a folder, not a file" in capsys.readouterr().err


def test_cli_prints_no_transformers_loading_bar(tmp_path, capsys):
    from transformers.utils import logging as transformers_logging

    was = transformers_logging.is_progress_bar_enabled()
    transformers_logging.enable_progress_bar()  # as in a fresh process (another test may have turned it off)
    try:
        steps = ["--prior-steps", "2", "--decoder-steps", "2"]
        assert main(["a red circle", "--out", str(tmp_path / "o.png"), *steps]) == 0  # the demo: a text_encoder/ folder
    finally:
        (transformers_logging.enable_progress_bar if was else transformers_logging.disable_progress_bar)()
    err = capsys.readouterr().err
    assert f"loaded {DEFAULT_MODEL}" in err and "Loading weights" not in err


def test_python_dash_m_entry_point(tmp_path):
    out = tmp_path / "o.png"
    proc = subprocess.run(
        [sys.executable, "-m", "cascade", "a prompt", "--out", str(out), "--seed", "1", *FAST],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and f"loaded {DEFAULT_MODEL}" in proc.stderr  # the default model


def test_cli_img2img(tmp_path, capsys):
    Image.new("RGB", (64, 48), "red").save(tmp_path / "init.png")
    out = tmp_path / "o.png"
    args = ["x", "--out", str(out), "--init-image", str(tmp_path / "init.png"), "--strength", "0.5", *FAST]
    assert main([*args, "--prior-steps", "10"]) == 0 and out.is_file()
    assert "10 Stage C steps" not in (err := capsys.readouterr().err) and "5 Stage C steps" in err  # from t = 0.5
    # The parameters say what the image started from, so that it can be made again.
    digest = hashlib.sha256((tmp_path / "init.png").read_bytes()).hexdigest()
    assert f"strength=0.5 init_image_sha256={digest}" in Image.open(out).text["parameters"]
    assert main(["x", "--out", str(out), *FAST]) == 0
    assert "strength" not in Image.open(out).text["parameters"]
    assert main(["x", "--out", str(out), "--init-image", str(tmp_path / "none.png")]) == 2
    assert "--init-image: cannot read" in capsys.readouterr().err
    Image.new("1", (20000, 10000)).save(tmp_path / "bomb.png")  # 2e8 pixels: PIL refuses it as a decompression bomb
    assert main(["x", "--out", str(out), "--init-image", str(tmp_path / "bomb.png")]) == 2
    assert f"error: --init-image: cannot read {tmp_path / 'bomb.png'}: Image size" in capsys.readouterr().err


def test_cli_arguments_that_need_no_model_are_checked_before_any_load(tmp_path, capsys, monkeypatch):
    def no_load(**kw):
        raise AssertionError("the model loaded before the arguments were checked")

    monkeypatch.setitem(cli.BUILTIN_MODELS, "tiny", no_load)
    cuda = "cuda" if not __import__("torch").cuda.is_available() else "cuda:999"
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for argv, message in [
        (["--batch-size", "0"], "--batch-size: 0 is not allowed; use 1 or more"),
        (["--out", str(tmp_path)], "is a folder; give a file name"),
        (["--out", str(tmp_path / "x.gif")], "'.gif' is not an image format this writes; use .png, .webp or .jpg"),
        (["--device", "nonsense"], "--device: 'nonsense' is not a device"),
        (["--device", "meta"], "--device: 'meta': meta devices are not supported; use cpu or cuda"),
        (["--strength", "0.5"], "--strength: applies to img2img only; give --init-image too"),
        (["--seed", "-1"], "--seed: -1 is not allowed; use an integer from 0 to 2**63 - 1"),
        # Each image's file is checked before the run: a billion ran those checks out of memory.
        (["--num-images", "10001"], "--num-images: 10001 is not allowed; use 1 to 10000 (for more, the batch job"),
        (
            ["--seed", str(2**63 - 1), "--num-images", "2"],
            f"--seed: {2**63 - 1} with --num-images 2 goes past 2**63 - 1 (image i uses seed + i); "
            f"use at most {2**63 - 2}",
        ),
        (["--out", str(blocker / "x.png")], f"--out: {blocker / 'x.png'} cannot be written: {blocker} is a file"),
    ] + ([(["--device", cuda], "is not available here")] if cuda == "cuda" else []):
        assert main(["a red circle", "--model", "tiny", *argv]) == 2, argv
        assert message in capsys.readouterr().err


def test_cli_names_the_file_and_embeds_the_parameters_in_each_format(tmp_path):
    import json

    from cascade.imagefile import EXIF_IMAGE_DESCRIPTION

    assert main(["a red circle", "--model", "tiny", "--out", str(tmp_path / "plain"), "--seed", "3", *FAST]) == 0
    assert Image.open(tmp_path / "plain.png").text["seed"] == "3"  # no extension: a PNG, named so
    assert main(["a red circle", "--model", "tiny", "--out", str(tmp_path / "x.jpg"), "--seed", "4", *FAST]) == 0
    image = Image.open(tmp_path / "x.jpg")
    assert image.format == "JPEG" and json.loads(image.getexif()[EXIF_IMAGE_DESCRIPTION])["seed"] == 4


def test_cli_refuses_an_empty_prompt_as_the_batch_job_does(tmp_path, capsys, monkeypatch):
    def no_load(**kw):
        raise AssertionError("the model loaded for an empty prompt")

    monkeypatch.setitem(cli.BUILTIN_MODELS, "tiny", no_load)
    for prompt in ["", " \t\n"]:
        assert main([prompt, "--model", "tiny", "--out", str(tmp_path / "o.png")]) == 2
        assert "error: prompt: empty; give the text of the image" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


def test_cli_names_the_tokenizer_folder_when_the_tokenizer_is_broken(tmp_path, capsys):
    from cascade import save_stage, tiny_models
    from cascade.text import save_tokenizer

    tiny, folder = tiny_models(), tmp_path / "weights"
    tiny.text_encoder.model.save_pretrained(folder / "text_encoder")
    save_tokenizer(folder / "tokenizer", tiny.text_encoder.tokenizer)
    for stage in ("stage_c", "stage_b", "stage_a"):
        save_stage(getattr(tiny, stage), folder / f"{stage}.safetensors")
    argv = ["a red circle", "--weights", str(folder), "--out", str(tmp_path / "o.png"), *FAST]
    assert main(argv) == 0  # the folder loads as written
    capsys.readouterr()
    (folder / "tokenizer" / "tokenizer_config.json").write_text("{\n")
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert f"error: {folder / 'tokenizer'}: the tokenizer could not be loaded: Expecting property name" in err
    assert "text_encoder" not in err


def test_cli_output_that_cannot_be_written_is_exit_2_before_any_load(tmp_path, capsys, monkeypatch):
    def no_load(**kw):
        raise AssertionError("the model loaded before --out was checked")

    monkeypatch.setitem(cli.BUILTIN_MODELS, "tiny", no_load)
    (tmp_path / "o" / "k-1.png").mkdir(parents=True)  # the second of three images' names
    (tmp_path / "o" / "plain.png").mkdir()  # the name `--out o/plain` writes
    cases = [
        (["--out", str(tmp_path / "o" / "k.png"), "--num-images", "3"], f"--out: {tmp_path / 'o' / 'k-1.png'} is a"),
        (["--out", str(tmp_path / "o" / "plain")], f"--out: {tmp_path / 'o' / 'plain.png'} is a folder"),
    ]
    if Path("/proc/self").is_dir():  # Linux: /proc takes no new file, even from root
        cases += [(["--out", "/proc/x.png"], "--out: /proc/x.png cannot be written: /proc takes no new file")]
        cases += [(["--out", "/proc/new/x.png"], "--out: /proc/new/x.png cannot be written: /proc takes no new file")]
    for argv, message in cases:
        assert main(["a red circle", "--model", "tiny", *argv]) == 2, argv
        assert message in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["k-1.png", "plain.png"]  # nor a probe left


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_cli_read_only_output_folder_is_exit_2(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o555)
    assert main(["a red circle", "--model", "tiny", "--out", str(folder / "o.png")]) == 2
    assert f"--out: {folder / 'o.png'} cannot be written: {folder} takes no new file" in capsys.readouterr().err


def test_cli_write_error_is_one_line_and_keeps_the_images_written(tmp_path, capsys, monkeypatch):
    build = cli.BUILTIN_MODELS["tiny"]

    def build_then_take_a_name(**kw):  # the second image's name becomes a folder after the checks, before its write
        (tmp_path / "o-1.png").mkdir()
        return build(**kw)

    monkeypatch.setitem(cli.BUILTIN_MODELS, "tiny", build_then_take_a_name)
    argv = ["x", "--model", "tiny", "--out", str(tmp_path / "o.png"), "--num-images", "3", "--batch-size", "1"]
    assert main([*argv, *FAST]) == 1
    out, err = capsys.readouterr()
    assert f"error: --out: cannot write {tmp_path / 'o-1.png'}: Is a directory; 1 of 3 image(s) written" in err
    assert out.split() == [str(tmp_path / "o-0.png")] and Image.open(tmp_path / "o-0.png").text["seed"] == "0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o-0.png", "o-1.png"]  # no partial file left


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_cli_interrupt_keeps_the_images_written_and_exits_130(tmp_path, signum):
    """Each image is written as it is made; Ctrl-C or SIGTERM prints one line (no traceback) and keeps them."""
    cmd = [sys.executable, "-m", "cascade", "x", "--model", "tiny", "--out", str(tmp_path / "o.png"), *FAST]
    proc = subprocess.Popen(
        [*cmd, "--num-images", "1000", "--batch-size", "1"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "o-0.png").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    written = sorted(tmp_path.iterdir(), key=lambda p: int(p.stem.split("-")[1]))
    assert 1 <= len(written) < 1000 and [p.name for p in written] == [f"o-{i}.png" for i in range(len(written))]
    assert err.splitlines()[-1] == f"interrupted: {len(written)} of 1000 image(s) written"
    assert out.split() == [str(p) for p in written]
    assert [Image.open(p).text["seed"] for p in written] == [str(i) for i in range(len(written))]
