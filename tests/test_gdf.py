"""GDF sampler (cascade/gdf.py): schedule, noise condition, DDPM/DDIM steps, guidance and the sampling loop.

Oracles: the spec's published r table (reference §6), an independent float64 re-statement of the reference's
formulas (`gdf/schedulers.py`, `scalers.py`, `noise_conditions.py`, `samplers.py`), diffusers'
`DDPMWuerstchenScheduler` fed GDF's r values as timesteps, and hand-written loops that follow `GDF.sample`.
"""

import math

import numpy as np
import pytest
import torch

from cascade import gdf

S = 0.008
EPS32 = float(np.finfo(np.float32).eps)


# ----------------------------------------------------------------------------------------------------------------------
# An independent float64 statement of the reference's formulas
# ----------------------------------------------------------------------------------------------------------------------


def ref_alpha_bar(t):
    """CosineSchedule(s=0.008, clamp_range=[1e-4, 0.9999]) before the log."""
    t = np.clip(np.asarray(t, dtype=np.float64), 0, 1)
    min_var = np.cos(S / (1 + S) * np.pi / 2) ** 2
    var = np.clip(np.cos((S + t) / (1 + S) * np.pi / 2), 0, 1) ** 2 / min_var
    return np.clip(var, 1e-4, 0.9999)


def ref_log_snr(t, shift=1.0):
    """logSNR + 2 ln(1/shift), clamped to the limits the schedule sets at init with shift 1: [logSNR(1), logSNR(0)]."""

    def unshifted(tt):
        ab = ref_alpha_bar(tt)
        return np.log(ab / (1 - ab))

    lo, hi = unshifted(1.0), unshifted(0.0)
    return np.clip(unshifted(t) + 2 * np.log(1 / shift), lo, hi)


def ref_sigmoid(x):
    return 1 / (1 + np.exp(-np.asarray(x, dtype=np.float64)))


def ref_scalers(logsnr):
    """VPScaler: a = sqrt(sigmoid(logSNR)), b = sqrt(1 - sigmoid(logSNR))."""
    a2 = ref_sigmoid(logsnr)
    return np.sqrt(a2), np.sqrt(1 - a2)


def ref_noise_cond(logsnr):
    """CosineTNoiseCond: the unshifted cosine schedule inverted, output clamped to [0, 1]."""
    var = np.clip(ref_sigmoid(logsnr), 0, 1)
    min_var = np.cos(S / (1 + S) * np.pi / 2) ** 2
    return np.clip(np.arccos(np.sqrt(var * min_var)) / (np.pi / 2) * (1 + S) - S, 0, 1)


def ref_guide_whole_batch(c, u, cfg, cfg_rho=0.7):
    """The reference's `GDF.sample` guidance: std over the whole batch tensor."""
    pred_cfg = torch.lerp(u, c, cfg)
    return cfg_rho * (pred_cfg * c.std() / (pred_cfg.std() + 1e-9)) + pred_cfg * (1 - cfg_rho)


def r_of(t: float, shift: float) -> float:
    return gdf.noise_cond(gdf.log_snr(torch.tensor([t]), shift)).item()


def gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


# ----------------------------------------------------------------------------------------------------------------------
# 1-2. Schedule, shift and noise condition
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t, expected", [(1.0, 0.9936), (0.95, 0.975), (0.9, 0.9497), (0.05, 0.1063)])
def test_r_at_shift_2_matches_spec_table(t, expected):
    assert r_of(t, 2.0) == pytest.approx(expected, abs=1e-4)


def test_r_at_shift_1_is_t_except_at_the_clamp():
    t = torch.linspace(0.05, 0.95, 19)
    r = gdf.noise_cond(gdf.log_snr(t, 1.0))
    torch.testing.assert_close(r, t, atol=1e-4, rtol=0)
    assert r_of(1.0, 1.0) == pytest.approx(0.9936, abs=1e-4)  # alpha-bar clamps at 1e-4, so r(1) < 1
    assert r_of(1.0, 1.0) < 0.995


