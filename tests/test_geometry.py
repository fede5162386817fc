"""A family's geometry: the official one by default, a family's own from family.json, used by every entry point."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cascade import Request, generate
from cascade.family import load_models
from cascade.geometry import DEFAULT_MODEL, OFFICIAL, Geometry, family_geometry
from cascade.request import family_sampling, latent_sizes, validate
from cascade.weights import WeightsError
from jobs.config import ConfigError, from_mapping
from tests.test_models_digest import write_family

SMALL = {"stage_c_compression": 16, "min_size": 64, "max_size": 256, "size_multiple": 16, "default_size": 64}


def test_official_geometry_is_the_reference():
    assert latent_sizes(1024, 1024, OFFICIAL) == ((16, 24, 24), (4, 256, 256))
    with pytest.raises(ValueError, match="width: 1000 is not supported; use an integer multiple of 32 from 256 to"):
        validate(Request("a", width=1000))


def test_a_family_file_sets_the_geometry(tmp_path):
    folder = write_family(tmp_path / "small")
    assert family_geometry(folder) == OFFICIAL  # no family.json: an official layout
    (folder / "family.json").write_text(json.dumps({"geometry": SMALL}))
    small = family_geometry(folder)
    assert small == Geometry(**SMALL) and latent_sizes(64, 96, small) == ((16, 6, 4), (4, 24, 16))
    models = load_models(folder, dtype=torch.float32)
    assert models.geometry == small
    results = generate(models, [Request("a red circle", seed=1, width=64, height=96, prior_steps=2, decoder_steps=2)])
    assert results[0].error is None and results[0].image.size == (64, 96)
    with pytest.raises(ValueError, match="width: 1024 is not supported; use an integer multiple of 16 from 64 to 256"):
        generate(models, [Request("x", width=1024, height=64)])
    # The job: sizes default to the family's and are checked against its rules.
    config = from_mapping({"prompts": "p", "out": "o", "model": str(folder)})
    assert (config.width, config.height) == (64, 64)
    with pytest.raises(ConfigError, match="width: 1024 is not supported; use an integer multiple of 16 from 64 to 256"):
        from_mapping({"prompts": "p", "out": "o", "model": str(folder), "width": 1024})
    assert from_mapping({"prompts": "p", "out": "o", "model": "tiny"}).width == 1024  # the official geometry
    assert from_mapping({"prompts": "p", "out": "o"}).width == family_geometry(DEFAULT_MODEL).default_size


def test_a_broken_family_file_is_named(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "family.json").write_text(json.dumps({"geometry": {"stage_c_compresion": 16}}))
    with pytest.raises(
        WeightsError,
        match="family.json: not a valid family file: geometry: 'stage_c_compresion' is "
        "not a setting; use some of stage_c_compression",
    ):
        family_geometry(folder)
    (folder / "family.json").write_text(json.dumps({"geometry": {"default_size": 4096}}))
    with pytest.raises(WeightsError, match="inconsistent"):
        family_geometry(folder)
    # Each value's type and range, and a default size the family's own rule refuses: named here, not met later as a
    # TypeError, a division by zero after loading, or a refusal of a --width nobody gave.
    for geometry, message in [
        ({"min_size": "a"}, "geometry: min_size: 'a'; use an integer above 0"),
        ({"stage_c_compression": 0}, "geometry: stage_c_compression: 0; use a number above 0"),
        ({"stage_c_compression": float("nan")}, "geometry: stage_c_compression: nan; use a number above 0"),
        ({"size_multiple": 16.0}, "geometry: size_multiple: 16.0; use an integer above 0"),
        ({"stage_a_compression": True}, "geometry: stage_a_compression: True; use an integer above 0"),
        ({"default_size": 300}, "geometry: default_size: 300 is not supported; use an integer multiple of 32"),
    ]:
        (folder / "family.json").write_text(json.dumps({"geometry": geometry}))
        with pytest.raises(WeightsError) as refused:
            family_geometry(folder)
        assert str(refused.value).startswith(f"{folder / 'family.json'}: not a valid family file: {message}")
    (folder / "family.json").write_text(json.dumps({"geometry": {"stage_c_compression": 16, "min_size": 64}}))
    assert family_geometry(folder).stage_c_compression == 16


def test_a_mistyped_weights_folder_is_named_not_the_size_it_was_asked_for(tmp_path, capsys):
    """A size checked against the official family, because the folder of a family with its own sizes is not there,
    blamed the size (exit 2): the folder is named instead (exit 3), by the CLI and by the job."""
    from cascade.__main__ import main
    from jobs.generate import main as generate

    missing = str(tmp_path / "runs" / "demoo")
    assert main(["x", "--weights", missing, "--width", "64", "--out", str(tmp_path / "o.png")]) == 3
    assert f"error: {missing}: weights folder not found" in capsys.readouterr().err
    config = from_mapping({"prompts": "p", "out": "o", "model": missing, "width": 64})
    assert config.width == 64  # not refused here: the model check names the folder
    prompts = Path(__file__).parents[1] / "examples" / "prompts.parquet"
    argv = ["--prompts", str(prompts), "--out", str(tmp_path / "out"), "--model", missing]
    assert generate([*argv, "--width", "64"]) == 3
    assert f"model: {missing!r} is neither a built-in model" in capsys.readouterr().err


def test_cli_uses_the_family_default_size(tmp_path):
    from PIL import Image

    from cascade.__main__ import main

    folder = write_family(tmp_path / "small")
    (folder / "family.json").write_text(json.dumps({"geometry": SMALL}))
    out = tmp_path / "x.png"
    argv = ["a red circle", "--weights", str(folder), "--out", str(out), "--prior-steps", "2", "--decoder-steps", "2"]
    assert main(argv) == 0
    assert Image.open(out).size == (64, 64)
    assert main([*argv, "--width", "1024"]) == 2


def test_a_family_chooses_its_sampling_defaults_and_users_still_choose_theirs(tmp_path, capsys, monkeypatch):
    """family.json's "sampling" sets the steps and guidance its users get where they set none: in the job (its
    configuration and so every row without its own), the CLI and the evaluation. Official families keep the
    reference's (Stage C 20 steps at cfg 4, Stage B 10 at 1.1); a bad value names the file, the key and the value."""
    from cascade.__main__ import main as cli
    from cascade.train.evaluate import evaluate
    from jobs.generate import main as job

    folder = write_family(tmp_path / "small")
    family = {"geometry": SMALL, "sampling": {"decoder_cfg": 1.5, "prior_steps": 3}}
    (folder / "family.json").write_text(json.dumps(family))
    config = from_mapping({"prompts": "p", "out": "o", "model": str(folder)})
    assert (config.prior_steps, config.prior_cfg, config.decoder_steps, config.decoder_cfg) == (3, 4.0, 10, 1.5)
    config = from_mapping({"prompts": "p", "out": "o", "model": str(folder), "decoder_cfg": 1.1, "prior_steps": 2})
    assert (config.prior_steps, config.decoder_cfg) == (2, 1.1)  # the user's choice wins
    tiny = from_mapping({"prompts": "p", "out": "o", "model": "tiny"})
    assert (tiny.prior_steps, tiny.prior_cfg, tiny.decoder_steps, tiny.decoder_cfg) == (20, 4.0, 10, 1.1)

    out = tmp_path / "x.png"
    assert cli(["a red circle", "--weights", str(folder), "--out", str(out), "--decoder-steps", "2"]) == 0
    assert "3 Stage C steps at cfg 4.0, 2 Stage B steps at cfg 1.5" in capsys.readouterr().err
    report = evaluate(folder, tmp_path / "eval", samples=1, checker_steps=2, log=lambda m: None, decoder_steps=2)
    assert (report["prior_steps"], report["prior_cfg"], report["decoder_steps"], report["decoder_cfg"]) == (
        3,
        4.0,
        2,
        1.5,
    )
    # Another evaluation seed: other prompts and image seeds that overlap no other seed's, read by the same judge.
    import cascade.train.evaluate as evaluation

    seeds = []
    real = evaluation.generate
    monkeypatch.setattr(evaluation, "generate", lambda m, r, **kw: seeds.extend(x.seed for x in r) or real(m, r, **kw))
    again = evaluate(folder, tmp_path / "eval", samples=2, checker_steps=2, seed=1, log=lambda m: None, decoder_steps=2)
    assert seeds == [1_000_000, 1_000_001] * 2 and again["checker_seed"] == 0  # held-out, then training pairs
    assert [p.name for p in (tmp_path / "eval").glob("checker-*")] == ["checker-v2-64px-2steps-seed0.safetensors"]

    family["sampling"] = {"decoder_cfg": -1}
    (folder / "family.json").write_text(json.dumps(family))
    with pytest.raises(WeightsError, match=r"family.json: sampling: decoder_cfg: -1 is not allowed; use a finite"):
        family_sampling(folder)
    pq.write_table(pa.table({"prompt": ["a"]}), tmp_path / "p.parquet")
    assert job(["--prompts", str(tmp_path / "p.parquet"), "--out", str(tmp_path / "out"), "--model", str(folder)]) == 3
    assert "sampling: decoder_cfg: -1 is not allowed" in capsys.readouterr().err
    family["sampling"] = {"decoder_guidance": 2}
    (folder / "family.json").write_text(json.dumps(family))
    with pytest.raises(
        WeightsError, match=r"sampling: \{'decoder_guidance': 2\} is not allowed; use a mapping of some"
    ):
        family_sampling(folder)
    assert cli(["a red circle", "--weights", str(folder), "--out", str(out)]) == 3


def test_the_job_stops_on_a_broken_family_file_before_it_starts(tmp_path, capsys):
    from jobs.generate import main as job

    folder = write_family(tmp_path / "w")
    (folder / "family.json").write_text("{not json")
    pq.write_table(pa.table({"prompt": ["a"]}), tmp_path / "p.parquet")
    assert job(["--prompts", str(tmp_path / "p.parquet"), "--out", str(tmp_path / "out"), "--model", str(folder)]) == 3
    assert "family.json: not a valid family file" in capsys.readouterr().err
