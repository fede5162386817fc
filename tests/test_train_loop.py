"""The training loop resumes exactly; the semantic encoder learns a normalised latent that keeps what a thumbnail
needs."""

import math

import torch
from safetensors.torch import load_file
from torch import nn

from cascade.semantic import SemanticEncoder, SemanticEncoderConfig
from cascade.train.loop import RunConfig, fit
from cascade.train.objective import AdaptiveLossWeight, diffusion_loss
from cascade.train.semantic import train_semantic
from cascade.train.shapes import make_dataset, make_general


def small_task(calls: list | None = None):
    """A tiny net and its step; `calls` (if given) gets one entry per step run, so a test sees how many a resumed
    run really ran (a run from scratch with the same seed would end with the same weights and losses)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.BatchNorm2d(16), nn.GELU(), nn.Conv2d(16, 4, 3, padding=1))
    x0 = torch.randn(32, 4, 8, 8)

    def step(generator, loss_weight):
        if calls is not None:
            calls.append(1)
        batch = x0[torch.randint(32, (8,), generator=generator)]
        _, adjusted = diffusion_loss(lambda x, r: net(x), batch, {}, loss_weight, generator)
        return adjusted

    return net, step


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path):
    run = RunConfig(steps=6, batch_size=8, lr=1e-2, warmup=2, checkpoint_every=3, ema_beta=0.9)
    net, step = small_task()
    straight = fit({"net": net}, step, run, tmp_path / "a", AdaptiveLossWeight(), progress=False)

    net, step = small_task()
    half = RunConfig(**{**run.__dict__, "steps": 3})
    fit({"net": net}, step, half, tmp_path / "b", AdaptiveLossWeight(), progress=False)  # "crashes" after step 3
    calls = []
    net, step = small_task(calls)  # a new process: fresh weights, then the checkpoint
    resumed = fit({"net": net}, step, run, tmp_path / "b", AdaptiveLossWeight(), progress=False)

    assert len(calls) == 3  # only the steps after the checkpoint ran
    assert resumed.steps == straight.steps == 6 and resumed.losses == straight.losses
    for a, b in zip(straight.modules["net"].state_dict().values(), resumed.modules["net"].state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(straight.ema["net"].state_dict().values(), resumed.ema["net"].state_dict().values()):
        assert torch.equal(a, b)
    saved = load_file(tmp_path / "a" / "net.ema.step6.safetensors")
    assert torch.equal(saved["0.weight"], straight.ema["net"].state_dict()["0.weight"])


def test_an_interrupted_checkpoint_write_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    """A stage is stopped at any moment (`all` stops the others when one fails): one stopped while writing its step-4
    checkpoint resumes from step 2 exactly, never from step-4 weights with step-2 optimizer state."""
    import pytest

    import cascade.train.loop as loop

    run = RunConfig(steps=6, batch_size=8, lr=1e-2, warmup=2, checkpoint_every=2, ema_beta=0.9)
    net, step = small_task()
    straight = fit({"net": net}, step, run, tmp_path / "a", AdaptiveLossWeight(), progress=False)
    real = loop.save_safetensors

    def stopped_after_one_file(tensors, path):
        real(tensors, path)
        if ".step4." in str(path):
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_safetensors", stopped_after_one_file)
    net, step = small_task()
    with pytest.raises(KeyboardInterrupt):
        fit({"net": net}, step, run, tmp_path / "b", AdaptiveLossWeight(), progress=False)
    monkeypatch.setattr(loop, "save_safetensors", real)
    calls = []
    net, step = small_task(calls)
    resumed = fit({"net": net}, step, run, tmp_path / "b", AdaptiveLossWeight(), progress=False)
    assert len(calls) == 4 and resumed.losses == straight.losses  # from step 2's checkpoint, the last whole one
    for a, b in zip(straight.modules["net"].state_dict().values(), resumed.modules["net"].state_dict().values()):
        assert torch.equal(a, b)
    assert sorted(p.name for p in (tmp_path / "b").glob("*.safetensors")) == [
        "net.ema.step6.safetensors",
        "net.step6.safetensors",
    ]  # the earlier sets are gone


def test_a_checkpoint_of_other_settings_or_more_steps_is_not_resumed(tmp_path, capsys):
    run = RunConfig(steps=4, batch_size=8, lr=1e-2, warmup=2, checkpoint_every=2, ema_beta=0.9)
    net, step = small_task()
    fit({"net": net}, step, run, tmp_path / "c", AdaptiveLossWeight(), progress=False)
    for other in (RunConfig(**{**run.__dict__, "steps": 2}), RunConfig(**{**run.__dict__, "lr": 3e-2})):
        calls = []
        net, step = small_task(calls)
        again = fit({"net": net}, step, other, tmp_path / "c", AdaptiveLossWeight(), progress=False)
        assert len(calls) == other.steps  # every step ran: nothing was taken from the checkpoint
        net, step = small_task()
        fresh = fit({"net": net}, step, other, None, AdaptiveLossWeight(), progress=False)
        assert again.steps == other.steps and again.losses == fresh.losses  # trained from the start, as a new run
        assert "not resuming from" in capsys.readouterr().err


def test_semantic_encoder_learns_a_normalised_latent():
    data = make_dataset(256, size=64, seed=0)
    run = RunConfig(steps=60, batch_size=32, lr=3e-3, warmup=10, ema_beta=0.9)
    # With uncaptioned images in any colour mixed in: their colour has no class, and the probe skips it.
    trained = train_semantic(data, run, progress=False, general=make_general(128, 64, seed=0))
    assert all(math.isfinite(v) for v in trained.losses)
    assert sum(trained.losses[-10:]) / 10 < 0.5 * sum(trained.losses[:5]) / 5
    encoder: SemanticEncoder = trained.modules["encoder"]
    with torch.no_grad():
        latent = encoder.encode(data.images[:64])
    assert latent.shape == (64, 16, 4, 4) and SemanticEncoderConfig().stride == 16
    assert abs(float(latent.mean())) < 0.5 and 0.5 < float(latent.std()) < 1.5
