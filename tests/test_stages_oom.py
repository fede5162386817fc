"""A batch too large for the device's memory: the pool actor splits it, retries, and keeps the size that fitted; one
image that does not fit alone becomes an error row naming the size. On a CPU the device's limit is injected (the
stage's model call raises CUDA's out-of-memory error above a batch size); on a GPU a real limit is set."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch

from tests.jobhelpers import record_stage_calls
from tests.jobhelpers import stage_block as batch
from workers.stages import DecoderStage, PriorStage


def test_a_batch_that_runs_out_of_memory_is_split_and_gives_the_same_images(monkeypatch, capsys):
    whole = PriorStage("tiny", False, "fp32", "fp32")(batch(5))
    stage = PriorStage("tiny", False, "fp32", "fp32")
    calls = record_stage_calls(monkeypatch, "run_prior", fits=2)
    split = stage(batch(5))
    assert [len(c) for c in calls] == [2, 2, 1] and stage.fit == 2  # halved until it fitted, then kept at 2
    assert split.column("error").null_count == 5
    assert whole.column("prior_batch").to_pylist() == [5] * 5  # each image's model batch, for the report
    assert split.column("prior_batch").to_pylist() == [2, 2, 2, 2, 1]
    for a, b in zip(whole.column("latent").to_pylist(), split.column("latent").to_pylist()):
        np.testing.assert_allclose(np.frombuffer(a, np.float32), np.frombuffer(b, np.float32), rtol=1e-4, atol=1e-3)
    assert "set prior_pool.batch_size to 2 or less" in capsys.readouterr().err

    calls.clear()
    stage(batch(3))  # the next batch starts at the size that fitted: no second out-of-memory
    assert [len(c) for c in calls] == [2, 1]


def test_a_batch_halved_more_than_once_keeps_every_row(monkeypatch):
    stage = PriorStage("tiny", False, "fp32", "fp32")
    calls = record_stage_calls(monkeypatch, "run_prior", fits=1)
    out = stage(batch(4))  # 4 fails, then 2 fails: the rest of the 2 and the 2 after it run one by one
    assert [len(c) for c in calls] == [1, 1, 1, 1] and stage.fit == 1
    assert [c[0].prompt for c in calls] == out.column("prompt").to_pylist()  # each row once, in order
    assert out.column("error").null_count == 4 and out.column("latent").null_count == 0
    assert out.column("prior_batch").to_pylist() == [1] * 4


def test_the_retry_after_out_of_memory_runs_after_the_failed_batch_is_freed():
    """The error's traceback holds the failed call's frames and their tensors: the smaller batch must not run while
    they are still held (on a GPU, that memory is what the retry needs)."""
    stage = PriorStage("tiny", False, "fp32", "fp32")
    held = []

    def run(chunk):
        activations = torch.empty(len(chunk), 1000)  # stands in for the batch's activations on the device
        held.append(weakref.ref(activations))
        if len(chunk) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        assert held[0]() is None, "the failed batch's activations are still alive during the retry"
        return list(chunk)

    assert stage._fitted(run, [1, 2, 3, 4], lambda item, reason: None) == [(1, 2), (2, 2), (3, 2), (4, 2)]


def test_an_image_too_large_for_the_device_alone_is_an_error_row_and_the_rest_go_on(monkeypatch):
    prior = PriorStage("tiny", False, "fp32", "bf16")(batch(3))
    decoder = DecoderStage("tiny", False, "fp32", "bf16")
    record_stage_calls(monkeypatch, "run_decoder", fits=0)
    out = decoder(prior)
    errors = out.column("error").to_pylist()
    assert errors == ["Stage B/A: out of GPU memory for one 256x256 image; use a smaller size"] * 3
    assert out.column("pixels").null_count == 3
    assert out.column("decoder_batch").to_pylist() == [None] * 3  # ran in no batch ...
    assert out.column("decoder_start").null_count == out.column("decoder_end").null_count == 3  # ... so no span


@pytest.mark.gpu
def test_a_real_cuda_out_of_memory_is_split(monkeypatch):
    """On a GPU: cap this process's share of the card so that a large Stage B/A batch cannot fit."""
    prior = PriorStage("tiny", False, "fp32", "bf16")(batch(8, size=2048))
    decoder = DecoderStage("tiny", False, "fp32", "bf16")
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    allowed = (torch.cuda.memory_allocated() + 256 * 2**20) / total  # a little room above what is held now
    torch.cuda.set_per_process_memory_fraction(allowed)
    try:
        out = decoder(prior)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert decoder.fit < 8
    errors, pixels = out.column("error").to_pylist(), out.column("pixels").to_pylist()
    assert all(e is None or "out of GPU memory" in e for e in errors)
    assert all((e is None) == (p is not None) for e, p in zip(errors, pixels, strict=True))  # no row lost
