"""The training objective: the same noising as inference, the adaptive loss weight, EMA."""

import torch
from torch import nn

from cascade import gdf
from cascade.train.objective import EMA, AdaptiveLossWeight, diffusion_loss


def test_noising_matches_the_sampler_and_the_target_is_the_noise():
    x0 = torch.randn(3, 4, 8, 8)
    seen = {}

    def model(x, r, **conditions):
        seen.update(x=x, r=r, **conditions)
        return torch.zeros_like(x)

    weights = AdaptiveLossWeight()
    loss, _ = diffusion_loss(model, x0, {"clip": torch.ones(3, 1, 8)}, weights, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    t = torch.rand(3, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    expected = torch.stack([gdf.diffuse(x0[i : i + 1], float(t[i]), noise[i : i + 1])[0] for i in range(3)])
    assert torch.allclose(seen["x"], expected, atol=1e-6)
    assert torch.allclose(seen["r"], gdf.noise_cond(gdf.log_snr(t)))
    assert "clip" in seen
    # With a zero prediction the loss is the noise's own mean square, per sample.
    assert torch.allclose(loss, noise.pow(2).mean(dim=(1, 2, 3)), atol=1e-6)


def test_adaptive_weight_follows_the_running_loss_per_noise_level():
    weights = AdaptiveLossWeight()
    low, high = torch.tensor([-8.0]), torch.tensor([8.0])
    for _ in range(2000):
        weights.update(low, torch.tensor([4.0]))
        weights.update(high, torch.tensor([0.25]))
    assert abs(float(weights.weight(low)) - 0.25) < 1e-3 and abs(float(weights.weight(high)) - 4.0) < 1e-2
    assert float(weights.weight(torch.tensor([0.0]))) == 1.0  # an untouched bucket
    restored = AdaptiveLossWeight()
    restored.load_state_dict(weights.state_dict())
    assert torch.equal(restored.weight(low), weights.weight(low))


def test_a_small_denoiser_learns():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 32, 3, padding=1), nn.GELU(), nn.Conv2d(32, 4, 3, padding=1))
    model = lambda x, r: net(x)
    x0 = torch.zeros(16, 4, 8, 8)
    x0[:, :, 2:6, 2:6] = 1.0  # one clean image: the noise is learnable from x_t
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    weights, g = AdaptiveLossWeight(), torch.Generator().manual_seed(0)
    losses = []
    for _ in range(150):
        loss, adjusted = diffusion_loss(model, x0, {}, weights, g)
        opt.zero_grad()
        adjusted.backward()
        opt.step()
        losses.append(float(loss.detach().mean()))
    assert sum(losses[-20:]) / 20 < 0.6 * sum(losses[:20]) / 20


def test_ema_tracks_the_live_weights():
    live = nn.Linear(2, 2)
    ema = EMA(live, beta=0.9)
    with torch.no_grad():
        live.weight.fill_(1.0)
    for _ in range(200):
        ema.update(live)
    assert torch.allclose(ema.model.weight, live.weight, atol=1e-4)
    assert not ema.model.weight.requires_grad
