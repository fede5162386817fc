"""The demo family's training commands (`python -m cascade.train`) end to end at a few steps, Stage A's trainer,
and the shipped demo family judged by the independent checker."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import pytest
import torch

from cascade.__main__ import main as cli
from cascade.family import demo_models, load_models
from cascade.geometry import DEMO_FOLDER, family_geometry
from cascade.stage_a import StageAConfig
from cascade.train import demo
from cascade.train.__main__ import main as train
from cascade.train.demo import STAGES, Recipe
from cascade.train.loop import RunConfig
from cascade.train.shapes import make_dataset
from cascade.train.stage_a import latent_scale, train_stage_a, vq_losses, with_scale

FEW_STEPS = ["--images", "96", "--general-images", "32", "--no-progress"]
for _stage in STAGES:
    FEW_STEPS += [f"--{_stage.replace('_', '-')}-steps", "3"]


def test_train_all_writes_a_family_that_generates_and_resumes(tmp_path, capsys):
    out = tmp_path / "family"
    # Two stages at a time, each in its own process as its inputs are ready (the default on 2 cores or more).
    assert train(["all", "--out", str(out), "--jobs", "2", *FEW_STEPS]) == 0
    log = capsys.readouterr().err
    assert log.index("semantic: started") < log.index("text_encoder: started") < log.index("stage_c: started")
    assert log.index("stage_a: started") < log.index("stage_b: started")
    family = json.loads((out / "family.json").read_text())
    assert family["geometry"]["default_size"] == 64 and family["recipe"]["images"] == 96
    assert family["recipe"]["general_images"] == 32
    assert family["sampling"] == demo.SAMPLING  # the demo's measured defaults, so a retrain samples as it does
    assert family["sampling"]["decoder_cfg"] == 3.0 and family["sampling"]["decoder_steps"] == 20
    # The whole command's time from start to end (the recipe's wall time), beside each stage's own.
    assert sorted(family["wall"]["stages"]) == sorted(STAGES) and family["wall"]["jobs"] == 2, family["wall"]
    assert family["wall"]["seconds"] >= max(family["trained"][s]["seconds"] for s in STAGES)
    assert f"trained {', '.join(family['wall']['stages'])} in " in log
    assert {s: family["trained"][s]["steps"] for s in STAGES} == {s: 3 for s in STAGES}
    assert 0 <= family["trained"]["text_encoder"]["heldout_retrieval"] <= 1  # the text stage reports its check
    assert family_geometry(out).stage_c_compression == 16

    # The folder is a family like an official one: the CLI generates from it at its own default size (64 px).
    image_path = tmp_path / "x.png"
    argv = [
        "a red circle",
        "--weights",
        str(out),
        "--out",
        str(image_path),
        "--prior-steps",
        "2",
        "--decoder-steps",
        "2",
    ]
    assert cli(argv) == 0
    from PIL import Image

    assert Image.open(image_path).size == (64, 64)
    # img2img reads the family's semantic encoder.
    assert cli([*argv, "--init-image", str(image_path), "--strength", "0.5"]) == 0

    # A second `all` finds every stage done and trains nothing.
    before = {s: (out / f).stat().st_mtime_ns for s, f in (("c", "stage_c.safetensors"), ("b", "stage_b.safetensors"))}
    capsys.readouterr()
    assert train(["all", "--out", str(out), *FEW_STEPS]) == 0
    log = capsys.readouterr().err
    assert "stage_c: already trained" in log and "it was trained with" not in log  # the same recipe: nothing to say
    assert before == {
        s: (out / f).stat().st_mtime_ns for s, f in (("c", "stage_c.safetensors"), ("b", "stage_b.safetensors"))
    }
    # A finished stage keeps no checkpoint (training it again starts from scratch), and a command that trains
    # nothing leaves the recorded recipe as it was.
    assert not any((out / "checkpoints" / s).exists() for s in STAGES)
    assert train(["stage-a", "--out", str(out), *FEW_STEPS, "--images", "999", "--stage-a-steps", "5"]) == 0
    assert json.loads((out / "family.json").read_text())["recipe"]["images"] == 96
    # ... and says what the skipped stage was trained with that differs from what is asked now.
    assert "stage_a: already trained" in (log := capsys.readouterr().err)
    assert (
        "it was trained with images 96 (now 999), stage_a.steps 3 (now 5): delete it to train it with the settings"
        in log
    )
    # The comparison is with what each stage was trained with (recorded with it), not with the recipe of the last
    # command that trained something: Stage C trained again under a recipe that says 7 Stage A steps ...
    (out / "stage_c.safetensors").unlink()
    assert train(["stage-c", "--out", str(out), *FEW_STEPS, "--stage-a-steps", "7"]) == 0
    assert json.loads((out / "family.json").read_text())["recipe"]["stage_a"]["steps"] == 7
    capsys.readouterr()
    assert train(["stage-a", "--out", str(out), *FEW_STEPS]) == 0  # ... and Stage A asked as it was trained: no word
    assert "stage_a: already trained" in (log := capsys.readouterr().err) and "it was trained with" not in log


def test_a_checkpoint_made_from_other_data_or_inputs_is_not_resumed(tmp_path, capsys):
    checkpoint = tmp_path / "checkpoints" / "stage_c"
    first = {"data": {"images": 96}, "inputs": {"text_encoder": "aa"}}
    demo._claim_checkpoint(checkpoint, first)
    (checkpoint / "state.pt").write_bytes(b"a checkpoint")
    demo._claim_checkpoint(checkpoint, first)  # the same: kept for resuming
    assert (checkpoint / "state.pt").is_file()
    demo._claim_checkpoint(checkpoint, {**first, "inputs": {"text_encoder": "bb"}})  # the text encoder retrained
    assert not (checkpoint / "state.pt").exists() and "not resuming from" in capsys.readouterr().out


def test_all_stops_every_stage_when_one_fails_in_its_process(tmp_path, capsys):
    # `all` trains stages side by side in their own processes (two at a time by default). A semantic encoder that
    # cannot be read makes the text encoder's process fail: the command names the stage and exits 1, and nothing is
    # left running.
    (tmp_path / "semantic_encoder.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "previewer.safetensors").write_bytes(b"")
    assert train(["all", "--out", str(tmp_path), "--jobs", "2", *FEW_STEPS]) == 1
    err = capsys.readouterr().err
    assert "semantic: already trained" in err and "text_encoder: started" in err
    assert "error: text_encoder failed (exit code" in err
    assert not (tmp_path / "stage_c.safetensors").exists() and not (tmp_path / "stage_b.safetensors").exists()
    assert train(["all", "--out", str(tmp_path), "--jobs", "0"]) == 2
    assert "--jobs: 0 is not allowed; use 1 or more" in capsys.readouterr().err


def test_a_stage_before_its_inputs_is_refused(tmp_path, capsys):
    assert train(["stage-b", "--out", str(tmp_path), *FEW_STEPS]) == 2
    err = capsys.readouterr().err
    assert "stage_a.safetensors not found: train stage_a first" in err
    assert train(["all", "--out", str(tmp_path), "--images", "0"]) == 2
    assert "--images: 0 is not allowed" in capsys.readouterr().err
    assert train(["all", "--out", str(tmp_path), "--general-images", "-1"]) == 2
    assert "--general-images: -1 is not allowed; use 0 or more" in capsys.readouterr().err
    # A recipe file that is not one, or an --out that is a file: a message and exit 2, never a traceback.
    for text, message in [
        ('{"stepz": 1}', "recipe: 'stepz' is not a setting; use some of size, images"),
        ("[1]", "recipe: list is not allowed; use a mapping"),
        ('{"stage_c": {"steps": "10"}}', "recipe: stage_c: steps: '10' is not allowed; use a number"),
        ("{not json", "--recipe: not JSON"),
        ('{"size": 48}', "recipe: size: 48 is not supported; use an integer multiple of 16 from 64 to 256"),
        ('{"stage_a": {"steps": -2}}', "recipe: stage_a: steps: -2 is not allowed; use 1 or more"),
        ('{"stage_c": {"lr": -1}}', "recipe: stage_c: lr: -1 is not allowed; use a finite number above 0"),
        ('{"semantic": {"ema_beta": 2}}', "recipe: semantic: ema_beta: 2 is not allowed; use a number from 0 up to"),
        ('{"stage_b": {"warmup": -3}}', "recipe: stage_b: warmup: -3 is not allowed; use 0 or more"),
        ('{"stage_b": {"weight_decay": NaN}}', "recipe: stage_b: weight_decay: nan is not allowed; use 0 or more"),
        ('{"stage_b": {"grad_clip": Infinity}}', "recipe: stage_b: grad_clip: inf is not allowed; use a finite"),
    ]:
        (tmp_path / "recipe.json").write_text(text)
        assert train(["stage-a", "--out", str(tmp_path), "--recipe", str(tmp_path / "recipe.json")]) == 2
        assert message in capsys.readouterr().err
    (tmp_path / "a-file").write_text("")
    assert train(["all", "--out", str(tmp_path), "--stage-c-steps", "0"]) == 2
    assert "--stage-c-steps: 0 is not allowed; use 1 or more" in capsys.readouterr().err
    # --out of the wrong kind: named before any work (the LoRA trainer used to fail only when saving, after training).
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for argv, message in [
        (["stage-a", "--out", str(blocker), *FEW_STEPS], f"--out: {blocker} is a file; give a folder"),
        (["eval", "--out", str(blocker)], f"--out: {blocker} is a file; give a folder"),
        (["stage-a", "--out", str(blocker / "x")], f"--out: {blocker / 'x'} cannot be written: {blocker} is a file"),
        (["lora", "--out", str(tmp_path)], f"--out: {tmp_path} is a folder; give the LoRA's file name"),
        (["lora", "--out", str(tmp_path / "z.bin")], "--out: 'z.bin': a LoRA is written as safetensors"),
        # eval and lora judge shapes at the family's size: the official architecture's 1024 px is refused by name.
        (["eval", "--model", "tiny"], "--model: tiny renders 1024 px by default; eval is for families trained on"),
        (["lora", "--model", "tiny", "--out", str(tmp_path / "z.safetensors")], "lora is for families trained on"),
    ]:
        assert train(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert train(["lora", "--samples", "-1"]) == 2
    assert "--samples: -1 is not allowed; use 0 or more" in capsys.readouterr().err
    # Numbers torch would refuse only after loading, in its own words, or take (a learning rate of 0).
    for argv, message in [
        (["lora", "--lr", "-1"], "--lr: -1.0 is not allowed; use a finite number above 0"),
        (["lora", "--lr", "0"], "--lr: 0.0 is not allowed; use a finite number above 0"),
        (["lora", "--lr", "inf"], "--lr: inf is not allowed; use a finite number above 0"),
        (["eval", "--checker-steps", "0"], "--checker-steps: 0 is not allowed; use 1 or more"),
        (["eval", "--samples", "0"], "--samples: 0 is not allowed; use 1 or more"),
        (["eval", "--prior-steps", "0"], "--prior-steps: 0 is not allowed; use an integer from 1 to 1000"),
        (["eval", "--decoder-cfg", "nan"], "--decoder-cfg: nan is not allowed; use a number from 0 to 100"),
        (["stage-a", "--recipe", str(tmp_path / "none.json")], f"--recipe: cannot read {tmp_path / 'none.json'}: No "),
        (["stage-a", "--recipe", str(tmp_path)], f"--recipe: cannot read {tmp_path}: Is a directory"),
    ]:
        assert train(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    # A stage refused for a missing input leaves no folder behind.
    assert train(["stage-c", "--out", str(tmp_path / "new"), *FEW_STEPS]) == 2
    assert "semantic_encoder.safetensors not found" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_a_partial_recipe_keeps_the_recipes_own_settings_for_what_it_leaves_out():
    """{"stage_c": {"checkpoint_every": 100}} changes that one setting, not Stage C's batch size and warm-up too
    (they used to fall back to RunConfig's generic values)."""
    recipe = Recipe.from_dict({"stage_c": {"checkpoint_every": 100}, "semantic": {"steps": 3}})
    assert recipe.stage_c == replace(Recipe().stage_c, checkpoint_every=100)
    assert recipe.semantic == replace(Recipe().semantic, steps=3)
    assert recipe.text_encoder == Recipe().text_encoder and Recipe().stage_c.batch_size != RunConfig().batch_size


def test_one_training_command_at_a_time_in_a_folder(tmp_path, monkeypatch):
    """A second command in a folder being trained is refused before it writes anything: it would rewrite the first's
    recipe (which the first's later stages read) and could train the same stage beside it."""
    import fcntl
    import os

    from cascade.train.schedule import LOCK_FD_ENV, StageFailed

    out = tmp_path / "f"
    out.mkdir()
    (out / "family.json").write_text('{"recipe": "the first command\'s"}')
    with open(out / ".training.lock", "a+") as held:  # the first command's lock (flock: per open file)
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242\n")
        held.flush()
        with pytest.raises(StageFailed, match="another training command \\(pid 4242, or the stage processes it"):
            demo.train(out, Recipe(), ("stage_a",), progress=False)
        assert (out / "family.json").read_text() == '{"recipe": "the first command\'s"}'
        assert not (out / "checkpoints").exists()
        # A stage process of that command holds the same lock through the descriptor it inherited: it goes on.
        monkeypatch.setenv(LOCK_FD_ENV, str(held.fileno()))
        with demo.folder_lock(out) as fd:
            assert fd == held.fileno()
        # Not ours: a stale value, not a number, or the file opened without holding its lock.
        with open(out / ".training.lock") as other:
            for value in ("99999", "", str(other.fileno())):
                monkeypatch.setenv(LOCK_FD_ENV, value)
                with pytest.raises(StageFailed), demo.folder_lock(out):
                    pass
    monkeypatch.delenv(LOCK_FD_ENV)
    with demo.folder_lock(out):  # free once the first is gone; this command records its own pid
        assert (out / ".training.lock").read_text() == f"{os.getpid()}\n"


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGKILL"])
def test_all_stopped_by_a_signal(tmp_path, stop):
    """SIGTERM (`kill`) on `all` stops it as Ctrl-C does: its stage processes stop too (they used to train on,
    orphaned), and it exits 130 with the resume hint. SIGKILL leaves them running (nothing can stop them then), but
    they keep the folder locked, so another command cannot train beside them."""
    import contextlib
    import os
    import signal
    import subprocess
    import sys
    import time

    from cascade.train.schedule import StageFailed

    out = tmp_path / "f"
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"images": 96, "general_images": 0, "stage_a": {"steps": 100000}}))
    argv = [sys.executable, "-m", "cascade.train", "all", "--out", str(out), "--recipe", str(recipe)]
    log = tmp_path / "log"
    children, alive = [], []
    with open(log, "w") as err:
        parent = subprocess.Popen([*argv, "--jobs", "2", "--no-progress"], stderr=err, stdout=err)
        try:
            deadline = time.monotonic() + 120
            while "stage_a: started (process" not in log.read_text():
                assert parent.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
            children = [int(p.split(",")[0]) for p in log.read_text().split(": started (process ")[1:]]
            time.sleep(3)  # the stage processes are past their imports and training
            parent.send_signal(getattr(signal, stop))
            code = parent.wait(timeout=60)
            if stop == "SIGKILL":
                with pytest.raises(StageFailed, match="another training command"), demo.folder_lock(out):
                    pass
        finally:
            if parent.poll() is None:
                parent.kill()
            for child in children:  # SIGTERM: gone already (the parent waited for them); else stopped here
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
                    alive.append(child)
    assert len(children) == 2, log.read_text()
    if stop == "SIGTERM":
        assert code == 130 and not alive, (code, alive, log.read_text())
        assert "interrupted: run the same command again to resume" in log.read_text()
    else:
        assert sorted(alive) == sorted(children)
        deadline = time.monotonic() + 30  # the killed processes' descriptors close as they exit
        while True:
            try:
                with demo.folder_lock(out):  # the last of them gone: free
                    break
            except StageFailed:
                assert time.monotonic() < deadline
                time.sleep(0.2)


