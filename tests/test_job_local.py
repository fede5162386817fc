"""The whole job on a local Ray with fake GPUs: every prompt rendered once, manifests, resume, overwrite, report."""

import contextlib
import io
import json
import math
from importlib.metadata import version

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from jobs.generate import main
from jobs.manifest import SUCCESS, manifest_keys, read_manifests
from tests.jobhelpers import FAST, check_output, prompts_table, tar_bytes
from workers.storage import LocalStorage

pytestmark = pytest.mark.usefixtures("local_ray")


def run_job(prompts, out, *flags):
    return main(["--prompts", str(prompts), "--out", str(out), *FAST, *flags])


@contextlib.contextmanager
def failing_storage(monkeypatch, put: str = "", delete: str = "\0"):
    """The job's output storage fails writes of the key `put`, and deletes that include a key starting `delete`."""
    from workers.storage import StorageError

    class Failing(LocalStorage):
        def put(self, key, data, **kw):
            if key == put:
                raise StorageError(f"writing {key} failed: injected")
            return super().put(key, data, **kw)

        def delete(self, keys):
            if any(k.startswith(delete) for k in keys):
                raise StorageError("deleting an image failed: injected")
            super().delete(keys)

    with monkeypatch.context() as m:
        m.setattr("workers.storage.open_storage", lambda url, attempts=10: Failing(url))
        yield


