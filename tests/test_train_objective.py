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


def test_pyramid_noise_is_unit_variance_with_the_reference_coarse_levels():
    """The reference's Stage B noise: for a 16 x 16 latent, white noise plus 8, 4, 2 and 1 pixel grids (weights
    0.75^i), scaled to unit variance; so a sample's spatial mean varies far more than white noise's (1/256)."""
    from cascade.train.objective import pyramid_noise

    noise = pyramid_noise((512, 4, 16, 16), torch.Generator().manual_seed(0))
    assert noise.shape == (512, 4, 16, 16) and abs(noise.std().item() - 1) < 0.02
    weights = [0.75**i for i in range(5)]  # grids of side 16, 8, 4, 2, 1
    # Each level's share of the variance, averaged over its side^2 independent cells.
    expected = sum(w**2 / sum(v**2 for v in weights) / (16 / 2**i) ** 2 for i, w in enumerate(weights))
    assert abs(noise.mean(dim=(2, 3)).var().item() - expected) < 0.01 and expected > 20 / 256
    same = pyramid_noise((2, 4, 16, 16), torch.Generator().manual_seed(1))
    assert torch.equal(same, pyramid_noise((2, 4, 16, 16), torch.Generator().manual_seed(1)))
