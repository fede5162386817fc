"""GDF, the reference's diffusion framework, as pure functions: schedule, noise condition, samplers, guidance.

Reference: Stability-AI/StableCascade `gdf/` (`CosineSchedule(clamp_range=[1e-4, 0.9999])`, `VPScaler`,
`EpsilonTarget`, `CosineTNoiseCond`, `DDPMSampler`, `DDIMSampler`, `GDF.sample`). Both stages use this exact setup.

- The schedule gives logSNR(t) of a clamped cosine alpha-bar; `shift` adds 2 ln(1/shift) and the result is clamped
  to the unshifted range [logSNR(1), logSNR(0)].
- VP scaling: x_t = a x0 + b eps with a^2 = sigmoid(logSNR), b^2 = 1 - a^2. The models predict eps.
- The model does not see t: it sees r = the inverse of the unshifted schedule at the current logSNR.
- Sampling walks t from t_start to 0 in `steps` equal steps and returns the last step's predicted x0.

Deliberate change from the reference: the classifier-free-guidance rescale (`cfg_rho`) takes its standard deviations
per sample instead of over the whole batch, so an image never depends on its batch mates. At batch size 1 the two
are identical. Randomness comes from one CPU `torch.Generator` per sample, so a sample is the same alone or batched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

S = 0.008  # the cosine schedule's offset
ALPHA_BAR_RANGE = (1e-4, 0.9999)

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, r) -> predicted eps


def _alpha_bar(t: torch.Tensor) -> torch.Tensor:
    s = torch.tensor(S, dtype=t.dtype, device=t.device)
    min_var = torch.cos(s / (1 + s) * torch.pi * 0.5) ** 2
    var = torch.cos((s + t) / (1 + s) * torch.pi * 0.5).clamp(0, 1) ** 2 / min_var
    return var.clamp(*ALPHA_BAR_RANGE)


def _log_snr_unshifted(t: torch.Tensor) -> torch.Tensor:
    ab = _alpha_bar(t.clamp(0, 1))
    return (ab / (1 - ab)).log()


def log_snr(t: torch.Tensor, shift: float = 1.0) -> torch.Tensor:
    """logSNR of the clamped cosine schedule at t in [0, 1], shifted; float32 as the reference."""
    t = t.float()
    logsnr = _log_snr_unshifted(t)
    if shift != 1:
        logsnr = logsnr + 2 * math.log(1 / shift)
    limits = _log_snr_unshifted(torch.tensor([1.0, 0.0], device=t.device))  # (min, max), set at shift 1
    return logsnr.clamp(limits[0].item(), limits[1].item())


def noise_cond(logsnr: torch.Tensor) -> torch.Tensor:
    """The r the model sees: the unshifted cosine schedule inverted at this logSNR."""
    var = logsnr.sigmoid().clamp(0, 1)
    # min_var in the tensor's own dtype, made on the host: a tensor made on the device from a Python number is a
    # blocking copy, and this runs at every sampling step.
    min_var = (torch.cos(torch.tensor(S / (1 + S) * math.pi * 0.5, dtype=var.dtype)) ** 2).item()
    return ((var * min_var) ** 0.5).acos() / (math.pi * 0.5) * (1 + S) - S


def vp_scalers(logsnr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a2 = logsnr.sigmoid()
    return a2.sqrt(), (1 - a2).sqrt()


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *[1] * (like.dim() - 1)).to(like.device)


def diffuse(x0: torch.Tensor, t: float, noise: torch.Tensor, shift: float = 1.0) -> torch.Tensor:
    """Noise clean latents to level t (for img2img and training): a(t) x0 + b(t) noise."""
    a, b = vp_scalers(log_snr(torch.full((x0.shape[0],), float(t)), shift))
    return _per_sample(a, x0) * x0 + _per_sample(b, x0) * noise


def predict_x0(x: torch.Tensor, eps: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
    a, b = vp_scalers(logsnr)
    return (x - _per_sample(b, x) * eps) / _per_sample(a, x)


# ---------------------------------------------------------------------------------------------------------------------
# Samplers: one step each, x_t -> x_{t_prev}, given the predicted x0 and eps.
# ---------------------------------------------------------------------------------------------------------------------


def ddim_step(x0, eps, logsnr, logsnr_prev, noise: torch.Tensor | None = None, eta: float = 0.0) -> torch.Tensor:
    a, b = (_per_sample(v, x0) for v in vp_scalers(logsnr))
    a_prev, b_prev = (_per_sample(v, x0) for v in vp_scalers(logsnr_prev))
    if eta > 0:
        sigma = eta * (b_prev**2 / b**2).sqrt() * (1 - a**2 / a_prev**2).sqrt()
        return a_prev * x0 + (b_prev**2 - sigma**2).sqrt() * eps + sigma * noise
    return a_prev * x0 + b_prev * eps


def ddpm_step(x0, eps, logsnr, logsnr_prev, noise: torch.Tensor | None = None) -> torch.Tensor:
    """DDIM with eta = 1: the reference's default sampler."""
    return ddim_step(x0, eps, logsnr, logsnr_prev, noise=noise, eta=1.0)


SAMPLERS = {"ddpm": (ddpm_step, True), "ddim": (ddim_step, False)}  # name -> (step, needs fresh noise)


# ---------------------------------------------------------------------------------------------------------------------
# Guidance
# ---------------------------------------------------------------------------------------------------------------------


