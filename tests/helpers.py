"""Shared test utilities."""

import torch
from torch import nn


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
