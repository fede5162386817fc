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