def test_job_renders_resumes_and_starts_over(tmp_path, capsys, monkeypatch):
    table = prompts_table(5, num_images=[1, 2, 1, 2, 1])
    table = table.append_column("id", __import__("pyarrow").array(["p0", "a/../b", "p2", "p3", "p4"]))
    rows = table.to_pylist()
    rows[3]["prompt"] = "   "  # becomes an error row for each of its 2 images, the job goes on
    pq.write_table(table.from_pylist(rows, schema=table.schema), tmp_path / "prompts.parquet")
    out = LocalStorage(tmp_path / "out")

    # Both pools ask for a (fake) GPU each: the Stage C and Stage B/A actors are scheduled side by side.
    assert run_job(tmp_path / "prompts.parquet", out.root, "--prior-pool-gpus", "1", "--decoder-pool-gpus", "1") == 0
    manifest = check_output(out, 7)
    rows = {(r["id"], r["image_index"]): r for r in manifest.to_pylist()}
    assert (
        rows[("p3", 0)]["status"] == "error" and rows[("p3", 0)]["error"] == "prompt: empty" == rows[("p3", 1)]["error"]
    )
    assert rows[("a/../b", 1)]["status"] == "ok" and rows[("a/../b", 1)]["key"].startswith("images/")
    assert rows[("p2", 0)]["style"] == "s2"  # extra columns travel untouched
    assert rows[("p0", 0)]["model"] == "tiny" and len(rows[("p0", 0)]["model_digest"]) == 16
    assert rows[("p0", 0)]["prior_actor"].startswith("prior@") and rows[("p0", 0)]["decoder_actor"].startswith(
        "decoder@"
    )
    image = Image.open(io.BytesIO(out.get(rows[("p0", 0)]["key"])))
    assert image.size == (256, 256) and image.text["prompt"] == "a red circle number 0"
    assert image.text["seed"] == str(rows[("p0", 0)]["seed"])
    summary = json.loads(out.get(SUCCESS))
    assert (summary["ok"], summary["errors"], summary["rendered_this_run"]) == (5, 2, 7)
    assert summary["images_per_s"] == pytest.approx(5 / summary["wall_s"], abs=2e-4)  # images made: not error rows
    assert summary["latent_queue_bytes_per_image"] > 0 and summary["config"]["width"] == 256
    assert summary["actor_gpus"] == {"prior_pool": 1, "decoder_pool": 1}  # the GPUs each actor had
    made_by = summary["versions"]  # what made the images, read without importing transformers in the driver
    assert made_by["transformers"] == version("transformers") and made_by["torch"] == torch.__version__
    report = out.get("report.html").decode()
    assert "Stage C pool" in report and "data:image/jpeg;base64," in report
    err = capsys.readouterr().err
    assert "7/7 images (100.0%)" in err

    # A rerun finds everything done and leaves the output as it is.
    parts, success, report = manifest_keys(out), out.get(SUCCESS), out.get("report.html")
    assert run_job(tmp_path / "prompts.parquet", out.root) == 0
    assert manifest_keys(out) == parts and out.get(SUCCESS) == success and out.get("report.html") == report
    err = capsys.readouterr().err
    assert "is complete" in err and "other settings" not in err
    # A rerun with other image settings keeps the images too, and says that the output would mix them.
    assert run_job(tmp_path / "prompts.parquet", out.root, "--image-format", "webp", "--seed", "7") == 0
    assert manifest_keys(out) == parts and out.get(SUCCESS) == success
    err = capsys.readouterr().err
    assert "made with other settings: seed 0 (now 7); image_format 'png' (now 'webp'). They stay" in err
    assert "rerun with --overwrite" in err and "is complete" in err

    # Complete but without _SUCCESS (a crash just before it): the rerun only writes it, with a report on all runs.
    out.delete([SUCCESS])
    with failing_storage(monkeypatch, put=SUCCESS):  # and the storage fails as it is written: exit 1, a clear line
        assert run_job(tmp_path / "prompts.parquet", out.root) == 1
    err = capsys.readouterr().err
    assert "error: writing _SUCCESS failed: injected" in err and "Traceback" not in err and not out.exists(SUCCESS)
    assert run_job(tmp_path / "prompts.parquet", out.root) == 0
    assert json.loads(out.get(SUCCESS))["rendered_this_run"] == 0 and json.loads(out.get(SUCCESS))["ok"] == 5
    assert "All runs" in out.get("report.html").decode() and "data:image/jpeg" in out.get("report.html").decode()

    # A lost image, an image whose bytes changed but kept their size (which a plain resume, from one listing of
    # names and sizes, cannot see; --verify reads every image back) and an error row (--retry-errors; still an error:
    # the prompt is empty) are rendered again, their old manifest rows replaced. Nothing else.
    lost, changed = rows[("p4", 0)]["key"], rows[("p2", 0)]["key"]
    out.delete([lost])
    data = bytearray(out.get(changed))
    data[-20] ^= 0xFF
    out.put(changed, bytes(data))
    # First a resume whose storage fails as it removes the changed image (and an --overwrite whose storage fails as
    # it clears the images): _SUCCESS goes before anything else, so an output that changed never claims to be whole.
    with failing_storage(monkeypatch, delete="images/"):
        success = out.get(SUCCESS)
        assert run_job(tmp_path / "prompts.parquet", out.root, "--verify", "--retry-errors") == 1
        assert not out.exists(SUCCESS) and out.exists(changed)
        assert not out.exists("report.html")  # (it went with _SUCCESS: it told of the run that wrote that)
        out.put(SUCCESS, success)
        assert run_job(tmp_path / "prompts.parquet", out.root, "--overwrite") == 1
        assert not out.exists(SUCCESS) and out.exists(changed)
        assert "rerun the same command without --overwrite" in capsys.readouterr().err  # it would start over again
    assert run_job(tmp_path / "prompts.parquet", out.root, "--verify", "--retry-errors") == 0
    manifest = check_output(out, 7)  # which checks every stored image against its manifest's sha256
    assert json.loads(out.get(SUCCESS))["rendered_this_run"] == 4 and out.exists(lost)
    assert out.get(changed) != bytes(data)
    latest = max(manifest.column("run_id").to_pylist())
    again = {(r["id"], r["image_index"]) for r in manifest.to_pylist() if r["run_id"] == latest}
    assert again == {("p2", 0), ("p3", 0), ("p3", 1), ("p4", 0)}

    # --overwrite starts over.
    assert run_job(tmp_path / "prompts.parquet", out.root, "--overwrite") == 0
    check_output(out, 7)
    assert json.loads(out.get(SUCCESS))["rendered_this_run"] == 7

    # An image cut short (another size than its row records): a plain resume, from the listing alone, renders it again.
    key = next(r["key"] for r in read_manifests(out).to_pylist() if r["status"] == "ok")
    out.put(key, out.get(key)[:100])
    assert run_job(tmp_path / "prompts.parquet", out.root) == 0
    assert json.loads(out.get(SUCCESS))["rendered_this_run"] == 1 and len(out.get(key)) > 100
    check_output(out, 7)

    # A run that stopped before any manifest part (images stored, no rows), then a rerun with another seed: the
    # images nothing describes are rendered again, not adopted with rows stating the new seed beside the old pixels.
    # An image of a format no longer written (a stray no row names) goes too.
    out.delete(manifest_keys(out) + [SUCCESS])
    out.put("images/00/p0-0.webp", b"an earlier run's")
    assert run_job(tmp_path / "prompts.parquet", out.root, "--seed", "7") == 0
    manifest = check_output(out, 7)  # no image that no row describes, none twice
    assert json.loads(out.get(SUCCESS))["rendered_this_run"] == 7
    for row in manifest.to_pylist():
        if row["status"] == "ok":
            assert Image.open(io.BytesIO(out.get(row["key"]))).text["seed"] == str(row["seed"])