def test_recipes_name_where_general_images_go(tmp_path, capsys):
    recipe = Recipe()
    assert recipe.general_for == ("stage_a", "semantic", "stage_b")  # run 6, shipped: every image model ...
    assert recipe.general_shapes == ("star", "hexagon", "arrow")  # ... sees shapes no caption names, too
    # A recipe recorded before general images (every stage written out, no general_images) had none; a partial
    # recipe written by hand gets the default, so naming where general images go does not turn them off.
    recorded = {k: v for k, v in asdict(Recipe()).items() if not k.startswith("general")}
    assert Recipe.from_dict(recorded).general_images == 0
    assert Recipe.from_dict({"general_shapes": ["star"]}).general_images == Recipe().general_images > 0
    again = Recipe.from_dict(json.loads(json.dumps(asdict(Recipe(general_for=("stage_c",), general_shapes=["star"])))))
    assert again.general_for == ("stage_c",) and again.general_shapes == ("star",)
    with pytest.raises(ValueError, match="general_for: 'text_encoder' is not allowed"):
        Recipe(general_for=("text_encoder",))
    with pytest.raises(ValueError, match="general_shapes: 'blob' is not known"):
        Recipe(general_shapes=("blob",))
    bad = tmp_path / "recipe.json"
    bad.write_text(json.dumps({"general_shapes": ["blob"]}))
    assert train(["stage-a", "--out", str(tmp_path / "f"), "--recipe", str(bad)]) == 2
    assert "general_shapes: 'blob' is not known" in capsys.readouterr().err
    # A hand-written recipe that names every stage is still partial: it keeps the default general images.
    every = {stage: {"checkpoint_every": 100} for stage in STAGES}
    assert Recipe.from_dict(every).general_images == Recipe().general_images > 0
    for fields, message in [
        ({"images": 0}, "recipe: images: 0 is not allowed; use an integer of 1 or more"),
        ({"general_images": -1}, "recipe: general_images: -1 is not allowed; use an integer of 0 or more"),
        ({"general_shapes": 5}, "recipe: general_shapes: 5 is not allowed; use a list of names"),
    ]:
        bad.write_text(json.dumps(fields))
        assert train(["stage-a", "--out", str(tmp_path / "g"), "--recipe", str(bad)]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "g").exists()  # refused before the family folder is begun


