"""EfficientNet encoder and Previewer: sizes, checkpoint key names and shapes."""

import pytest
import torch
from torch import nn

from cascade.effnet import EFFNET_ENCODER, EfficientNetEncoder
from cascade.previewer import PREVIEWER, Previewer


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def meta_effnet() -> EfficientNetEncoder:
    with torch.device("meta"):
        return EfficientNetEncoder(EFFNET_ENCODER)


# ----------------------------------------------------------------------------------------------------------------------
# EfficientNet encoder
# ----------------------------------------------------------------------------------------------------------------------


def test_effnet_param_count(meta_effnet):
    assert n_params(meta_effnet) == 20_197_968


def test_effnet_keys_follow_torchvision_naming(meta_effnet):
    state = meta_effnet.state_dict()
    # Names and shapes of torchvision's efficientnet_v2_s().features, prefixed `backbone.`.
    expected_shapes = {
        "backbone.0.0.weight": (24, 3, 3, 3),  # stem conv, stride 2
        "backbone.0.1.running_var": (24,),
        "backbone.1.0.block.0.0.weight": (24, 24, 3, 3),  # FusedMBConv, expand 1: a single 3x3 conv
        "backbone.2.0.block.0.0.weight": (96, 24, 3, 3),  # FusedMBConv, expand 4: 3x3 expand ...
        "backbone.2.0.block.1.0.weight": (48, 96, 1, 1),  # ... then 1x1 project
        "backbone.4.0.block.0.0.weight": (256, 64, 1, 1),  # MBConv: 1x1 expand
        "backbone.4.0.block.1.0.weight": (256, 1, 3, 3),  # depthwise
        "backbone.4.0.block.2.fc1.weight": (16, 256, 1, 1),  # squeeze-excitation, 64 // 4 = 16
        "backbone.4.0.block.2.fc2.bias": (256,),
        "backbone.4.0.block.3.0.weight": (128, 256, 1, 1),  # 1x1 project
        "backbone.6.14.block.3.0.weight": (256, 1536, 1, 1),  # last block of the last stage
        "backbone.7.0.weight": (1280, 256, 1, 1),  # final 1x1 conv to 1280
        "backbone.7.1.num_batches_tracked": (),
        "mapper.0.weight": (16, 1280, 1, 1),
    }
    assert {k: tuple(state[k].shape) for k in expected_shapes} == expected_shapes
    assert [k for k in state if not k.startswith("backbone.")] == [
        "mapper.0.weight",
        "mapper.1.running_mean",
        "mapper.1.running_var",
        "mapper.1.num_batches_tracked",
    ]
    layers_per_stage = [len({k.split(".")[2] for k in state if k.startswith(f"backbone.{i}.")}) for i in range(1, 7)]
    assert layers_per_stage == [2, 4, 4, 6, 9, 15]
    assert not any(k.startswith("backbone.8") for k in state)
    assert len(state) == 784


def test_effnet_batchnorm_settings(meta_effnet):
    backbone_norms = [m for m in meta_effnet.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert backbone_norms and all(m.eps == 1e-3 and m.affine for m in backbone_norms)  # torchvision's V2 norm
    mapper_norm = meta_effnet.mapper[1]
    assert mapper_norm.eps == 1e-5 and not mapper_norm.affine


def test_effnet_output_shapes(meta_effnet):
    model = EfficientNetEncoder(EFFNET_ENCODER).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 16, 2, 2)
    # Stage C's training resolution, shape only.
    assert meta_effnet(torch.empty(1, 3, 768, 768, device="meta")).shape == (1, 16, 24, 24)


def test_effnet_encode_normalises_with_imagenet_statistics():
    images = torch.rand(2, 3, 32, 32)
    normalised = EfficientNetEncoder.preprocess(images)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(normalised, (images - mean) / std)

    model = EfficientNetEncoder(EFFNET_ENCODER).eval()
    with torch.no_grad():
        torch.testing.assert_close(model.encode(images), model(normalised))
        assert not torch.allclose(model.encode(images), model(images))


def test_effnet_residual_only_where_shapes_match():
    with torch.device("meta"):
        backbone = EfficientNetEncoder(EFFNET_ENCODER).backbone
    # The first block of each stage changes width or resolution (except stage 1: 24 -> 24, stride 1).
    first_blocks = [backbone[i][0].use_residual for i in range(1, 7)]
    assert first_blocks == [True, False, False, False, False, False]
    assert all(block.use_residual for i in range(1, 7) for block in list(backbone[i])[1:])


# ----------------------------------------------------------------------------------------------------------------------
# Previewer
# ----------------------------------------------------------------------------------------------------------------------


def test_previewer_param_count_and_keys():
    with torch.device("meta"):
        model = Previewer(PREVIEWER)
    assert n_params(model) == 3_979_651
    state = model.state_dict()
    indices = sorted({int(k.split(".")[1]) for k in state})
    # Convs at 0, 3, ..., 21 with BatchNorms two places after them; GELUs hold no parameters; final 1x1 conv at 24.
    assert indices == sorted([*range(0, 24, 3), *range(2, 24, 3), 24])
    assert tuple(state["blocks.0.weight"].shape) == (512, 16, 1, 1)
    assert tuple(state["blocks.6.weight"].shape) == (512, 256, 2, 2)  # ConvTranspose2d: (c_in, c_out, k, k)
    assert tuple(state["blocks.23.running_var"].shape) == (128,)
    assert tuple(state["blocks.24.weight"].shape) == (3, 128, 1, 1)


def test_previewer_shape():
    model = Previewer(PREVIEWER).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 16, 24, 24)).shape == (1, 3, 192, 192)