@pytest.mark.parametrize("shift", [1.0, 2.0, 4.0, 0.5])
def test_schedule_scalers_and_noise_cond_match_a_float64_restatement(shift):
    t = np.concatenate([np.linspace(0, 1, 101), [0.001, 0.005, 0.995, 0.999]])
    want_logsnr = ref_log_snr(t, shift)
    got_logsnr = gdf.log_snr(torch.tensor(t), shift)
    assert got_logsnr.dtype == torch.float32
    got = got_logsnr.double().numpy()

    # alpha-bar = sigmoid(logSNR) is well conditioned in float32 everywhere, including both clamps.
    np.testing.assert_allclose(ref_sigmoid(got), ref_sigmoid(want_logsnr), atol=1e-6, rtol=0)
    # logSNR itself: 1e-5 plus float32's rounding of the unshifted alpha-bar amplified by d logSNR / d alpha-bar =
    # 1 / (ab (1 - ab)); near the 0.9999 clamp fp32 1 - ab carries ~1e-3 relative error (the reference's fp32 too).
    ab = ref_alpha_bar(t)
    np.testing.assert_array_less(np.abs(got - want_logsnr), 1e-5 + 2 * EPS32 / (ab * (1 - ab)))
    mid = (ab > 0.05) & (ab < 0.95)
    assert mid.sum() > 50
    np.testing.assert_allclose(got[mid], want_logsnr[mid], atol=1e-5, rtol=0)
    # The limits come from the unshifted schedule: a shift never pushes logSNR past them.
    assert got.min() >= ref_log_snr(1.0) - 1e-3 and got.max() <= ref_log_snr(0.0) + 1e-3

    # The rest of the chain, composed in float32 as the sampler runs it.
    a, b = gdf.vp_scalers(got_logsnr)
    want_a, want_b = ref_scalers(want_logsnr)
    np.testing.assert_allclose(a.double().numpy(), want_a, atol=1e-5, rtol=0)
    np.testing.assert_allclose(b.double().numpy(), want_b, atol=1e-5, rtol=0)
    r = gdf.noise_cond(got_logsnr).double().numpy()
    np.testing.assert_allclose(r, ref_noise_cond(want_logsnr), atol=1e-5, rtol=0)

    # vp_scalers and noise_cond keep float64 when given it: exact formulas, no float32 detour.
    l64 = torch.tensor(want_logsnr)
    a64, b64 = gdf.vp_scalers(l64)
    np.testing.assert_allclose(a64.numpy(), want_a, atol=1e-12, rtol=0)
    np.testing.assert_allclose(b64.numpy(), want_b, atol=1e-12, rtol=0)
    np.testing.assert_allclose(gdf.noise_cond(l64).numpy(), ref_noise_cond(want_logsnr), atol=1e-9, rtol=0)


def test_noise_cond_inverts_the_unshifted_schedule():
    t = torch.linspace(0.02, 0.98, 49, dtype=torch.float64)
    ab = torch.tensor(ref_alpha_bar(t.numpy()))
    torch.testing.assert_close(gdf.noise_cond((ab / (1 - ab)).log()), t, atol=1e-9, rtol=0)


# ----------------------------------------------------------------------------------------------------------------------
# 3. One DDPM step against diffusers' DDPMWuerstchenScheduler
# ----------------------------------------------------------------------------------------------------------------------


DF_PAIRS = [(1.0, 0.95, 1.0), (0.95, 0.9, 2.0), (0.55, 0.5, 2.0), (0.1, 0.05, 2.0), (0.05, 0.0, 2.0), (0.5, 0.25, 4.0)]


