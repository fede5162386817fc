"""The official configurations, built on the meta device (nothing allocated), have the official parameter counts."""

import pytest
import torch

from cascade.effnet import EFFNET_ENCODER, EfficientNetEncoder
from cascade.stage_a import STAGE_A, StageA
from cascade.stage_b import STAGE_B_3B, STAGE_B_700M, StageB
from cascade.stage_c import STAGE_C_1B, STAGE_C_3B, StageC

OFFICIAL = [
    ("stage_c", StageC, STAGE_C_3B, 3_589_103_632, 1294),
    ("stage_c_lite", StageC, STAGE_C_1B, 1_030_785_040, 654),
    ("stage_b", StageB, STAGE_B_3B, 1_562_941_136, 1454),
    ("stage_b_lite", StageB, STAGE_B_700M, 699_471_248, 826),
    ("stage_a", StageA, STAGE_A, 18_406_894, None),
    ("effnet_encoder", EfficientNetEncoder, EFFNET_ENCODER, 20_197_968, None),
]


@pytest.mark.parametrize("name,cls,config,params,tensors", OFFICIAL, ids=[o[0] for o in OFFICIAL])
def test_official_parameter_counts_on_meta(name, cls, config, params, tensors):
    with torch.device("meta"):
        model = cls(config)
    assert all(p.is_meta for p in model.parameters())  # nothing was allocated
    assert sum(p.numel() for p in model.parameters()) == params
    if tensors is not None:  # tensors in the Stability single file
        assert len(model.state_dict()) == tensors


def test_head_dim_is_64_in_official_attention():
    for config in (STAGE_C_3B, STAGE_C_1B, STAGE_B_3B, STAGE_B_700M):
        for c, heads, level in zip(config.c_hidden, config.nhead, config.level_config):
            if "A" in level:
                assert c // heads == 64
