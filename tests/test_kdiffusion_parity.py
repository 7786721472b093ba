"""The functional sampler against k-diffusion's ``sample_dpm_2`` (the code KDPM2 comes from), given the same
denoiser and the same sigmas: the same trajectory up to the rounding of two evaluation orders."""

from __future__ import annotations

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