def ddpm_step_both(t, t_prev, shift, dtype, df_generator=None, df_noise=None):
    """(cascade's DDPM step, diffusers' DDPMWuerstchenScheduler step fed GDF's r), same x, eps prediction and noise."""
    from diffusers import DDPMWuerstchenScheduler

    torch.manual_seed(1)
    batch, shape = 2, (4, 5, 6)
    x = torch.randn(batch, *shape, dtype=dtype)
    eps = torch.randn(batch, *shape, dtype=dtype)
    logsnr = gdf.log_snr(torch.full((batch,), t), shift).to(dtype)
    logsnr_prev = gdf.log_snr(torch.full((batch,), t_prev), shift).to(dtype)
    r, r_prev = gdf.noise_cond(logsnr), gdf.noise_cond(logsnr_prev)
    assert r_prev[0] > 0  # r(0) is small but not 0, so diffusers adds its noise term too

    noise = gdf.randn(shape, gens([11, 12])).to(dtype) if df_noise is None else df_noise
    x0 = gdf.predict_x0(x, eps, logsnr)
    ours = gdf.ddpm_step(x0, eps, logsnr, logsnr_prev, noise)

    df = DDPMWuerstchenScheduler(scaler=1, s=0.008)
    if dtype == torch.float64:  # its constants are float32 tensors: give it float64 ones (same formula)
        df.s = torch.tensor([0.008], dtype=dtype)
        df._init_alpha_cumprod = torch.cos(df.s / (1 + df.s) * torch.pi * 0.5) ** 2
    df.set_timesteps(timesteps=torch.stack([r[0], r_prev[0]]))  # so that previous_timestep(r) is r_prev
    theirs = df.step(eps, r, x, generator=df_generator).prev_sample
    return ours, theirs


@pytest.mark.parametrize("t, t_prev, shift", DF_PAIRS)
def test_ddpm_step_matches_diffusers_fed_gdf_r(t, t_prev, shift):
    # diffusers draws its noise with randn_tensor(mu.shape, generator=[g0, g1]): one (1, *shape) draw per generator;
    # gdf.randn draws one `shape` per generator, so equally seeded generators give the same numbers.
    ours, theirs = ddpm_step_both(t, t_prev, shift, torch.float32, df_generator=gens([11, 12]))
    # fp32: diffusers recomputes alpha-bar as cos^2 of r, which loses relative precision as r -> 1 (at r(1) = 0.9936
    # its step is ~3e-4 off a float64 evaluation on outputs of size ~36); so the bound is relative to the output size.
    assert (ours - theirs).abs().max() <= 1e-5 * max(1.0, theirs.abs().max().item())

    # The noise really enters both: another draw moves the result far beyond the tolerance.
    _, other = ddpm_step_both(t, t_prev, shift, torch.float32, df_generator=gens([13, 14]))
    assert (other - theirs).abs().max() > 1e-3


@pytest.mark.parametrize("t, t_prev, shift", DF_PAIRS)
def test_ddpm_step_is_diffusers_maths_in_float64(t, t_prev, shift, monkeypatch):
    """Same inputs in float64, diffusers' noise injected directly: the two formulas are the same maths."""
    import diffusers.schedulers.scheduling_ddpm_wuerstchen as df_module

    noise = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(21), dtype=torch.float64)
    drawn = []

    def fake_randn_tensor(shape, generator=None, device=None, dtype=None, **_):
        assert tuple(shape) == tuple(noise.shape) and dtype == torch.float64
        drawn.append(shape)
        return noise.clone()

    monkeypatch.setattr(df_module, "randn_tensor", fake_randn_tensor)
    ours, theirs = ddpm_step_both(t, t_prev, shift, torch.float64, df_noise=noise)
    assert len(drawn) == 1 and theirs.dtype == torch.float64
    torch.testing.assert_close(ours, theirs, atol=1e-9, rtol=1e-9)


def test_diffusers_alpha_bar_at_gdf_r_is_gdf_sigmoid_logsnr():
    """Why the step parity holds at any shift: DF's alpha-bar at GDF's r equals sigmoid(GDF's logSNR)."""
    from diffusers import DDPMWuerstchenScheduler

    df = DDPMWuerstchenScheduler(scaler=1, s=0.008)
    for shift in (1.0, 2.0, 4.0):
        logsnr = gdf.log_snr(torch.linspace(0, 1, 41), shift)
        torch.testing.assert_close(
            df._alpha_cumprod(gdf.noise_cond(logsnr), "cpu"), logsnr.sigmoid(), atol=1e-6, rtol=0
        )