def test_stage_a_trains_on_general_images_too(monkeypatch):
    import cascade.train.stage_a as stage_a_module

    data = make_dataset(16, size=32, seed=1)
    general = torch.zeros(16, 3, 32, 32)  # black images: told apart from the data set's by their brightest pixel
    config = StageAConfig(levels=2, c_hidden=16, bottleneck_blocks=1, codebook_size=16)
    seen, real = [], stage_a_module.vq_losses

    def spy(model, images, *rest):
        seen.append(images.flatten(1).amax(1))
        return real(model, images, *rest)

    monkeypatch.setattr(stage_a_module, "vq_losses", spy)
    train_stage_a(data, config, RunConfig(steps=4, batch_size=8, warmup=1), progress=False, general=general)
    maxima = torch.cat(seen)
    assert 0 < int((maxima == 0).sum()) < len(maxima)  # both kinds of image are drawn


def test_stage_a_learns_to_reconstruct_through_its_codebook():
    data = make_dataset(128, size=32, seed=1)
    config = StageAConfig(levels=2, c_hidden=32, bottleneck_blocks=1, codebook_size=64)
    quantize = torch.ones(len(data), dtype=torch.bool)
    untrained = train_stage_a(data, config, RunConfig(steps=1, batch_size=16, warmup=1), progress=False)
    start = vq_losses(untrained.modules["stage_a"], data.images, quantize)[0].item()
    trained = train_stage_a(data, config, RunConfig(steps=120, batch_size=16, lr=3e-3, warmup=10), progress=False)
    model = trained.modules["stage_a"].eval()
    with torch.no_grad():
        recon, codebook = vq_losses(model, data.images, quantize)
        _, codes = model.vquantizer(model.down_blocks(model.in_block(data.images)))
    assert recon.item() < 0.3 * start, (start, recon.item())
    assert codes.unique().numel() >= 16  # the codebook is used, not collapsed onto a few vectors
    scaled = with_scale(model, latent_scale(model, data.images))
    assert abs(scaled.encode(data.images).std().item() - 1.0) < 0.05  # what Stage B's diffusion expects


