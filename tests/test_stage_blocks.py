"""A pool's Ray blocks carry whole model batches, at least MIN_BLOCK_ROWS images (Ray Data's cost is per block):
the actor runs a block as batches of its pool's batch size, and the manifest's columns describe each model batch."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from jobs.generate import MIN_BLOCK_ROWS, block_rows
from tests.jobhelpers import stage_block
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
