"""The pool actors' batches and start.

A pool's Ray blocks carry whole model batches, at least MIN_BLOCK_ROWS images (Ray Data's cost is per block): the
actor runs a block as batches of its pool's batch size, and the manifest's columns describe each model batch. An
actor given the job's usual request warms up on one batch of it before it takes work."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from cascade.request import Request, latent_sizes
from jobs.config import from_mapping
from jobs.generate import MIN_BLOCK_ROWS, block_rows, usual_request
from tests.jobhelpers import record_stage_calls, stage_block
from workers.stages import DecoderStage, PriorStage


def test_blocks_hold_whole_batches_and_at_least_the_minimum():
    assert MIN_BLOCK_ROWS == 4
    assert [block_rows(b) for b in (1, 2, 3, 4, 5, 8, 64)] == [4, 4, 6, 4, 5, 8, 64]


def spans(table: pa.Table, part: str) -> list:
    return list(zip(table.column(f"{part}_start").to_pylist(), table.column(f"{part}_end").to_pylist()))


def test_a_block_runs_as_model_batches_of_the_pools_batch_size():
    block = stage_block(6)
    errors = block.column("error").to_pylist()
    errors[3] = "bad row"  # came with an error: passes through, in no batch
    block = block.set_column(0, "error", pa.array(errors, pa.string()))
    whole = PriorStage("tiny", False, "fp32", "fp32")(block)  # no batch size: the block's rows are one batch
    prior = PriorStage("tiny", False, "fp32", "fp32", batch_size=2)(block)

    assert whole.column("prior_batch").to_pylist() == [5, 5, 5, None, 5, 5]
    assert prior.column("prior_batch").to_pylist() == [2, 2, 2, None, 2, 1]  # rows 0-1, 2-4, 5
    times = spans(prior, "prior")
    assert times[3] == (None, None)
    assert times[0] == times[1] and times[2] == times[4] and len({times[0], times[2], times[5]}) == 3
    assert times[0][0] <= times[0][1] <= times[2][0] <= times[2][1] <= times[5][0] <= times[5][1]  # one after another
    for a, b in zip(whole.column("latent").to_pylist(), prior.column("latent").to_pylist()):
        if a is None:
            assert b is None
            continue
        np.testing.assert_allclose(np.frombuffer(a, np.float32), np.frombuffer(b, np.float32), rtol=1e-4, atol=1e-3)

    decoded = DecoderStage("tiny", False, "fp32", "fp32", batch_size=1)(prior)
    assert decoded.column("decoder_batch").to_pylist() == [1, 1, 1, None, 1, 1]
    times = [t for t in spans(decoded, "decoder") if t != (None, None)]
    assert len(set(times)) == 5 and decoded.column("pixels").null_count == 1


def test_an_actor_warms_up_on_one_batch_of_the_jobs_usual_request_at_one_step(monkeypatch, capsys):
    usual = Request("warm-up", width=320, height=256, prior_steps=7, prior_cfg=3.0, decoder_steps=5, sampler="ddim")
    prior_calls, decoder_calls = (
        record_stage_calls(monkeypatch, "run_prior"),
        record_stage_calls(monkeypatch, "run_decoder"),
    )
    prior = PriorStage("tiny", False, "fp32", "fp32", batch_size=3, warm_up=usual)
    decoder = DecoderStage("tiny", False, "fp32", "fp32", batch_size=2, warm_up=usual)
    one_step = Request("warm-up", width=320, height=256, prior_steps=1, prior_cfg=3.0, decoder_steps=1, sampler="ddim")
    assert prior_calls == [[one_step] * 3]  # a whole batch of the usual bucket, at one step
    assert [[p.request for p in call] for call in decoder_calls] == [[one_step] * 2]
    assert decoder_calls[0][0].latent.shape == latent_sizes(320, 256, decoder.geometry)[0]  # the usual size's
    assert prior.warm_s > 0 and decoder.warm_s > 0
    ready = [line for line in capsys.readouterr().err.splitlines() if "ready: models loaded in" in line]
    assert len(ready) == 2 and ready[0].startswith("[Stage C actor prior@") and "warmed up in" in ready[0]

    prior_calls.clear()
    out = prior(stage_block(3))  # then the work, as without a warm-up
    assert [len(c) for c in prior_calls] == [3] and out.column("error").null_count == 3
    assert PriorStage("tiny", False, "fp32", "fp32", batch_size=3).warm_s == 0  # no usual request: no warm-up


def test_a_warm_up_batch_that_does_not_fit_is_left_for_the_work_to_split(monkeypatch, capsys):
    """The rows may ask for smaller images than the usual request: the warm-up does not lower the batch size."""
    usual = Request("warm-up", width=256, height=256)
    calls = record_stage_calls(monkeypatch, "run_prior", fits=2)
    stage = PriorStage("tiny", False, "fp32", "fp32", batch_size=4, warm_up=usual)
    assert calls == [] and stage.fit > 4
    assert "the warm-up batch (4 of 256x256) ran out of GPU memory" in capsys.readouterr().err
    out = stage(stage_block(4))  # the work finds what fits, as without a warm-up
    assert [len(c) for c in calls] == [2, 2] and stage.fit == 2 and out.column("error").null_count == 4


def test_the_jobs_usual_request_is_a_row_that_sets_nothing():
    config = from_mapping({"prompts": "p.parquet", "out": "out", "model": "tiny", "width": 320, "prior_cfg": 3.0})
    usual = usual_request(config)
    assert (usual.width, usual.height, usual.prior_cfg, usual.prior_steps) == (320, 1024, 3.0, 20)  # tiny: 1024
    assert (usual.decoder_steps, usual.decoder_cfg, usual.sampler) == (10, 1.1, "ddpm")  # the reference's defaults
    assert usual.negative_prompt == config.negative_prompt


def test_fp8_makes_the_stage_c_actors_linear_layers_float8_and_leaves_stage_b_as_it_is(capsys):
    """`fp8: true` in a job (model_args, as `compile`): the Stage C actor swaps Stage C's token linear layers for
    float8 products and says how many; the Stage B/A actor, given the same arguments, keeps Stage B in its dtype
    (float8 measured 2 % slower there). The float8 latents stay finite and near the plain actor's. (Without compile
    here: compiling tiny blocks on this CPU takes about 20 s; the config refuses fp8 without it.)"""
    import torch

    from cascade.float8 import Float8Linear

    def float8_layers(model) -> int:
        return sum(isinstance(m, Float8Linear) for m in model.modules())

    prior = PriorStage("tiny", False, "fp32", "fp32", fp8=True)
    decoder = DecoderStage("tiny", False, "fp32", "fp32", fp8=True)
    assert float8_layers(prior.models.stage_c) > 0 and float8_layers(decoder.models.stage_b) == 0
    line = [line for line in capsys.readouterr().err.splitlines() if "as float8 products" in line]
    assert len(line) == 1 and line[0].startswith(f"[Stage C actor {prior.name}] ")
    assert line[0].endswith(
        " linear layers of Stage C as float8 products (on a CPU: a GPU's arithmetic, emulated, slower than without fp8)"
    )

    block = stage_block(2)
    fast, plain = prior(block), PriorStage("tiny", False, "fp32", "fp32")(block)
    assert fast.column("error").null_count == 2
    shape = latent_sizes(256, 256, prior.geometry)[0]
    for a, b in zip(fast.column("latent").to_pylist(), plain.column("latent").to_pylist(), strict=True):
        a, b = (torch.from_numpy(np.frombuffer(x, np.float32).reshape(shape).copy()) for x in (a, b))
        assert torch.isfinite(a).all() and ((a - b).norm() / b.norm()).item() < 0.1
    assert decoder(fast).column("pixels").null_count == 0


def test_a_device_without_float8_products_refuses_fp8_naming_the_setting_and_the_job_exits_2(
    monkeypatch, tmp_path, capsys
):
    """An A100, or a model in fp16 on a GPU: float8_linears says why not; the Stage C actor raises SettingRefused
    naming `fp8`, and the job, finding it in Ray's report of the actor's failure, exits 2 with that line (a rerun
    would meet it again), as for a setting refused before Ray starts. (This CPU runs float8: the check is made to say
    what an A100's says, and the Ray run is the report Ray makes of that failure.)"""
    import traceback

    import pyarrow.parquet as pq
    import pytest

    import jobs.generate
    import workers.stages
    from tests.jobhelpers import FAST, prompts_table
    from workers.stages import SettingRefused

    reason = "float8 products need a GPU of compute capability 8.9 or later (Ada, Hopper); this one is 8.0"
    monkeypatch.setattr(workers.stages, "float8_supported", lambda device, dtype: reason)
    with pytest.raises(SettingRefused) as refused:
        PriorStage("tiny", False, "fp32", "fp32", fp8=True)
    message = str(refused.value)
    assert message.startswith("fp8: True is not allowed on the Stage C actor prior@") and reason in message
    assert message.endswith("set fp8: false (leave out --fp8) for this cluster")
    assert DecoderStage("tiny", False, "fp32", "fp32", fp8=True).models is not None  # Stage B: no float8, no check
    assert PriorStage("tiny", False, "fp32", "fp32", fp8=True, dry_run=True).models is None  # a dry run: no maths

    # Ray reports an actor's failure as text holding its traceback (the exception's chain does not survive pickling).
    report = RuntimeError("".join(traceback.format_exception(refused.value)))
    assert jobs.generate.setting_failure(report) == message
    assert jobs.generate.setting_failure(RuntimeError("something else")) is None

    def stream(*args):
        raise report

    monkeypatch.setattr(jobs.generate, "stream", stream)
    pq.write_table(prompts_table(2), tmp_path / "p.parquet")
    argv = ["--prompts", str(tmp_path / "p.parquet"), "--out", str(tmp_path / "out"), *FAST, "--compile", "--fp8"]
    assert jobs.generate.main(argv) == 2
    err = capsys.readouterr().err
    assert f"[generate] error: {message}\n" in err and "rerun" not in err
