"""The reference's training objective for Stage B and Stage C (GDF): noise clean latents to a random t of the
clamped cosine schedule, predict the noise (epsilon target), weight each sample's MSE by the adaptive loss weight.

AdaptiveLossWeight (gdf/loss_weights.py in the reference): logSNR in [-10, 10] is cut into 300 buckets; each keeps a
running mean of the loss seen at that noise level (beta 0.99), and a sample's weight is 1 / its bucket's mean,
clamped to [1e-7, 1e7]. Every noise level then contributes about equally, whatever its raw loss scale.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import gdf


class AdaptiveLossWeight:
    def __init__(self, logsnr_range=(-10.0, 10.0), buckets: int = 300, weight_range=(1e-7, 1e7)):
        self.edges = torch.linspace(logsnr_range[0], logsnr_range[1], buckets - 1)
        self.losses = torch.ones(buckets)
        self.weight_range = weight_range

    def _bucket(self, logsnr: torch.Tensor) -> torch.Tensor:
        return torch.searchsorted(self.edges, logsnr.detach().float().cpu())

    def weight(self, logsnr: torch.Tensor) -> torch.Tensor:
        return (1 / self.losses[self._bucket(logsnr)]).clamp(*self.weight_range).to(logsnr.device)

    def update(self, logsnr: torch.Tensor, loss: torch.Tensor, beta: float = 0.99) -> None:
        index = self._bucket(logsnr)
        self.losses[index] = self.losses[index] * beta + loss.detach().float().cpu() * (1 - beta)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"losses": self.losses.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.losses = state["losses"].clone().float()


class AdaptiveLossWeights:
    """One `AdaptiveLossWeight` per diffusion loss of a step that sums several (a LoRA's Stage C and Stage B terms):
    each stage's losses per noise level differ. Saved and restored together, as a single one is."""

    def __init__(self, *names: str):
        self.parts = {name: AdaptiveLossWeight() for name in names}

    def __getitem__(self, name: str) -> AdaptiveLossWeight:
        return self.parts[name]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{k}": v for name, part in self.parts.items() for k, v in part.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, part in self.parts.items():
            part.load_state_dict({k.removeprefix(f"{name}."): v for k, v in state.items() if k.startswith(f"{name}.")})


def diffusion_loss(
    model: Callable[..., torch.Tensor],
    x0: torch.Tensor,
    conditions: dict[str, torch.Tensor],
    loss_weight: AdaptiveLossWeight,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sample MSE, the weighted mean to backpropagate) for `model(x_t, r, **conditions)` predicting epsilon."""
    n = x0.shape[0]
    t = torch.rand(n, generator=generator)
    logsnr = gdf.log_snr(t)  # shift 1 in training, as the reference
    noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    a, b = gdf.vp_scalers(logsnr)
    a, b = a.view(-1, *[1] * (x0.dim() - 1)).to(x0), b.view(-1, *[1] * (x0.dim() - 1)).to(x0)
    pred = model(a * x0 + b * noise, gdf.noise_cond(logsnr).to(x0.device), **conditions)
    loss = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=list(range(1, x0.dim())))
    adjusted = (loss * loss_weight.weight(logsnr).to(loss.device)).mean()
    loss_weight.update(logsnr, loss)
    return loss, adjusted


class EMA:
    """An exponential moving average of a model's weights (what gets shipped), with the usual warm-up: the decay
    grows as 1 - 1/(step + 10)^0.75 toward `beta`, so early weights are not frozen in."""

    def __init__(self, model: nn.Module, beta: float = 0.999):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.beta, self.steps = beta, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.steps += 1
        decay = min(self.beta, 1 - (self.steps + 10) ** -0.75)
        for ema, live in zip(self.model.parameters(), model.parameters()):
            ema.lerp_(live.detach(), 1 - decay)
        for ema, live in zip(self.model.buffers(), model.buffers()):
            ema.copy_(live)
