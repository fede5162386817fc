"""Shared test utilities."""

import importlib.util
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str) -> ModuleType:
    """A script of scripts/ (not a package) imported as a module, to call its functions and main()."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def randomize(model: nn.Module, seed: int = 0, scale: float = 0.1) -> nn.Module:
    """Give every floating parameter and buffer random values, the reference's zero-initialised ones included
    (GRN gamma/beta, output convs, modulation mappers), so parity tests exercise every path."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))  # variances must stay positive
            else:
                t.copy_(torch.randn(t.shape, generator=g) * scale)
    return model.eval()


def float8_reference(layer, x):
    """What a cascade.float8.Float8Linear computes, emulated in float32 without torch._scaled_mm: the input's rows
    scaled to e4m3 as the layer scales them, times the layer's e4m3 weight, each undone by its scales, plus the bias."""
    import torch

    from cascade.float8 import scale_rows

    q, scale = scale_rows(x)
    weight = layer.weight.float() * layer.weight_scale.t()  # (out, in): row i times its scale
    y = (q.float() * scale) @ weight.t()
    return (y if layer.bias is None else y + layer.bias.float()).to(torch.bfloat16)