def test_sigterm_stops_the_job_as_ctrl_c_does(tmp_path, capsys):
    """`ray job stop`, a scheduler or a container's shutdown sends the driver SIGTERM: the job writes the manifest
    rows it has received (fewer than a part holds, so none were written before), says how to resume and exits 130;
    the rerun renders only the rest. In a process of its own, as a user runs it: the job's ray.init() sets a SIGTERM
    handler of Ray's, which the job's must follow."""
    import re
    import signal
    import subprocess
    import sys

    pq.write_table(prompts_table(24), tmp_path / "p.parquet")
    out = LocalStorage(tmp_path / "out")
    argv = [sys.executable, "-m", "jobs.generate", "--prompts", str(tmp_path / "p.parquet"), "--out", str(out.root)]
    argv += [*FAST, "--manifest-rows", "1000", "--progress-seconds", "0.01"]
    job = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    seen = 0
    try:
        for line in job.stderr:  # the driver's progress line: rows of stored images have reached it
            progress = re.search(r"\] (\d+)/24 images", line)
            if progress and int(progress.group(1)) > 0:
                seen = int(progress.group(1))
                break
        job.send_signal(signal.SIGTERM)
        rest = job.stderr.read()
        code = job.wait(120)
    finally:
        job.kill()
    assert 0 < seen < 24 and code == 130, (seen, code, rest[-2000:])
    assert "interrupted: rerun the same command to resume" in rest
    written = read_manifests(out)
    assert written is not None and seen <= written.num_rows < 24  # the rows it had, written on the way out
    assert run_job(tmp_path / "p.parquet", out.root) == 0
    assert f"resuming: {written.num_rows} images done" in capsys.readouterr().err
    check_output(out, 24)


