"""FLOP counts against the compute floor's figures for the official family, and the measured matmul rate."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from cascade.family import tiny_models
from cascade.flops import forward_flops, matmul_rate, sampling_flops
from cascade.geometry import OFFICIAL
from cascade.stage_b import STAGE_B_3B, StageB
from cascade.stage_c import STAGE_C_3B, StageC
from tests.helpers import load_script


def test_official_stages_at_1024_count_as_the_compute_floor_says():
    with torch.device("meta"):  # full size, no memory
        c, b = StageC(STAGE_C_3B), StageB(STAGE_B_3B)
    family = SimpleNamespace(text_encoder=None, stage_c=c, stage_b=b, stage_a=None, geometry=OFFICIAL)
    flops = forward_flops(family, 1024)
    # docs/PERFORMANCE.md's floor: 4.08 and 6.17 TFLOP per pass (the lite pair, 1.17 and 2.22, counts the same way).
    assert flops["stage_c"] / 1e12 == pytest.approx(4.08, rel=0.01)
    assert flops["stage_b"] / 1e12 == pytest.approx(6.17, rel=0.01)
    whole = sampling_flops(flops, 20, 10)
    assert whole["stage_c"] == 40 * flops["stage_c"] and whole["stage_b"] == 20 * flops["stage_b"]
    assert sampling_flops(flops, 20, 10, decoder_cfg=1.0)["stage_b"] == 10 * flops["stage_b"]  # no unconditional pass


def test_every_stage_of_a_loaded_family_is_counted_and_grows_with_size():
    models = tiny_models()
    small, large = forward_flops(models, 256), forward_flops(models, 512)
    assert set(small) == {"text", "stage_c", "stage_b", "stage_a"} and all(v > 0 for v in small.values())
    assert large["stage_b"] > 3 * small["stage_b"] and large["text"] == small["text"]


def test_matmul_rate_is_measured():
    rate = matmul_rate(torch.device("cpu"), torch.float32, n=256, seconds=0.2)
    assert 1e8 < rate < 1e14


def test_memory_traffic_counts_the_bytes_grn_s_one_reduction_saves():
    """scripts/memory_traffic.py: a guided pass's memory-bound operations move bytes, views and matrix products
    counted as none; GRN's norm as one reduction moves fewer of them than the sum of squares (the float32 copy, the
    square and the sum are gone, the rest is the same)."""

    traffic = load_script("memory_traffic")
    with torch.device("meta"):
        stage = traffic.StageB(traffic.STAGE_B_TINY).to(torch.bfloat16).eval()
        moved = {name: traffic.count(stage, 1, 256, torch.bfloat16, fused).bytes for name, fused in
                 (("one", True), ("squares", False))}  # fmt: skip
        prepared, raw = (traffic.count(stage, 1, 256, torch.bfloat16, True, raw=flag) for flag in (False, True))
    one, squares = moved["one"], moved["squares"]
    assert not {"mm", "addmm", "view", "permute", "scaled_dot_product_attention"} & (set(one) | set(squares))
    assert {"square", "to", "sum"} <= set(squares) and "linalg_vector_norm" in one and "square" not in one
    assert one["gelu"] == squares["gelu"] > 0 and one["addcmul"] == squares["addcmul"]
    saved = squares["square"] + squares["sum"] + (squares["to"] - one["to"]) - one["linalg_vector_norm"]
    assert sum(squares.values()) - sum(one.values()) >= saved > 0
    assert sum(one.values()) < 0.7 * sum(squares.values())
    # The pass a sampling run makes (conditioning precomputed) runs fewer operations than one that does it all.
    assert 0 < prepared.operations < raw.operations and prepared.bytes == moved["one"]
