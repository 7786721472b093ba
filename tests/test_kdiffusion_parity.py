"""The functional sampler against k-diffusion's ``sample_dpm_2`` (the code KDPM2 comes from), given the same
denoiser and the same sigmas: the same trajectory up to the rounding of two evaluation orders."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kdiffusion_reference import load_sampling

from kdpm2core import functional as F

MEAN, STD = torch.tensor([1.0, -0.5]), 0.5


def gaussian_denoiser(x, sigma):
    """The exact denoiser of N(MEAN, STD^2): a per-item sigma (k-diffusion's ``(batch,)``) or a 0-d one (ours)."""
    sigma = sigma.reshape(-1, 1)
    mean = MEAN.to(x.dtype)
    return (STD**2 * x + sigma**2 * mean) / (STD**2 + sigma**2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("steps", [2, 10, 25])
def test_sample_equals_k_diffusion_sample_dpm_2(dtype, steps):
    k = load_sampling()
    # float32-representable sigmas: a plan stores custom sigmas in float32, so both sides start from the same
    sigmas = k.get_sigmas_karras(steps, 0.03, 14.6).to(torch.float32).to(dtype)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(steps), dtype=dtype) * sigmas[0]
    theirs = k.sample_dpm_2(gaussian_denoiser, x.clone(), sigmas, disable=True)
    plan = F.make_plan(
        sigmas=sigmas.tolist(), backend="torch", dtype=str(dtype).removeprefix("torch."), prediction_type="sample"
    )
    ours = F.sample(plan, gaussian_denoiser, x.clone(), denoiser=True)
    # Each side rounds at most 6 times per substep (k-diffusion: x - D, / sigma, sigma_mid - sigma, * dt, + x;
    # ours: the table's coefficients to the dtype, two products and two sums), on values at most twice the
    # trajectory's scale since |dt| <= sigma. The Gaussian denoiser makes every substep's map non-expansive
    # (x -> x + dt * sigma / (STD^2 + sigma^2) * (x - MEAN) with dt < 0), so errors add up without growth:
    # at most 2 sides x 12 u x substeps of the scale.
    u = torch.finfo(dtype).eps / 2
    substeps = 2 * steps - 1
    scale = float(torch.maximum(x.abs().max(), theirs.abs().max()))
    bound = 2 * 12 * u * substeps * scale
    error = float((ours - theirs).abs().max())
    assert ours.dtype == dtype and error <= bound, f"max difference {error:.3g} > bound {bound:.3g} (scale {scale:.3g})"
    if dtype == torch.float64:
        assert error <= 1e-12 * scale  # the float64 figure; the bound above is tighter


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("steps", "eta", "s_noise"), [(5, 1.0, 1.0), (10, 1.0, 1.0), (25, 0.5, 0.8), (10, 1.3, 1.0)])
def test_sample_equals_k_diffusion_sample_dpm_2_ancestral(dtype, steps, eta, s_noise):
    """DPM2 a given the same noise: k-diffusion draws one noise array per step (``noise_sampler``); our loop asks
    for noise on every substep (``noise(index)``) and uses it on the midpoint substep of each step that has
    one, so substep ``index`` gets the noise of the step it belongs to. eta = 1.3 clamps steps to
    sigma_up = sigma_next, sigma_down = 0: one Euler substep and no noise, in both.

    k-diffusion computes ``sigma_down = sqrt(sigma_next**2 - sigma_up**2)``, which loses ``u * (sigma /
    sigma_next)**2`` relative accuracy (see kdpm2core.schedule.ancestral_step, which avoids it): the schedules
    here keep consecutive sigmas within a ratio of 8.4 (5 Karras steps), where that is below the bound; on fewer,
    wider steps k-diffusion's own rounding exceeds the bound, not ours."""
    k = load_sampling()
    sigmas = k.get_sigmas_karras(steps, 0.03, 14.6).to(torch.float32).to(dtype)
    generator = torch.Generator().manual_seed(steps)
    x = torch.randn(64, 2, generator=generator, dtype=dtype) * sigmas[0]
    noises = torch.randn(steps, 64, 2, generator=generator, dtype=dtype)
    drawn = iter(noises)
    theirs = k.sample_dpm_2_ancestral(
        gaussian_denoiser,
        x.clone(),
        sigmas,
        disable=True,
        eta=eta,
        s_noise=s_noise,
        noise_sampler=lambda *_: next(drawn),
    )
    plan = F.make_plan(
        sigmas=sigmas.tolist(),
        backend="torch",
        dtype=str(dtype).removeprefix("torch."),
        prediction_type="sample",
        eta=eta,
        s_noise=s_noise,
    )
    step_of = torch.from_numpy(np.cumsum(_euler_rows(plan)) - 1).long()
    ours = F.sample(plan, gaussian_denoiser, x.clone(), denoiser=True, noise=lambda index: noises[step_of[index]])
    # As the deterministic test above, plus the noise term: k-diffusion rounds s_noise * sigma_up, the product
    # with the noise and the sum (3 roundings), ours the coefficient and one multiply-add (3 at most), on values
    # within the scale: 2 sides x (12 + 3) u x substeps of the scale. The map stays non-expansive (adding noise is
    # a shift that does not depend on x).
    u = torch.finfo(dtype).eps / 2
    substeps = F.num_substeps(plan)
    scale = float(torch.maximum(x.abs().max(), theirs.abs().max()))
    bound = 2 * 15 * u * substeps * scale
    error = float((ours - theirs).abs().max())
    assert ours.dtype == dtype and error <= bound, f"max difference {error:.3g} > bound {bound:.3g} (scale {scale:.3g})"
    if dtype == torch.float64:
        assert error <= 1e-12 * scale
    else:
        assert error <= 1e-5 * scale


