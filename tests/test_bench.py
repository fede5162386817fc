"""A smoke of the benchmark command (numbers live in the docs, not in tests): it runs, reports every stage and the
pipeline for each batch size, and writes its JSON."""

import json

from jobs.bench import STAGES, main


def test_bench_reports_each_stage_and_the_pipeline(tmp_path, capsys):
    args = ["--size", "256", "--batch", "1", "2", "--prior-steps", "2", "--decoder-steps", "2", "--repeats", "1"]
    assert main([*args, "--json", str(tmp_path / "bench.json")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("batch | text img/s")
    report = json.loads((tmp_path / "bench.json").read_text())
    assert [r["batch"] for r in report["rows"]] == [1, 2] and report["settings"]["size"] == 256
    for row in report["rows"]:
        assert all(row[f"{s}_images_per_s"] > 0 for s in STAGES) and row["pipeline_images_per_s"] > 0
        assert row["slowest_stage"] in STAGES
        assert row["diffusers_images_per_s"] > 0 and row["speedup_vs_diffusers"] > 0  # the baseline ran too
    assert "vs diffusers" in out.splitlines()[0]


def test_bench_refuses_an_unsupported_size(capsys):
    assert main(["--size", "100", "--batch", "1"]) == 2
    assert "--size: 100 is not supported" in capsys.readouterr().err