def test_pools_that_can_never_fit_on_the_job_s_own_ray_are_refused_at_once(tmp_path):
    """With no RAY_ADDRESS the job starts a Ray of its own on this machine, which no autoscaler will grow: a pool
    that fits nowhere (2 GPUs an actor here, where the machine has none) is a settings error, exit 2, not a wait of
    node_wait_seconds and an exit 1 that asks for a rerun. In its own process: the tests' Ray is a shared one."""
    import os
    import subprocess
    import sys

    from jobs.generate import machine_cpus

    pq.write_table(prompts_table(2), tmp_path / "p.parquet")
    argv = [sys.executable, "-m", "jobs.generate", "--prompts", str(tmp_path / "p.parquet"), "--out", str(tmp_path)]
    argv += [*FAST, "--prior-pool-gpus", "2", "--node-wait-seconds", "3600", "--no-report"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    cpus = machine_cpus()  # (the machine's, not the more slots its private Ray has: jobs.generate.local_cpus)
    assert (
        f"error: this machine (CPU {cpus}) can never run the Stage C pool (one needs GPU 2); the job started its own "
        "Ray here, which adds no nodes. Lower the pools' gpus"
    ) in done.stderr, done.stderr[-3000:]
    assert read_manifests(LocalStorage(tmp_path)) is None


def test_job_on_s3_in_and_out_leaks_no_secret(s3_bucket, tmp_path, capfd):
    """Credentials only in the standard AWS variables (this process's and the Ray workers'), prompts and outputs on
    the S3 server. (A job in its own process on S3 is the storage-faults test.)"""
    from tests.jobhelpers import parquet_bytes
    from tests.servers import S3_SECRET_KEY
    from workers.storage import open_storage

    bucket = open_storage(f"s3://{s3_bucket}")
    bucket.put("in/part-0.parquet", parquet_bytes(prompts_table(3)))
    bucket.put("in/part-1.parquet", parquet_bytes(prompts_table(2)))
    flags = ["--image-format", "jpeg", "--quality", "80", "--prior-pool-batch-size", "2"]
    assert run_job(f"s3://{s3_bucket}/in/", f"s3://{s3_bucket}/runs/one", *flags) == 0
    out = open_storage(f"s3://{s3_bucket}/runs/one")
    manifest = check_output(out, 5)
    assert sorted(manifest.column("id").to_pylist()) == [f"part-0.parquet:{i}" for i in range(3)] + [
        f"part-1.parquet:{i}" for i in range(2)
    ]
    key = manifest.column("key")[0].as_py()
    assert key.endswith(".jpeg") and Image.open(io.BytesIO(out.get(key))).format == "JPEG"
    # The secret is nowhere: not in any object written, not in the logs (the driver's and, through it, the workers').
    for k, _ in bucket.list("runs"):
        assert S3_SECRET_KEY.encode() not in bucket.get(k), k
    logs = capfd.readouterr()
    assert "done: 5 images ok" in logs.err and S3_SECRET_KEY not in logs.err + logs.out


def test_bad_input_fails_before_any_model_loads(tmp_path, capsys):
    pq.write_table(prompts_table(2).drop_columns(["prompt"]), tmp_path / "noprompt.parquet")
    assert run_job(tmp_path / "noprompt.parquet", tmp_path / "out") == 2
    assert "has no 'prompt' column" in capsys.readouterr().err
    assert run_job(tmp_path / "missing.parquet", tmp_path / "out") == 2
    pq.write_table(prompts_table(2), tmp_path / "ok.parquet")
    assert run_job(tmp_path / "ok.parquet", tmp_path / "out", "--model", str(tmp_path / "no-weights")) == 3
    assert "neither a built-in model" in capsys.readouterr().err
    assert run_job(tmp_path / "ok.parquet", tmp_path / "out", "--width", "100") == 2
    assert "width: 100 is not supported" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert read_manifests(LocalStorage(tmp_path / "out")) is None


def test_a_file_without_ids_that_changed_since_the_output_was_made_stops_the_resume(tmp_path, capsys):
    """Rows without an id are known by position: with a row inserted at the top, a resume took the prompts now at
    the rendered positions as done (the new last prompt got the old last one's image) and never rendered the new
    one. The manifests record each such file's prompts digest and rows; a resume over a changed file stops, exit 2
    (one with rows appended goes on)."""
    pq.write_table(prompts_table(3), tmp_path / "p.parquet")
    out = LocalStorage(tmp_path / "out")
    assert run_job(tmp_path / "p.parquet", out.root, "--no-report") == 0
    pq.write_table(prompts_table(3), tmp_path / "p.parquet", row_group_size=1)  # the same prompts, written anew
    assert run_job(tmp_path / "p.parquet", out.root, "--no-report") == 0
    assert "nothing to do" in capsys.readouterr().err
    rows = prompts_table(4).to_pylist()
    pq.write_table(prompts_table(4), tmp_path / "p.parquet")  # a row appended: the rendered rows are as they were
    assert run_job(tmp_path / "p.parquet", out.root, "--no-report") == 0
    assert json.loads(out.get(SUCCESS))["rendered_this_run"] == 1
    new_first = prompts_table(0).from_pylist([{"prompt": "a new first row", "style": "n"}, *rows])
    pq.write_table(new_first, tmp_path / "p.parquet")
    parts = manifest_keys(out)
    assert run_job(tmp_path / "p.parquet", out.root, "--no-report") == 2
    assert (
        "error: prompts: p.parquet changed since earlier runs wrote this output, and its rows have no id column"
        in capsys.readouterr().err
    )
    assert manifest_keys(out) == parts and out.exists(SUCCESS)  # nothing changed
    assert run_job(tmp_path / "p.parquet", out.root, "--no-report", "--overwrite") == 0
    prompts = {r["row"]: r["prompt"] for r in check_output(out, 5).to_pylist()}
    assert prompts == {0: "a new first row", **{i + 1: r["prompt"] for i, r in enumerate(rows)}}


def test_a_second_run_on_an_output_a_run_is_writing_stops_before_changing_it(tmp_path, capsys):
    from jobs.lease import take

    pq.write_table(prompts_table(2), tmp_path / "p.parquet")
    out = LocalStorage(tmp_path / "out")
    with take(out, "20261129T000000Z-abcdef", print):  # the first run, alive in this process
        assert run_job(tmp_path / "p.parquet", out.root, "--overwrite") == 2
        assert [k for k, _ in out.list()] == ["_LEASE"]  # nothing else written, nothing deleted
    err = capsys.readouterr().err
    assert "error: --out: another run is writing to this output: run 20261129T000000Z-abcdef (host " in err
    assert run_job(tmp_path / "p.parquet", out.root, "--no-report") == 0  # the lease went with the first run
    assert not out.exists("_LEASE")
    check_output(out, 2)


def test_a_model_that_fails_to_load_on_a_node_exits_3_naming_it(tmp_path, capsys):
    """The driver checks the stages' files and that a text encoder is there before Ray starts; one whose weights are
    gone is found only by the Stage C actor loading it. The job says so and exits 3 (a rerun would fail alike), not
    1 with 'rerun to resume'."""
    from cascade import save_stage, tiny_models

    tiny, folder = tiny_models(), tmp_path / "weights"
    tiny.text_encoder.model.save_pretrained(folder / "text_encoder")
    for stage in ("stage_c", "stage_b", "stage_a"):
        save_stage(getattr(tiny, stage), folder / f"{stage}.safetensors")
    for f in (folder / "text_encoder").glob("model*.safetensors"):
        f.unlink()
    pq.write_table(prompts_table(2), tmp_path / "ok.parquet")
    flags = ["--model", str(folder), "--no-report"]
    assert main(["--prompts", str(tmp_path / "ok.parquet"), "--out", str(tmp_path / "out"), *FAST[2:], *flags]) == 3
    err = capsys.readouterr().err
    assert "error: the model cannot be loaded on a node: " in err and "text encoder could not be loaded" in err


def test_a_damaged_input_file_found_as_it_is_read_exits_2_naming_it_and_a_rerun_after_replacing_it_resumes(
    tmp_path, capsys
):
    """The plan reads footers and ids only, so a damaged prompt page is found by a read task, mid-job: exit 2 with
    the file and rows named (not 1 and "rerun to resume", which would meet it again); what was stored is kept."""
    (tmp_path / "in").mkdir()
    pq.write_table(prompts_table(2, id=["a0", "a1"]), tmp_path / "in/a.parquet")
    table = prompts_table(40, id=[f"b{i}" for i in range(40)])
    pq.write_table(table, tmp_path / "in/b.parquet")
    data = bytearray((tmp_path / "in/b.parquet").read_bytes())
    chunk = pq.ParquetFile(tmp_path / "in/b.parquet").metadata.row_group(0).column(0)  # the prompts
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    data[start : start + 12] = b"\xff" * 12
    (tmp_path / "in/b.parquet").write_bytes(bytes(data))
    assert run_job(tmp_path / "in", tmp_path / "out", "--no-report") == 2
    err = capsys.readouterr().err
    assert f"error: prompts: {tmp_path / 'in/b.parquet'} rows 0 to 40: the file cannot be read (OSError: " in err
    assert "it is damaged: replace it; the images stored so far are kept" in err
    pq.write_table(table, tmp_path / "in/b.parquet")
    assert run_job(tmp_path / "in", tmp_path / "out", "--no-report") == 0
    check_output(LocalStorage(tmp_path / "out"), 42)


def test_writers_that_no_node_can_run_stop_the_job_naming_writer_cpus(s3_bucket, tmp_path, capsys):
    """The writer tasks need `writer_cpus` beside the actors; asking for more than any node has would leave the
    stream stopped at its last stage. The node watch says so and stops the job (exit 1) after node_wait_seconds.
    With a local --out the writers must run on the driver's node: more than it has is refused at once (exit 2)."""
    pq.write_table(prompts_table(2), tmp_path / "ok.parquet")
    flags = ["--writer-cpus", "64", "--node-wait-seconds", "3", "--no-report"]
    assert run_job(tmp_path / "ok.parquet", f"s3://{s3_bucket}/out", *flags) == 1
    err = capsys.readouterr().err
    assert "no live node can run the writer tasks (one task needs CPU 64) for 3 s" in err and "writer_cpus" in err
    assert run_job(tmp_path / "ok.parquet", tmp_path / "out", *flags) == 2
    err = capsys.readouterr().err
    assert (
        "local paths: the tasks that read the prompts and write the images must run on the driver's node, which "
        "has 2 CPUs; they need 64 (writer_cpus for the writers, 1 for a read): use s3:// paths"
    ) in err
    # ... before --overwrite deletes an earlier output.
    assert run_job(tmp_path / "ok.parquet", tmp_path / "out", "--no-report", "--dry-run") == 0
    stored = sorted(p.relative_to(tmp_path) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert run_job(tmp_path / "ok.parquet", tmp_path / "out", *flags, "--dry-run", "--overwrite") == 2
    assert "must run on the driver's node" in capsys.readouterr().err
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "out").rglob("*") if p.is_file()) == stored