def test_ddim_step_is_deterministic_and_hits_the_predicted_x0_path():
    torch.manual_seed(2)
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    logsnr, logsnr_prev = gdf.log_snr(torch.full((2,), 0.7), 2.0), gdf.log_snr(torch.full((2,), 0.6), 2.0)
    a_prev, b_prev = (torch.tensor(v).float().view(-1, 1, 1, 1) for v in ref_scalers(logsnr_prev.double().numpy()))
    torch.testing.assert_close(gdf.ddim_step(x0, eps, logsnr, logsnr_prev), a_prev * x0 + b_prev * eps)


# ----------------------------------------------------------------------------------------------------------------------
# 4-5. Guidance
# ----------------------------------------------------------------------------------------------------------------------


class FakeModel:
    """Counts calls and records inputs; per-sample maths only, so chunks of a batch see what they would alone."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, r, clip, scale):
        self.calls.append({"x": x.clone(), "r": r.clone(), "clip": clip.clone(), "scale": scale.clone()})
        return torch.tanh(x * scale.view(-1, 1, 1, 1)) + clip.mean(dim=(1, 2)).view(-1, 1, 1, 1) + r.view(-1, 1, 1, 1)


def guidance_inputs():
    torch.manual_seed(3)
    cond = {"clip": torch.randn(2, 3, 8), "scale": torch.tensor([0.5, 2.0])}
    uncond = {"clip": torch.zeros(2, 3, 8), "scale": torch.tensor([1.5, -1.0])}
    return torch.randn(2, 4, 5, 5), torch.tensor([0.9, 0.9]), cond, uncond


def test_guide_cfg_1_is_the_conditional_prediction():
    torch.manual_seed(4)
    c, u = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5) * 3
    assert torch.equal(torch.lerp(u, c, 1.0), c)
    assert torch.equal(gdf.guide(c, u, 1.0, cfg_rho=0), c)
    torch.testing.assert_close(gdf.guide(c, u, 1.0, cfg_rho=0.7), c, atol=1e-6, rtol=0)  # rescale: identity


@pytest.mark.parametrize("cfg", [1, 1.0, None])
def test_guided_denoiser_without_guidance_runs_only_the_conditional_pass(cfg):
    x, r, cond, uncond = guidance_inputs()
    model = FakeModel()
    denoise = gdf.guided_denoiser(model, cond, uncond, cfg)
    out = denoise(x, r)
    assert len(model.calls) == 1
    call = model.calls[0]
    assert torch.equal(call["x"], x) and torch.equal(call["r"], r)
    assert torch.equal(call["clip"], cond["clip"]) and torch.equal(call["scale"], cond["scale"])
    assert torch.equal(out, model(x, r, **cond))


def test_guided_denoiser_with_cfg_runs_the_doubled_batch_and_guides():
    x, r, cond, uncond = guidance_inputs()
    model = FakeModel()
    denoise = gdf.guided_denoiser(model, cond, uncond, cfg=4.0, cfg_rho=0.7)
    out = denoise(x, r)
    assert len(model.calls) == 1
    call = model.calls[0]
    assert call["x"].shape[0] == 4 and torch.equal(call["x"], torch.cat([x, x]))
    assert torch.equal(call["r"], torch.cat([r, r]))
    assert torch.equal(call["clip"], torch.cat([cond["clip"], uncond["clip"]]))  # cond first, then uncond
    assert torch.equal(call["scale"], torch.cat([cond["scale"], uncond["scale"]]))

    c, u = model(x, r, **cond), model(x, r, **uncond)
    # By hand: lerp, then per sample: 0.7 * pred_cfg * std(c) / (std(pred_cfg) + 1e-9) + 0.3 * pred_cfg.
    pred_cfg = u + 4.0 * (c - u)
    std_c = torch.stack([s.std() for s in c]).view(-1, 1, 1, 1)
    std_cfg = torch.stack([s.std() for s in pred_cfg]).view(-1, 1, 1, 1)
    want = 0.7 * pred_cfg * std_c / (std_cfg + 1e-9) + 0.3 * pred_cfg
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, gdf.guide(c, u, 4.0, 0.7), atol=1e-6, rtol=0)
    # Guided output keeps the conditional prediction's per-sample spread at rho 1.
    rho1 = gdf.guide(c, u, 4.0, 1.0)
    torch.testing.assert_close(rho1.std(dim=(1, 2, 3)), c.std(dim=(1, 2, 3)), atol=1e-5, rtol=1e-5)


class PrecomputingModel(FakeModel):
    """A FakeModel with a `precompute` (as Stage B and Stage C have): it turns clip into its mean, once per run."""

    def __init__(self):
        super().__init__()
        self.precomputed = []

    def precompute(self, x, clip, scale):
        self.precomputed.append(x.shape)
        return {"clip_mean": clip.mean(dim=(1, 2)), "scale": scale}

    def __call__(self, x, r, clip_mean, scale):
        self.calls.append({"x": x.clone(), "clip_mean": clip_mean, "scale": scale})
        return torch.tanh(x * scale.view(-1, 1, 1, 1)) + clip_mean.view(-1, 1, 1, 1) + r.view(-1, 1, 1, 1)


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_guided_denoiser_precomputes_once_per_run_and_passes_the_result_at_every_step(cfg):
    """A model's step-invariant conditioning work (`precompute`) runs once, on the first step's (doubled) batch, and
    every step gets its result; the samples are those of the same model computing it at every step."""
    _, _, cond, uncond = guidance_inputs()
    model = PrecomputingModel()
    got = gdf.sample(gdf.guided_denoiser(model, cond, uncond, cfg), gens([5, 9]), SHAPE, steps=4, sampler="ddpm")
    batch = 2 if cfg == 1 else 4
    assert model.precomputed == [torch.Size([batch, *SHAPE])] and len(model.calls) == 4
    assert all(call["clip_mean"] is model.calls[0]["clip_mean"] for call in model.calls)
    eager = FakeModel()
    want = gdf.sample(gdf.guided_denoiser(eager, cond, uncond, cfg), gens([5, 9]), SHAPE, steps=4, sampler="ddpm")
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_guide_cfg_rho_0_is_the_plain_lerp():
    torch.manual_seed(5)
    c, u = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    assert torch.equal(gdf.guide(c, u, 4.0, cfg_rho=0), torch.lerp(u, c, 4.0))
    torch.testing.assert_close(gdf.guide(c, u, 4.0, cfg_rho=0), u + 4.0 * (c - u), atol=1e-6, rtol=0)
    assert (gdf.guide(c, u, 4.0, cfg_rho=0.7) - gdf.guide(c, u, 4.0, cfg_rho=0)).abs().max() > 0.1


def test_guide_rescale_is_per_sample_unlike_the_reference_whole_batch_std():
    torch.manual_seed(6)
    # Sample 0: uncond close to cond, guidance barely changes its spread; sample 1: 50x larger and guidance
    # multiplies its spread by ~5. A whole-batch std ratio is sample 1's, and would shrink sample 0 by ~0.5.
    c0 = torch.randn(1, 4, 6, 6)
    c = torch.cat([c0, torch.randn(1, 4, 6, 6) * 50])
    u = torch.cat([c0 + 0.01 * torch.randn(1, 4, 6, 6), torch.randn(1, 4, 6, 6) * 50])
    batched = gdf.guide(c, u, 4.0, 0.7)
    alone = torch.cat([gdf.guide(c[i : i + 1], u[i : i + 1], 4.0, 0.7) for i in range(2)])
    torch.testing.assert_close(batched, alone, atol=1e-6, rtol=1e-6)

    # The reference's whole-batch std would tie each sample to its batch mate: the deliberate change matters.
    ref_batched = ref_guide_whole_batch(c, u, 4.0)
    ref_alone = torch.cat([ref_guide_whole_batch(c[i : i + 1], u[i : i + 1], 4.0) for i in range(2)])
    assert (ref_batched - ref_alone).abs().max() > 0.1
    assert (ref_batched[0] - batched[0]).abs().max() > 0.1

    # At batch size 1 the two formulas are the same.
    for i in range(2):
        torch.testing.assert_close(
            gdf.guide(c[i : i + 1], u[i : i + 1], 4.0, 0.7),
            ref_guide_whole_batch(c[i : i + 1], u[i : i + 1], 4.0),
            atol=1e-6,
            rtol=1e-6,
        )


# ----------------------------------------------------------------------------------------------------------------------
# 6. The sampling loop
# ----------------------------------------------------------------------------------------------------------------------

SHAPE = (3, 5, 5)


def toy_denoiser(x, r):
    """Deterministic and per-sample: nothing mixes across the batch."""
    return 0.3 * torch.tanh(x) + 0.5 * x * r.view(-1, 1, 1, 1) + r.view(-1, 1, 1, 1)


def manual_sample(denoiser, seeds, steps, shift, t_start=1.0, sampler="ddpm", x_init=None):
    """GDF.sample followed by hand: returns the last step's x0 (the notebooks' output)."""
    generators = gens(seeds)
    eta = 1.0 if sampler == "ddpm" else 0.0
    r_range = torch.linspace(t_start, 0.0, steps + 1)
    logsnr_range = gdf.log_snr(r_range, shift)[:, None].expand(-1, len(seeds))
    x = torch.stack([torch.randn(SHAPE, generator=g) for g in generators]) if x_init is None else x_init.clone()
    x0 = None
    for i in range(steps):
        logsnr, logsnr_prev = logsnr_range[i], logsnr_range[i + 1]
        eps = denoiser(x, gdf.noise_cond(logsnr))
        a2, a2_prev = logsnr.sigmoid().view(-1, 1, 1, 1), logsnr_prev.sigmoid().view(-1, 1, 1, 1)
        a, b, a_prev, b_prev = a2.sqrt(), (1 - a2).sqrt(), a2_prev.sqrt(), (1 - a2_prev).sqrt()
        x0 = (x - b * eps) / a
        if i + 1 == steps:  # cascade skips the last step's noise draw: that x is never used
            break
        sigma = eta * (b_prev**2 / b**2).sqrt() * (1 - a**2 / a_prev**2).sqrt()
        noise = torch.stack([torch.randn(SHAPE, generator=g) for g in generators]) if eta > 0 else 0
        x = a_prev * x0 + (b_prev**2 - sigma**2).sqrt() * eps + sigma * noise
    return x0


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sample_matches_a_manual_reference_loop(sampler):
    got = gdf.sample(toy_denoiser, gens([5, 9]), SHAPE, steps=6, shift=2.0, sampler=sampler)
    want = manual_sample(toy_denoiser, [5, 9], steps=6, shift=2.0, sampler=sampler)
    assert got.shape == (2, *SHAPE) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sample_is_deterministic_and_batch_independent(sampler):
    def run(seeds):
        return gdf.sample(toy_denoiser, gens(seeds), SHAPE, steps=5, shift=2.0, sampler=sampler)

    both = run([5, 9])
    alone = torch.cat([run([5]), run([9])])
    torch.testing.assert_close(both, alone, atol=1e-6, rtol=0)
    assert torch.equal(run([5, 9]), both)
    same = run([5, 5])
    assert torch.equal(same[0], same[1])
    torch.testing.assert_close(same[0], both[0], atol=1e-6, rtol=0)
    assert (both[0] - both[1]).abs().max() > 1e-2


def test_ddpm_noise_staged_in_runs_gives_the_same_samples_and_holds_a_bounded_amount(monkeypatch):
    """Many steps of a large latent draw their DDPM noise in runs of a bounded size (not all steps' at once), with the
    same draws in the same order: the samples are the same whatever the run length."""
    events = []  # "r": one draw of noise, "d": one denoiser call
    real = gdf.randn

    def drawing(shape, generators, device=None):
        events.append("r")
        return real(shape, generators, device)

    def denoising(x, cond):
        events.append("d")
        return toy_denoiser(x, cond)

    monkeypatch.setattr(gdf, "randn", drawing)
    whole = gdf.sample(denoising, gens([5, 9]), SHAPE, steps=7, shift=2.0, sampler="ddpm")
    assert "".join(events) == "r" + "r" * 6 + "d" * 7  # the usual request: all the noise before the first step
    events.clear()
    monkeypatch.setattr(gdf, "NOISE_STAGE_BYTES", 2 * 4 * 2 * math.prod(SHAPE))  # room for two steps' noise
    runs = gdf.sample(denoising, gens([5, 9]), SHAPE, steps=7, shift=2.0, sampler="ddpm")
    assert "".join(events) == "r" + "rrdd" * 3 + "d"  # two steps' noise at a time; the last step needs none
    assert torch.equal(runs, whole)


def test_ddpm_and_ddim_differ_and_ddpm_uses_fresh_noise():
    ddpm = gdf.sample(toy_denoiser, gens([5]), SHAPE, steps=5, shift=2.0, sampler="ddpm")
    ddim = gdf.sample(toy_denoiser, gens([5]), SHAPE, steps=5, shift=2.0, sampler="ddim")
    assert (ddpm - ddim).abs().max() > 1e-2
    # Same initial noise: generators seeded alike; DDIM draws nothing after it, DDPM draws per step.
    g_ddim, g_ddpm = gens([5, 5])
    gdf.sample(toy_denoiser, [g_ddim], SHAPE, steps=5, sampler="ddim")
    gdf.sample(toy_denoiser, [g_ddpm], SHAPE, steps=5, sampler="ddpm")
    after_init = gens([5])[0]
    torch.randn(SHAPE, generator=after_init)
    assert torch.equal(g_ddim.get_state(), after_init.get_state())
    # DDPM: one draw per step but the last (its x is never used; the x0 returned does not depend on it).
    for _ in range(5 - 1):
        torch.randn(SHAPE, generator=after_init)
    assert torch.equal(g_ddpm.get_state(), after_init.get_state())


def test_sample_returns_the_last_steps_x0_and_reports_every_step():
    seen = []
    out = gdf.sample(
        toy_denoiser, gens([7]), SHAPE, steps=4, shift=2.0, callback=lambda i, x0, x: seen.append((i, x0.clone()))
    )
    assert [i for i, _ in seen] == [0, 1, 2, 3]
    assert torch.equal(seen[-1][1], out)


def test_sample_model_sees_shifted_r_schedule():
    rs = []

    def recording(x, r):
        rs.append(r.clone())
        return toy_denoiser(x, r)

    gdf.sample(recording, gens([1, 2]), SHAPE, steps=4, shift=2.0, sampler="ddim")
    want = [ref_noise_cond(ref_log_snr(t, 2.0)) for t in (1.0, 0.75, 0.5, 0.25)]
    assert len(rs) == 4
    for r, w in zip(rs, want):
        assert r.shape == (2,)
        np.testing.assert_allclose(r.double().numpy(), [w, w], atol=1e-5, rtol=0)
    assert rs[0][0].item() == pytest.approx(0.9936, abs=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# 7. img2img: t_start < 1 with x_init, and diffuse
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t, shift", [(0.8, 1.0), (0.3, 2.0), (1.0, 4.0)])
def test_diffuse_is_a_x0_plus_b_noise(t, shift):
    torch.manual_seed(8)
    x0, noise = torch.randn(2, *SHAPE), torch.randn(2, *SHAPE)
    a, b = ref_scalers(ref_log_snr(t, shift))
    torch.testing.assert_close(gdf.diffuse(x0, t, noise, shift), a * x0 + b * noise, atol=1e-5, rtol=1e-5)


def test_img2img_starts_from_x_init_at_t_start():
    torch.manual_seed(9)
    x_init = gdf.diffuse(torch.randn(2, *SHAPE), 0.8, torch.randn(2, *SHAPE), shift=1.0)  # the notebook's recipe
    seen = []

    def recording(x, r):
        seen.append((x.clone(), r.clone()))
        return toy_denoiser(x, r)

    generators = gens([3, 4])
    out = gdf.sample(recording, generators, SHAPE, steps=3, shift=2.0, t_start=0.8, x_init=x_init, sampler="ddpm")
    assert len(seen) == 3
    assert torch.equal(seen[0][0], x_init)
    r0 = ref_noise_cond(ref_log_snr(0.8, 2.0))
    np.testing.assert_allclose(seen[0][1].double().numpy(), [r0, r0], atol=1e-5, rtol=0)
    assert torch.equal(seen[0][1], gdf.noise_cond(gdf.log_snr(torch.full((2,), 0.8), 2.0)))
    # The r values walk linspace(0.8, 0, 4)[:-1].
    for (_, r), t in zip(seen, (0.8, 0.8 * 2 / 3, 0.8 / 3)):
        np.testing.assert_allclose(r.double().numpy(), ref_noise_cond(ref_log_snr(t, 2.0)), atol=1e-5, rtol=0)
    # No initial noise is drawn with x_init: the first DDPM step's noise is the generators' first draw.
    logsnr = gdf.log_snr(torch.full((2,), 0.8), 2.0)
    logsnr_prev = gdf.log_snr(torch.full((2,), 0.8 * 2 / 3), 2.0)
    eps0 = toy_denoiser(x_init, gdf.noise_cond(logsnr))
    first_noise = gdf.randn(SHAPE, gens([3, 4]))
    x1 = gdf.ddpm_step(gdf.predict_x0(x_init, eps0, logsnr), eps0, logsnr, logsnr_prev, first_noise)
    torch.testing.assert_close(seen[1][0], x1, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(
        out, manual_sample(toy_denoiser, [3, 4], 3, 2.0, t_start=0.8, x_init=x_init), atol=1e-5, rtol=1e-5
    )


def test_img2img_ddim_touches_no_generator():
    x_init = torch.randn(1, *SHAPE)
    (g,) = gens([3])
    before = g.get_state()
    gdf.sample(toy_denoiser, [g], SHAPE, steps=3, t_start=0.5, x_init=x_init, sampler="ddim")
    assert torch.equal(g.get_state(), before)


# ----------------------------------------------------------------------------------------------------------------------
# 8. Errors
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [0, -1])
def test_sample_rejects_no_steps(steps):
    with pytest.raises(ValueError, match="steps"):
        gdf.sample(toy_denoiser, gens([1]), SHAPE, steps=steps)


def test_sample_rejects_unknown_sampler_and_lists_the_allowed():
    with pytest.raises(ValueError, match="euler") as info:
        gdf.sample(toy_denoiser, gens([1]), SHAPE, steps=2, sampler="euler")
    assert "ddpm" in str(info.value) and "ddim" in str(info.value)


def test_single_step_sample_is_the_first_x0():
    """steps=1: one model call at t_start, x0 of that call, no noise beyond the initial draw."""
    (g,) = gens([2])
    out = gdf.sample(toy_denoiser, [g], SHAPE, steps=1, shift=2.0)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))[None]
    logsnr = torch.tensor([ref_log_snr(1.0, 2.0)], dtype=torch.float32)
    a, b = (float(v[0]) for v in ref_scalers(logsnr.double().numpy()))
    eps = toy_denoiser(x, gdf.noise_cond(gdf.log_snr(torch.tensor([1.0]), 2.0)))
    torch.testing.assert_close(out, (x - b * eps) / a, atol=1e-4, rtol=1e-5)
    assert math.isfinite(out.abs().max().item())


@pytest.mark.gpu
def test_the_sampling_loop_never_waits_for_the_device():
    """On a GPU: Stage C's guided sampling loop (the tiny model) queues every step without a host-device
    synchronisation; torch raises on any (a blocking copy, .item(), a data-dependent branch)."""
    from cascade.family import tiny_models
    from cascade.pipeline import prior_conditions

    models = tiny_models(device="cuda")
    cond, uncond = prior_conditions(models, models.text_encoder.encode(["a cat", ""]), 1)
    denoiser = gdf.guided_denoiser(models.stage_c, cond, uncond, 4.0)
    steps_seen = []
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        x0 = gdf.sample(denoiser, gens([0]), (16, 4, 4), steps=4, device="cuda",
                        callback=lambda i, x0, x: steps_seen.append(i))  # fmt: skip
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert steps_seen == [0, 1, 2, 3] and x0.shape == (1, 16, 4, 4) and x0.is_cuda