needs_demo = pytest.mark.skipif(not (DEMO_FOLDER / "family.json").is_file(), reason="the demo weights are not built")


@needs_demo
def test_the_shipped_demo_family_loads_with_its_recipe():
    models = demo_models()
    family = json.loads((DEMO_FOLDER / "family.json").read_text())
    assert models.name == "demo" and models.geometry.default_size == 64
    assert set(family["trained"]) == set(STAGES) and family["recipe"]["stage_c"]["steps"] >= 1000
    again = load_models(DEMO_FOLDER, dtype=torch.float32)
    for a, b in zip(again.stage_c.state_dict().values(), models.stage_c.state_dict().values()):
        assert torch.equal(a, b)


@needs_demo
def test_the_shipped_demo_was_made_with_the_recipes_model_configurations():
    """What `python -m cascade.train` builds today is what ships: a configuration changed in cascade/train/demo.py
    (Stage C's dropout, say) without retraining and shipping again fails here."""
    from cascade.text import load_text_encoder
    from cascade.weights import load_stage

    expected = {"stage_a": demo.STAGE_A, "semantic": demo.SEMANTIC, "previewer": demo.PREVIEWER}
    expected |= {"stage_b": demo.STAGE_B, "stage_c": demo.STAGE_C}
    files = {"semantic": "semantic_encoder"}
    for kind, config in expected.items():
        shipped = load_stage(DEMO_FOLDER / f"{files.get(kind, kind)}.safetensors", expect=kind).config
        if kind == "stage_a":  # its latent scale is measured on the data by training (`latent_scale`)
            shipped = replace(shipped, scale_factor=config.scale_factor)
        assert shipped == config, kind
    text = load_text_encoder(DEMO_FOLDER / "text_encoder", dtype=torch.float32).model.config
    sizes = ("hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers", "num_attention_heads")
    assert {k: getattr(text, k) for k in sizes} == {k: getattr(demo.TEXT, k) for k in sizes}