def test_dry_run_moves_full_size_data_through_every_stage(tmp_path):
    pq.write_table(prompts_table(64), tmp_path / "prompts.parquet")
    out = LocalStorage(tmp_path / "out")
    flags = ["--model", "tiny", "--dry-run", "--width", "1024", "--height", "1024", "--prior-pool-batch-size", "32"]
    assert main(["--prompts", str(tmp_path / "prompts.parquet"), "--out", str(out.root), *flags]) == 0
    manifest = check_output(out, 64)
    assert set(manifest.column("model").to_pylist()) == {"dry-run"}
    assert manifest.column("prior_s").null_count == manifest.column("decoder_s").null_count == 64  # no maths timed
    image = Image.open(io.BytesIO(out.get(manifest.column("key")[0].as_py())))
    assert image.size == (1024, 1024)
    # A full-size Stage C latent (16 x 24 x 24 bf16) and two pooled embeddings (2 x 1280 bf16) per image, plus metadata.
    per_image = json.loads(out.get(SUCCESS))["latent_queue_bytes_per_image"]
    assert 16 * 24 * 24 * 2 + 2 * 1280 * 2 <= per_image < 16 * 24 * 24 * 2 + 2 * 1280 * 2 + 2000


def test_an_output_the_storage_refuses_is_a_configuration_error(s3_bucket, tmp_path, monkeypatch, capsys):
    """A missing output bucket or refused credentials stop the job before any work with exit 2 and what to check, not
    exit 1 and advice to rerun (which would meet the same refusal)."""
    pq.write_table(prompts_table(2), tmp_path / "p.parquet")
    assert run_job(tmp_path / "p.parquet", "s3://no-such-bucket-here/out") == 2
    err = capsys.readouterr().err
    assert (
        "error: --out: listing s3://no-such-bucket-here/out/manifests failed: NoSuchBucket (HTTP 404): the storage "
        in err
    )
    assert "check the bucket, the endpoint, the region and the credentials" in err and "rerun" not in err
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    assert run_job(tmp_path / "p.parquet", f"s3://{s3_bucket}/out") == 2
    err = capsys.readouterr().err
    assert "failed: SignatureDoesNotMatch (HTTP 403): the storage refused it" in err and "rerun" not in err