def guide(pred_cond: torch.Tensor, pred_uncond: torch.Tensor, cfg: float, cfg_rho: float = 0.7) -> torch.Tensor:
    """Classifier-free guidance with the reference's std rescale, the std taken per sample (see module docstring)."""
    pred_cfg = torch.lerp(pred_uncond, pred_cond, cfg)
    if cfg_rho <= 0:
        return pred_cfg
    dims = tuple(range(1, pred_cond.dim()))
    std_cond = pred_cond.std(dim=dims, keepdim=True)
    std_cfg = pred_cfg.std(dim=dims, keepdim=True)
    return cfg_rho * (pred_cfg * std_cond / (std_cfg + 1e-9)) + pred_cfg * (1 - cfg_rho)


def guided_denoiser(
    model: Callable[..., torch.Tensor],
    cond: dict[str, torch.Tensor],
    uncond: dict[str, torch.Tensor],
    cfg: float | None,
    cfg_rho: float = 0.7,
) -> Denoiser:
    """Wrap `model(x, r, **inputs)` into a denoiser `(x, r) -> eps` that applies guidance, for one sampling run.

    cfg None or 1 runs only the conditional pass (lerp(u, c, 1) is exactly c, and its rescale is the identity up to
    the 1e-9 guard), which halves the stage's cost. A model with `precompute(x, **inputs)` (Stage B, Stage C) has
    it called on the first step and its result passed at every step: the conditioning work that does not change
    between steps is done once per run.
    """
    single = cfg is None or cfg == 1
    inputs = cond if single else {k: torch.cat([cond[k], uncond[k]], dim=0) for k in cond}
    precompute = getattr(model, "precompute", None)
    prepared: dict[str, torch.Tensor] = {}

    def call(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        if not prepared:
            prepared.update(inputs if precompute is None else precompute(x, **inputs))
        return model(x, r, **prepared)

    if single:
        return call

    def denoise(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        pred_cond, pred_uncond = call(torch.cat([x, x], dim=0), r.repeat(2)).chunk(2)
        return guide(pred_cond, pred_uncond, cfg, cfg_rho)

    return denoise


# ---------------------------------------------------------------------------------------------------------------------
# The sampling loop
# ---------------------------------------------------------------------------------------------------------------------


NOISE_STAGE_BYTES = 256 << 20  # at most this much DDPM noise is drawn and held at once (float32)


def randn(shape: Sequence[int], generators: Sequence[torch.Generator], device=None) -> torch.Tensor:
    """One standard-normal sample per generator, drawn on the CPU (device-independent), stacked: (B, *shape)."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators]).to(device)


@torch.inference_mode()
def sample(
    denoiser: Denoiser,
    generators: Sequence[torch.Generator],
    shape: Sequence[int],
    steps: int,
    shift: float = 1.0,
    t_start: float = 1.0,
    sampler: str = "ddpm",
    x_init: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Run the reverse process and return the last step's predicted clean latent (B, *shape), float32.

    `generators` holds one CPU generator per sample: it draws the initial noise (unless `x_init` is given, for
    img2img with t_start < 1) and each DDPM step's noise. `callback(step, x0, x)` sees every step (previews,
    progress).
    """
    if steps < 1:
        raise ValueError(f"steps: {steps} is not allowed; use 1 or more")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: {sampler!r} is not known; allowed are {sorted(SAMPLERS)}")
    step_fn, stochastic = SAMPLERS[sampler]
    n = len(generators)
    # What the loop needs from the host is made and copied to the device before the first step: a copy from pageable
    # host memory inside the loop would wait for the device to finish the step before, leaving it idle while Python
    # queues the next one. The noise is drawn in the same order per generator as step by step (the initial noise,
    # then each DDPM step's), so the samples are the same however it is staged.
    r_range = torch.linspace(t_start, 0.0, steps + 1)
    # non_blocking: the host copies are staged at once and the device reads them in stream order, without a wait.
    to_device = lambda t: t.to(device, non_blocking=True)  # noqa: E731
    logsnr_range = to_device(log_snr(r_range, shift)[:, None].expand(-1, n).contiguous())  # (steps + 1, B)
    x = to_device(randn(shape, generators)) if x_init is None else x_init.to(device=device, dtype=torch.float32)
    # The DDPM steps' noise, in runs of `chunk` steps: all of it at once for the usual requests, in bounded runs for
    # very many steps of large latents (1,000 steps of a 2048 px Stage B batch would hold GBs). A later run is drawn
    # into pinned memory on a GPU, so its copy does not wait for the device either.
    chunk = max(1, NOISE_STAGE_BYTES // (4 * n * math.prod(shape)))
    pinned = torch.device(device).type == "cuda"
    noises = None
    x0 = x
    for i in range(steps):
        if stochastic and i + 1 < steps and i % chunk == 0:
            drawn = torch.stack([randn(shape, generators) for _ in range(min(chunk, steps - 1 - i))])
            noises = to_device(drawn.pin_memory() if pinned and i else drawn)
        logsnr, logsnr_prev = logsnr_range[i], logsnr_range[i + 1]
        eps = denoiser(x, noise_cond(logsnr)).float()
        x0 = predict_x0(x, eps, logsnr)
        if i + 1 < steps:  # the last step's x is never used: we return its x0
            x = step_fn(x0, eps, logsnr, logsnr_prev, noise=None if noises is None else noises[i % chunk])
        if callback is not None:
            callback(i, x0, x)
    return x0
