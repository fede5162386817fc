"""A smoke of the benchmark command (numbers live in the docs, not in tests): it runs, reports every stage and the
pipeline for each batch size, and writes its JSON."""

import json

import pytest

from jobs.bench import STAGES, main


@pytest.mark.usefixtures("local_ray")  # the Ray pipeline's part runs on the session's local Ray
def test_bench_reports_each_stage_and_the_pipeline(tmp_path, capsys):
    # One batch size: each one costs a Ray pipeline run (about 13 s of start-up here), and the rows are one loop.
    args = ["--size", "256", "--batch", "2", "--prior-steps", "2", "--decoder-steps", "2", "--repeats", "1"]
    args += ["--ray-prompts", "16"]  # four blocks of 4 (jobs.bench_ray.MIN_RAY_BLOCKS, jobs.generate.block_rows)
    assert main([*args, "--json", str(tmp_path / "bench.json")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("batch | text img/s") and "pipeline MFU" in out.splitlines()[0]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert [r["batch"] for r in report["rows"]] == [2] and report["settings"]["size"] == 256
    for row in report["rows"]:
        assert all(row[f"{s}_images_per_s"] > 0 for s in STAGES) and row["pipeline_images_per_s"] > 0
        assert row["slowest_stage"] in STAGES
        assert row["diffusers_images_per_s"] > 0 and row["speedup_vs_diffusers"] > 0  # the baseline ran too
        assert row["ray_images_per_s"] > 0 and row["ray_bottleneck_pool"] in ("Stage C pool", "Stage B/A pool")
        # On one device (this CPU) both pools share it: the bound is its rate doing every stage, below either pool's.
        assert row["ray_bound"] == "one device, every stage"
        assert row["ray_bound_images_per_s"] < row["ray_bottleneck_alone_images_per_s"]
        assert row["ray_vs_bound"] == pytest.approx(row["ray_images_per_s"] / row["ray_bound_images_per_s"])
        assert 0 < row["pipeline_mfu"] < 1 and all(row[f"{s}_mfu"] > 0 for s in STAGES)
    assert report["mfu_peak_flops_per_s"] > 0 and set(report["flops_per_image"]) == set(STAGES)
    assert "vs diffusers" in out.splitlines()[0] and "Ray pipeline img/s" in out.splitlines()[0]


def test_bench_refuses_an_unsupported_size_and_too_few_prompts(capsys, tmp_path, monkeypatch):
    assert main(["--size", "100", "--batch", "1"]) == 2
    assert "--size: 100 is not supported" in capsys.readouterr().err
    # What needs no model is checked before it loads (a full-size one takes minutes), one flag at a time.
    from cascade.family import BUILTIN_MODELS

    monkeypatch.setitem(BUILTIN_MODELS, "tiny", lambda **kw: pytest.fail("the model loaded before the check"))
    (tmp_path / "a-file").write_text("")
    for argv, message in [
        (["--batch", "4", "--ray-prompts", "8"], "--ray-prompts: 8 leaves no steady state to time at batch 4; use 0"),
        (["--batch", "1", "--ray-prompts", "6"], "use 0 (no Ray part) or at least 16 (4 blocks)"),
        (["--prior-steps", "1001"], "--prior-steps: 1001 is not allowed; use 1 to 1000"),
        (["--json", "/proc/bench.json"], "--json: /proc/bench.json cannot be written"),
        (["--batch", "1", "0"], "--batch: 0 is not allowed; use 1 or more"),
        (["--prior-steps", "0"], "--prior-steps: 0 is not allowed; use 1 or more"),
        (["--warmup", "-1"], "--warmup: -1 is not allowed; use 0 or more"),
        (["--size", "0"], "--size: 0 is not allowed"),
        (["--peak-tflops", "0"], "--peak-tflops: 0.0 is not allowed; use a finite rate above 0"),
        (["--peak-tflops", "inf"], "--peak-tflops: inf is not allowed; use a finite rate above 0"),
        (["--json", str(tmp_path)], f"--json: {tmp_path} is a folder; give a file name"),
        (["--json", str(tmp_path / "a-file" / "b.json")], "--json: "),
    ]:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert main(["--model", "/nonexistent/weights"]) == 3  # as the job: exit 3, the folder named
    assert "error: /nonexistent/weights: weights folder not found" in capsys.readouterr().err


QUICK = ["--size", "256", "--batch", "1", "--prior-steps", "1", "--decoder-steps", "1", "--repeats", "1"]
QUICK += ["--warmup", "0", "--ray-prompts", "0"]


def test_a_bench_stopped_part_way_keeps_the_figures_it_measured(tmp_path, capsys, monkeypatch):
    """Each figure is printed and written as it comes: a GPU session's part that runs out of time (compiling can take
    minutes) still leaves the stages it timed, marked as a partial row."""
    import jobs.bench

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # stopped after the four stages (a time limit's SIGTERM ends it at any point)

    monkeypatch.setattr(jobs.bench, "pipeline_call", stopped)
    assert main([*QUICK, "--no-diffusers", "--json", str(tmp_path / "bench.json")]) == 130  # as Ctrl-C: no traceback
    (row,) = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert row["partial"] is True and all(row[f"{s}_images_per_s"] > 0 for s in STAGES)
    assert "pipeline_s" not in row
    err = capsys.readouterr().err
    assert all(f"[bench] batch 1: {s} " in err for s in STAGES) and "images/s, MFU " in err
    assert f"[bench] interrupted: the figures so far are in {tmp_path / 'bench.json'}" in err


def test_a_diffusers_baseline_that_fails_costs_only_its_column(tmp_path, capsys, monkeypatch):
    import jobs.bench_diffusers

    def broken(self, *args):
        raise RuntimeError("Failed to import diffusers.pipelines.stable_cascade (an example)")

    monkeypatch.setattr(jobs.bench_diffusers.DiffusersTwin, "call", broken)
    assert main([*QUICK, "--json", str(tmp_path / "bench.json")]) == 0
    (row,) = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert row["pipeline_images_per_s"] > 0 and "partial" not in row
    assert row["diffusers_error"] == "RuntimeError: Failed to import diffusers.pipelines.stable_cascade (an example)"
    captured = capsys.readouterr()
    assert "diffusers failed, no baseline figure: RuntimeError" in captured.err
    assert "vs diffusers" not in captured.out.splitlines()[0]

    def unbuildable(self, models):
        raise RuntimeError("no such pipeline")

    monkeypatch.setattr(jobs.bench_diffusers.DiffusersTwin, "__init__", unbuildable)
    assert main(QUICK) == 0
    assert (
        "diffusers failed to build its pipelines, no baseline: RuntimeError: no such pipeline"
        in capsys.readouterr().err
    )


def test_the_ray_pipeline_s_steady_rate_leaves_out_the_first_block():
    from jobs.bench_ray import steady_rate

    # A block of 4 written together at t = 10 s, then one image a second: 4 images in 4 s, not 7 in 4 s.
    ends = [10.0, 10.02, 10.04, 10.06, 11.06, 12.06, 13.06, 14.06]
    assert steady_rate(ends, 4) == pytest.approx(1.0, rel=1e-3)


def test_the_ray_pipeline_s_bound_is_the_shared_device_or_the_bottleneck_pool_on_its_own_gpus():
    from jobs.bench_ray import pool_seconds, ray_bound

    seconds = {"text": 0.1, "stage_c": 1.9, "stage_b": 2.5, "stage_a": 0.5}  # pools: 2.0 and 3.0 s per batch
    for devices in (0, 1):  # the CPU's cores, or one GPU shared half and half: it does all the work
        assert ray_bound(pool_seconds(seconds), devices) == ("Stage B/A pool", "one device, every stage", 5.0)
    assert ray_bound(pool_seconds(seconds), 2) == ("Stage B/A pool", "Stage B/A pool alone", 3.0)
    seconds["stage_c"] = 3.9
    assert ray_bound(pool_seconds(seconds), 8) == ("Stage C pool", "Stage C pool alone", 4.0)


def test_the_ray_pipeline_runs_the_job_with_the_bench_s_compile_and_fp8(monkeypatch):
    """With --compile --fp8 the Ray part times the job with the same settings (its fp8: float8 Stage C, compiled), and
    the flags it passes are ones the job takes. (The job is stood in for: a compiled Ray run takes minutes here.)"""
    import argparse

    import jobs.generate
    from jobs.bench_ray import ray_pipeline
    from jobs.config import resolve

    runs = []

    def job(argv):
        runs.append(resolve(jobs.generate.build_parser().parse_args(argv)))
        return 1  # (stops the part before it reads manifests)

    monkeypatch.setattr(jobs.generate, "main", job)
    bench = dict(ray_prompts=16, model="tiny", size=256, dtype="auto", prior_steps=2, decoder_steps=2)
    for flags, expected in [
        ({"compile": True, "fp8": True}, (True, True)),
        ({"compile": True, "fp8": False}, (True, False)),
    ]:
        with pytest.raises(RuntimeError, match="the Ray pipeline's job failed with exit code 1"):
            ray_pipeline(argparse.Namespace(**bench, **flags), 2, {}, 0)
        assert (runs[-1].compile, runs[-1].fp8) == expected
    monkeypatch.setattr(jobs.generate, "main", lambda argv: 130)  # the job interrupted (Ctrl-C): so is the bench
    with pytest.raises(KeyboardInterrupt):
        ray_pipeline(argparse.Namespace(**bench, compile=False, fp8=False), 2, {}, 0)