def test_a_refusal_during_the_run_says_what_to_fix():
    """Inside Ray the error arrives as the text of Ray's report (jobs.generate.raised)."""
    from jobs.generate import failure

    report = RuntimeError(
        "ray.exceptions.RayTaskError(UserCodeException): ray::Write()\n"
        "workers.storage.StorageRefused: writing s3://b/out/images/x.png failed: ExpiredToken (HTTP 400)"
    )
    assert failure(report) == (
        "writing s3://b/out/images/x.png failed: ExpiredToken (HTTP 400): the storage refused it; check the bucket, "
        "the endpoint, the region and the credentials"
    )
    outage = RuntimeError("workers.storage.StorageError: writing s3://b/out/x.png failed: InternalError (HTTP 500)")
    assert failure(outage).endswith("InternalError (HTTP 500) (after the retries set by storage_attempts)")


def test_mixed_sizes_and_steps_run_in_full_batches_of_one_bucket(tmp_path):
    # Rows interleave three buckets (size, steps): each pool's batch must still be one bucket and full, not three
    # small batches (a block of 4 rows holding 3 buckets runs 3 model batches).
    widths, steps = [256, 512, 256] * 8, [2, 2, 3] * 8
    table = prompts_table(24, width=widths, prior_steps=steps)
    pq.write_table(table, tmp_path / "prompts.parquet")
    out = LocalStorage(tmp_path / "out")
    assert run_job(tmp_path / "prompts.parquet", out.root, "--dry-run", "--no-report") == 0
    rows = check_output(out, 24).to_pylist()
    for part in ("prior", "decoder"):
        batches = {}
        for r in rows:  # a pool batch: one actor's call, all its rows stamped with the call's start
            batches.setdefault((r[f"{part}_actor"], r[f"{part}_start"]), []).append((r["width"], r["prior_steps"]))
        assert sorted(len(b) for b in batches.values()) == [4] * 6, part
        assert all(len(set(b)) == 1 for b in batches.values()), part
        assert {r[f"{part}_batch"] for r in rows} == {4}, part  # what each image's model batch held