@needs_demo
@pytest.mark.slow
def test_the_demo_family_draws_what_prompts_ask_for(tmp_path):
    """A small version of `python -m cascade.train eval`: its first 32 prompts per split, the same shipped judge."""
    from cascade.train.evaluate import evaluate

    report = evaluate(DEMO_FOLDER, tmp_path, samples=32, log=lambda m: None)
    held_out, train_split = report["accuracy"]["heldout"], report["accuracy"]["train"]
    for split in (held_out, train_split):
        assert min(split["checker_on_renders"].values()) >= 0.95, split  # the judge reads ground truth
    # Set below the shipped demo's full evaluation (800 prompts per split, docs/TRAINING.md): held-out colour 99 %,
    # shape 81 %, position 100 %, all three 81 %; training pairs colour 100 %, shape 78 %, position 100 %. Chance is
    # 1/8 colours, 1/5 shapes and positions, 1/200 all three. These 32 read held-out 97 / 81 / 100 / 78 %, training
    # 100 / 69 / 100 / 69 % (2026-11-28, run 8 at its defaults: prior cfg 2, decoder cfg 3, 20 decoder steps);
    # chance would put shape at 6 of 32 (sd 2.3), and these bounds ask for 16 held-out and 13 training.
    assert held_out["colour"] >= 0.6 and held_out["position"] >= 0.85 and held_out["all_three"] >= 0.4, held_out
    assert held_out["shape"] >= 0.5, held_out
    assert train_split["colour"] >= 0.85 and train_split["position"] >= 0.85, train_split
    assert train_split["shape"] >= 0.4, train_split
    # The family's own defaults (family.json), what its users get.
    assert (report["prior_cfg"], report["decoder_cfg"], report["decoder_steps"]) == (2.0, 3.0, 20), report
    assert (tmp_path / "contact-sheet.png").is_file() and (tmp_path / "eval.json").is_file()


def test_the_shipped_judge_is_used_and_reads_fresh_renders(tmp_path):
    """`checker_for` takes the shipped judge (what `train_checker` made at 64 px, 600 steps, seed 0) over training
    one; it reads renders it never saw, held-out pairs included."""
    from cascade.train.checker import judge
    from cascade.train.evaluate import checker_for

    checker = checker_for(tmp_path, 64, 600, 0)
    assert list(tmp_path.iterdir()) == []  # nothing trained or written
    data = make_dataset(160, size=64, seed=12345, split="heldout")
    verdict = judge(checker, data.images, data.attributes)
    assert min(verdict.accuracy.values()) >= 0.95, verdict.accuracy