def _euler_rows(plan):
    """1 on each step's first (Euler) substep: the row at which a step starts."""
    return plan.table[:, 5].cpu().numpy()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_eta_zero_is_the_deterministic_sampler_bit_for_bit(dtype):
    sigmas = load_sampling().get_sigmas_karras(10, 0.03, 14.6).to(torch.float32).tolist()
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=dtype) * sigmas[0]
    name = str(dtype).removeprefix("torch.")
    deterministic = F.make_plan(sigmas=sigmas, backend="torch", dtype=name, prediction_type="sample")
    zero = F.make_plan(sigmas=sigmas, backend="torch", dtype=name, prediction_type="sample", eta=0.0)
    assert torch.equal(zero.table, deterministic.table)
    ours = F.sample(zero, gaussian_denoiser, x.clone(), denoiser=True)
    assert torch.equal(ours, F.sample(deterministic, gaussian_denoiser, x.clone(), denoiser=True))
    ancestral = F.make_plan(sigmas=sigmas, backend="torch", dtype=name, prediction_type="sample", eta=1.0)
    assert not torch.equal(F.sample(ancestral, gaussian_denoiser, x.clone(), denoiser=True, seed=0), ours)


def gaussian_velocity(x, s):
    """The exact velocity ``E[noise - x0 | x_s]`` of N(MEAN, STD^2) for the flow ``x_s = (1 - s) x0 + s noise``.

    Given x_s, x0 is Gaussian with mean ``MEAN + (1 - s) STD^2 / V (x - (1 - s) MEAN)``, ``V = (1 - s)^2 STD^2
    + s^2``; then ``v = (x - E[x0 | x]) / s``."""
    s = s.reshape(-1, 1)
    mean = MEAN.to(x.dtype)
    variance = (1 - s) ** 2 * STD**2 + s**2
    denoised = mean + (1 - s) * STD**2 / variance * (x - (1 - s) * mean)
    return (x - denoised) / s


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("steps", [2, 10, 25])
def test_flow_plan_equals_k_diffusion_sample_dpm_2_on_the_flow_denoiser(dtype, steps):
    """ComfyUI's way to sample a flow model with k-diffusion: ``D(x, s) = x - s v(x, s)`` on the schedule of s."""
    k = load_sampling()
    plan = F.make_plan(
        num_inference_steps=steps,
        backend="torch",
        dtype=str(dtype).removeprefix("torch."),
        prediction_type="flow_prediction",
        shift=3.0,
    )
    host = plan.info.base
    sigmas = torch.tensor(list(host.sigma_in[host.table[:, 5] == 1]) + [0.0], dtype=dtype)  # float32 values
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(steps), dtype=dtype)
    theirs = k.sample_dpm_2(
        lambda x, s: x - s.reshape(-1, 1) * gaussian_velocity(x, s), x.clone(), sigmas, disable=True
    )
    state, ours = F.init(plan, x), x.clone()
    for _ in range(F.num_substeps(plan)):  # the flow rows, fed the velocity at the sigma of each substep
        model_input, s = F.model_inputs(plan, state, ours, denoiser=True)
        (ours, _), state = F.step(plan, state, gaussian_velocity(model_input, s), ours)
    # As above, each side rounds at most 12 times per substep on values of the trajectory's scale (k-diffusion
    # also through D = x - s v and back). The flow map of this Gaussian expands by at most
    # sqrt(STD^2 (1 - s)^2 + s^2) / min over s of it = 0.5 / 0.447 < 1.2 (below s = 0.2), so a factor 2 covers it.
    u = torch.finfo(dtype).eps / 2
    substeps = 2 * steps - 1
    scale = float(torch.maximum(x.abs().max(), theirs.abs().max()))
    bound = 2 * 2 * 12 * u * substeps * scale
    error = float((ours - theirs).abs().max())
    print(f"flow {dtype} {steps} steps: max difference {error / scale:.3g} of the scale")
    assert ours.dtype == dtype and error <= bound, f"max difference {error:.3g} > bound {bound:.3g} (scale {scale:.3g})"
    if dtype == torch.float64:
        assert error <= 1e-12 * scale