def test_webdataset_shards_hold_every_image_once_and_resume(tmp_path, capsys):
    import tarfile

    from jobs.inputs import RESERVED
    from workers.storage import sha256_hex

    # Input columns named as the pipeline's own (the writer's member, the manifest's run_id) travel renamed.
    users = {"member": [f"m{i}" for i in range(10)], "run_id": [f"r{i}" for i in range(10)]}
    # pandas writes a missing float as NaN
    users["score"] = [0.5, float("nan"), None, 1.0, float("inf"), 2.0, 3.0, 4.0, 5.0, 6.0]
    pq.write_table(prompts_table(10, **users), tmp_path / "prompts.parquet")
    out = LocalStorage(tmp_path / "out")
    argv = ["--prompts", str(tmp_path / "prompts.parquet"), "--out", str(out.root), *FAST, "--image-format", "jpeg"]
    assert main([*argv, "--layout", "webdataset", "--shard-size", "3"]) == 0
    table = read_manifests(out)
    assert set(table.column_names) - RESERVED == {"style", "input_member", "input_run_id", "score"}
    assert sorted(table.column("input_member").to_pylist()) == users["member"]

    def members() -> dict:
        found = {}
        for key, _ in out.list("shards"):
            with tarfile.open(fileobj=io.BytesIO(out.get(key))) as tar:
                for m in tar.getmembers():
                    found[(key, m.name)] = tar.extractfile(m).read()
        return found

    manifest = read_manifests(out).to_pylist()
    stored = members()
    assert len(manifest) == 10 and len({(r["id"], r["image_index"]) for r in manifest}) == 10
    assert len(stored) == 10 * 3 and not list(out.list("images"))  # image, .txt, .json per sample
    # Full shards: 3 + 3 + 3 + 1. (The decoder's blocks of 4 rows made shards of 3 + 1 + 3 + 1 + 2: Ray Data batches
    # whole blocks, and each block's rest became a shard of its own.)
    assert sorted(sum(1 for r in manifest if r["key"] == k) for k in {r["key"] for r in manifest}) == [1, 3, 3, 3]
    for row in manifest:
        image = stored[(row["key"], row["member"])]
        assert sha256_hex(image) == row["sha256"] and "." not in row["member"].rsplit(".", 1)[0]
        assert row["member"].endswith(".jpg")  # as img2dataset names a JPEG (WebDataset's to_tuple("jpg"))
        assert row["shard_images"] == sum(1 for r in manifest if r["key"] == row["key"])
        stem = row["member"].rsplit(".", 1)[0]
        assert stored[(row["key"], stem + ".txt")].decode() == row["prompt"]

        def strict(constant):
            raise ValueError(f"{constant} is not JSON")

        meta = json.loads(stored[(row["key"], stem + ".json")], parse_constant=strict)  # what JSON.parse reads
        assert (meta["id"], meta["seed"], meta["style"]) == (row["id"], row["seed"], row["style"])
        score = row["score"]
        assert meta["score"] == (score if score is not None and math.isfinite(score) else None)
        assert meta["key"] == stem  # the sample's key, as img2dataset's json has it

    # A lost shard, one changed member in another and a third shard garbled at its start (its size unchanged): one
    # resume with --verify renders the lost and the garbled shards' images and the whole changed shard again (a shard
    # is one object).
    lost = manifest[0]["key"]
    lost_rows = sum(1 for r in manifest if r["key"] == lost)
    out.delete([lost])
    row = next(r for r in manifest if r["key"] != lost)
    with tarfile.open(fileobj=io.BytesIO(out.get(row["key"]))) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    files[row["member"]] = files[row["member"]][:-1] + b"\0"
    out.put(row["key"], tar_bytes(files))
    in_shard = sum(1 for r in manifest if r["key"] == row["key"])
    garbled = sorted({r["key"] for r in manifest} - {lost, row["key"]})[0]
    garbled_rows, data = sum(1 for r in manifest if r["key"] == garbled), out.get(garbled)
    out.put(garbled, b"\xff" * 512 + data[512:])
    # And a shard no manifest row names (a run that stopped before writing its rows): removed, not left to duplicate.
    orphan = "shards/" + "0" * 20 + ".tar"
    out.put(orphan, data)
    capsys.readouterr()
    assert main([*argv, "--layout", "webdataset", "--shard-size", "3", "--verify"]) == 0
    # The tampered and the garbled shard and the orphan, said (they were deleted silently).
    assert "removed 3 stored objects that no manifest row names" in capsys.readouterr().err
    manifest = read_manifests(out).to_pylist()
    assert len(manifest) == 10 and len({(r["id"], r["image_index"]) for r in manifest}) == 10
    assert json.loads(out.get(SUCCESS))["rendered_this_run"] == lost_rows + in_shard + garbled_rows
    stored = members()
    assert all(sha256_hex(stored[(r["key"], r["member"])]) == r["sha256"] for r in manifest)
    assert {key for key, _ in stored} == {r["key"] for r in manifest}  # every shard named by a row, the orphan gone


