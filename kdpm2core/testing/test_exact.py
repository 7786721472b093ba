"""The sampler against mathematics: the independent float64 reference and a Gaussian with an exact ODE solution.

A denoiser-style model ``D(x, sigma)`` is turned into each prediction type's model output; the scheduler gets
the same custom ``sigmas=`` as the reference. Sigmas are float32-representable because the scheduler keeps
its schedule in float32 values (as diffusers does); the reference then sees exactly the same noise levels.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from kdpm2core.testing.reference import Gaussian, sample_dpm2, substep_sigmas
from kdpm2core.testing.support import assert_close

SIGMAS = {
    # k-diffusion style: Karras rho=7 from 14.6 to 0.03, then 0 (the last step is an Euler step)
    "karras-to-zero": np.append(
        (14.6 ** (1 / 7) + np.linspace(0, 1, 8) * (0.03 ** (1 / 7) - 14.6 ** (1 / 7))) ** 7, 0.0
    ),
    # geometric, ending at a positive sigma (every step is a midpoint step)
    "geometric-to-0.05": np.geomspace(20.0, 0.05, 6),
}


def _float32_exact(sigmas) -> np.ndarray:
    return np.asarray(sigmas, dtype=np.float32).astype(np.float64)


def _denoiser(x, sigma, xp=np):
    """A non-linear denoiser, so that errors in where it is evaluated show up (it is not exact for any data)."""
    return xp.tanh(x * (1.0 / (1.0 + sigma))) * 0.8 + x * (0.3 / (1.0 + sigma * sigma))


def _as_model_output(prediction_type, x, denoised, sigma):
    """The model output of ``prediction_type`` whose implied clean sample is ``denoised`` at ``sigma``."""
    if prediction_type == "sample":
        return denoised
    if prediction_type == "epsilon":  # x0 = x - sigma * eps
        return (x - denoised) * (1.0 / sigma)
    # v_prediction: x0 = x / (sigma^2 + 1) - sigma * v / sqrt(sigma^2 + 1)
    return (x * (1.0 / (sigma * sigma + 1.0)) - denoised) * (math.sqrt(sigma * sigma + 1.0) / sigma)


def _run(case, prediction_type, sigmas, x_start, denoiser):
    """Sample ``x_start`` along ``sigmas`` with the stateful scheduler on ``case``; the denoiser gets the sample
    and the sigma the independent reference evaluates at that substep."""
    scheduler = case.scheduler(prediction_type=prediction_type)
    scheduler.set_timesteps(sigmas=sigmas.tolist(), device=case.device_name)
    expected = substep_sigmas(sigmas)
    count = scheduler.timesteps.shape[0]
    assert count == len(expected), f"{case.label}: {count} substeps for {len(sigmas)} sigmas, expected {len(expected)}"
    x = case.array(x_start)
    for k in range(count):
        t = scheduler.timesteps[k]
        sigma = expected[k]
        output = _as_model_output(prediction_type, x, denoiser(x, sigma), sigma)
        x = scheduler.step(output, t, x).prev_sample
    return x


@pytest.mark.kdpm2_dtypes("float64")
@pytest.mark.parametrize("prediction_type", ["sample", "epsilon", "v_prediction"])
@pytest.mark.parametrize("schedule", list(SIGMAS))
def test_matches_independent_reference(kdpm2_case, prediction_type, schedule):
    """The scheduler with custom sigmas agrees with Algorithm 2 written from the paper within 1e-9."""
    sigmas = _float32_exact(SIGMAS[schedule])
    x_start = np.array([[-1.7, 0.4, 2.2], [0.0, -0.05, 1.1]]) * sigmas[0]
    expected = sample_dpm2(_denoiser, x_start, sigmas)
    got = _run(kdpm2_case, prediction_type, sigmas, x_start, lambda x, s: _denoiser(x, s, xp=kdpm2_case.xp))
    assert_close(
        got, expected, kdpm2_case, what=f"prediction_type={prediction_type} sigmas={schedule}", rtol=1e-9, atol=1e-9
    )


GAUSSIAN = Gaussian(mu=0.5, s0=0.6)
STEP_COUNTS = (8, 16, 32)  # truncation error (>1e-3 relative) stays far above float32 roundoff


@pytest.mark.kdpm2_dtypes("float32", "float64")
@pytest.mark.parametrize("prediction_type", ["sample", "epsilon"])
def test_gaussian_convergence_order(kdpm2_case, prediction_type):
    """Global error against the exact probability-flow solution shrinks as h^2: observed order in [1.85, 2.2].

    Sigmas are geometric from 10 to 0.02, so the last step is a midpoint step (no final Euler step to 0,
    which is first order and would dominate).
    """
    x_unit = np.array([-2.5, -0.6, 0.0, 0.9, 3.0])
    errors = []
    for n in STEP_COUNTS:
        sigmas = _float32_exact(np.geomspace(10.0, 0.02, n + 1))
        x_start = GAUSSIAN.mu + x_unit * math.sqrt(GAUSSIAN.s0**2 + sigmas[0] ** 2)
        x_start = kdpm2_case.to_numpy(kdpm2_case.array(x_start))  # exact in the dtype under test
        got = kdpm2_case.to_numpy(_run(kdpm2_case, prediction_type, sigmas, x_start, GAUSSIAN.denoiser))
        errors.append(float(np.max(np.abs(got - GAUSSIAN.solution(x_start, sigmas[0], sigmas[-1])))))
    orders = [math.log2(e1 / e2) for e1, e2 in zip(errors, errors[1:])]
    report = ", ".join(f"n={n}: {e:.3g}" for n, e in zip(STEP_COUNTS, errors))
    assert all(1.85 <= p <= 2.2 for p in orders), (
        f"{kdpm2_case.label} prediction_type={prediction_type}: observed orders {[round(p, 3) for p in orders]} "
        f"(errors {report}), expected about 2"
    )


# the step counts where the observed order has settled: a shift of 3 crowds the steps near s = 1 and leaves
# coarse ones near s = 0, so it needs more of them
FLOW_SCHEDULES = {"shift-1": (1.0, (8, 16, 32)), "shift-3": (3.0, (32, 64, 128))}


@pytest.mark.kdpm2_dtypes("float32", "float64")
@pytest.mark.parametrize("schedule", list(FLOW_SCHEDULES))
def test_flow_gaussian_convergence_order(kdpm2_case, schedule):
    """A flow-matching schedule on the exact velocity of one Gaussian (:mod:`kdpm2core.toy`): the global error
    against the closed-form flow solution shrinks as h^2, observed order in [1.85, 2.2].

    The last step is an Euler step from the smallest s to 0, as in every flow schedule; its error is of the
    order of that s squared, so it does not spoil the second order of a schedule spaced in s.
    """
    from kdpm2core import toy

    gaussian = toy.TOYS["gaussian"]
    shift, step_counts = FLOW_SCHEDULES[schedule]
    noise = kdpm2_case.array(np.random.default_rng(0).standard_normal((64, gaussian.dim)))
    start = kdpm2_case.to_numpy(noise)  # s = 1: the sample is the noise, exact in the dtype under test
    errors = []
    for n in step_counts:
        scheduler = kdpm2_case.scheduler(prediction_type="flow_prediction", shift=shift)
        scheduler.set_timesteps(n, device=kdpm2_case.device_name)
        got = kdpm2_case.to_numpy(toy.sample(gaussian, scheduler, noise))
        errors.append(float(np.max(np.abs(got - gaussian.exact_flow(start, 1.0, 0.0, flow=True)))))
    orders = [math.log2(e1 / e2) for e1, e2 in zip(errors, errors[1:])]
    report = ", ".join(f"n={n}: {e:.3g}" for n, e in zip(step_counts, errors))
    assert all(1.85 <= p <= 2.2 for p in orders), (
        f"{kdpm2_case.label} flow {schedule}: observed orders {[round(p, 3) for p in orders]} (errors {report}), "
        "expected about 2"
    )