def test_nan_from_fp16_overflow_is_an_error_row_never_a_black_image(tmp_path):
    """A weights folder whose embedding of the word "overflow" is finite in fp32 but beyond fp16's range (65504):
    in fp16, prompts with that word give NaN in Stage C's latent. That image is an error row naming the stage; no
    picture is stored for it; the other prompts render and the job completes."""
    from cascade import save_stage, tiny_models
    from cascade.text import save_tokenizer

    tiny = tiny_models()
    (word,) = tiny.text_encoder.tokenizer("overflow", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        tiny.text_encoder.model.get_input_embeddings().weight[word] = 1e5
    folder = tmp_path / "weights"
    tiny.text_encoder.model.save_pretrained(folder / "text_encoder")
    save_tokenizer(folder / "tokenizer", tiny.text_encoder.tokenizer)
    for stage in ("stage_c", "stage_b", "stage_a"):
        save_stage(getattr(tiny, stage), folder / f"{stage}.safetensors")
    prompts = ["a red circle", "an overflow square", "a blue square"]
    pq.write_table(__import__("pyarrow").table({"prompt": prompts}), tmp_path / "prompts.parquet")
    out = LocalStorage(tmp_path / "out")

    assert run_job(tmp_path / "prompts.parquet", out.root, "--model", str(folder), "--dtype", "fp16") == 0
    manifest = {r["prompt"]: r for r in check_output(out, 3).to_pylist()}
    assert manifest["an overflow square"]["status"] == "error"
    assert manifest["an overflow square"]["error"] == "Stage C produced NaN/Inf in the latent"
    assert len(list(out.list("images"))) == 2
    for prompt in ("a red circle", "a blue square"):
        pixels = np.asarray(Image.open(io.BytesIO(out.get(manifest[prompt]["key"]))))
        assert manifest[prompt]["status"] == "ok" and pixels.std() > 1  # a picture, not a flat black square


def test_a_long_input_runs_in_segments_and_a_resume_runs_only_those_with_work(tmp_path, capsys):
    """Also: long and unusual prompts render and are recorded exactly."""
    unusual = ["a red circle " * 770, "🙂 a smiling emoji 🎨", "עיגול אדום على خلفية زرقاء", "a red\0circle"]
    table = prompts_table(5)
    table = table.set_column(0, "prompt", __import__("pyarrow").array([*unusual, table["prompt"][4].as_py()]))
    pq.write_table(table, tmp_path / "prompts.parquet", row_group_size=2)
    out = LocalStorage(tmp_path / "out")
    assert run_job(tmp_path / "prompts.parquet", out.root, "--segment-rows", "3") == 0
    manifest = check_output(out, 5)
    err = capsys.readouterr().err
    assert all(f"segment {k}/2" in err for k in (1, 2))  # rows 0-2 and 3-4: one splits a row group

    rows = {r["prompt"]: r for r in manifest.to_pylist()}
    assert set(unusual) <= set(rows)  # the manifest keeps every prompt exactly, NUL included
    assert all(r["status"] == "ok" for r in rows.values())
    assert rows[unusual[0]]["prompt_truncated"] and rows[unusual[0]]["prompt_tokens"] > 77  # beyond CLIP's window
    assert not rows[unusual[1]]["prompt_truncated"]
    assert Image.open(io.BytesIO(out.get(rows[unusual[2]]["key"]))).text["prompt"] == unusual[2]
    # PNG text cannot hold NUL: the embedded copy drops it, the manifest has the original.
    assert Image.open(io.BytesIO(out.get(rows[unusual[3]]["key"]))).text["prompt"] == "a redcircle"

    lost = next(r["key"] for r in manifest.to_pylist() if r["id"] == "prompts.parquet:4")  # in segment 2
    out.delete([lost])
    assert run_job(tmp_path / "prompts.parquet", out.root, "--segment-rows", "3") == 0
    check_output(out, 5)
    err = capsys.readouterr().err
    assert "segment 2/2: 1 images" in err and "segment 1/2" not in err


def test_an_autoscaling_pool_renders_every_image_once_between_its_bounds_and_the_pools_stream(tmp_path, capsys):
    """prior_pool actors 1, max_actors 3: the slow Stage C pool starts with one warm actor, Ray Data adds actors while
    its input queues up, never more than 3; every image is rendered exactly once. Half a (fake) GPU per actor, so that
    the two GPUs hold 3 + 1 actors.

    And the pools stream instead of taking turns (Ray issue #44767's trap: a stage that waits for the one before it to
    finish everything): Stage B/A starts on the first latents while Stage C is still working."""
    from jobs.report import STAT_COLUMNS, pool_stats

    pq.write_table(prompts_table(32), tmp_path / "prompts.parquet")
    out = LocalStorage(tmp_path / "out")
    # Long enough for actors added after the first batches (each loads its models) to take work: on the 2-core CPU
    # they start about 6 s in, of a 12 s Stage C span (at 40 steps they started 7.7 s into 8.6 s, and sometimes
    # after the last batch).
    flags = ["--model", "tiny", "--width", "256", "--height", "256", "--prior-steps", "100", "--decoder-steps", "2"]
    flags += ["--prior-pool-batch-size", "2", "--decoder-pool-batch-size", "2", "--prior-pool-max-actors", "3"]
    flags += ["--prior-pool-gpus", "0.5", "--decoder-pool-gpus", "0.5"]
    assert main(["--prompts", str(tmp_path / "prompts.parquet"), "--out", str(out.root), *flags]) == 0
    assert "pools: Stage C 1-3 x" in capsys.readouterr().err
    check_output(out, 32)
    stats = pool_stats(read_manifests(out, STAT_COLUMNS))
    assert 2 <= stats["pools"]["prior"]["actors"] <= 3, stats["pools"]["prior"]["actors"]
    assert stats["pools"]["decoder"]["actors"] == 1
    prior, decoder = stats["pools"]["prior"], stats["pools"]["decoder"]
    assert decoder["span"][0] < prior["span"][0] + 0.5 * prior["span_s"], (prior["span"], decoder["span"])
    # Streaming: most of Stage B/A's work is done while Stage C works on (taking turns would make it none).
    decoder_busy_s = decoder["busy_fraction"] * decoder["span_s"]  # its one actor's time in batches
    assert stats["both_busy_s"] > 0.5 * decoder_busy_s, (stats["both_busy_s"], decoder_busy_s)
