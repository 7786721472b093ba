"""DPM2 a, the ancestral sampler, against mathematics: Gaussian data keeps the state Gaussian, with exact moments.

For data ``N(mu, s0^2)`` the exact denoiser ``D(x, sigma) = alpha x + beta`` is affine, so every substep of the
coefficient table, ``prev = a stored + b x + c D(x) + n eps``, is affine in ``(x, stored)`` plus independent
noise: from a Gaussian start the state stays Gaussian, and its mean and variance after every substep follow
from the table in closed form (float64, on the host). The same holds on a flow-matching schedule, where the
sample is ``(1 - s) x0 + s n``, the model output is the velocity ``(x - D) / s`` (affine too), and the midpoint
rows carry the rescale ``alpha_ratio`` in ``a, b, c``. The sampler runs many independent elements on the backend
under test with the portable noise (:mod:`kdpm2core.noise`, for the start and for every step), and the sample
mean and variance after every step must lie within 5 standard errors of the exact ones.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from kdpm2core import KDPM2AncestralDiscreteScheduler, noise
from kdpm2core import functional as F
from kdpm2core.config import is_flow
from kdpm2core.testing.reference import Gaussian

GAUSSIAN = Gaussian(mu=0.5, s0=0.6)
# Karras rho = 7 from 14.6 to 0.03, then 0; float32 values, as the scheduler stores custom sigmas
SIGMAS = np.asarray(
    np.append((14.6 ** (1 / 7) + np.linspace(0, 1, 8) * (0.03 ** (1 / 7) - 14.6 ** (1 / 7))) ** 7, 0.0),
    dtype=np.float32,
).astype(np.float64)
SHAPE = (16, 1024)  # 16384 independent elements (rows are batch items of the portable noise)
SEED = 20251205


def output_coefficients(sigma: float, flow: bool = False) -> tuple[float, float]:
    """``(g, h)`` of the exact model output ``g x + h`` at noise level ``sigma``: the denoiser ``D = alpha x +
    beta`` (prediction ``sample``), or on a flow schedule (``x = (1 - s) x0 + s n``) the velocity ``(x - D) /
    s``. ``E[x0 | x] = mu + signal s0^2 / var (x - signal mu)`` with ``signal = 1 - s`` (1 without flow) and
    ``var = signal^2 s0^2 + sigma^2``."""
    signal = 1.0 - sigma if flow else 1.0
    v0 = GAUSSIAN.s0**2
    var = signal**2 * v0 + sigma**2
    alpha, beta = signal * v0 / var, GAUSSIAN.mu * sigma**2 / var
    return ((1.0 - alpha) / sigma, -beta / sigma) if flow else (alpha, beta)


def exact_moments(
    table: np.ndarray, sigma_in: np.ndarray, start: tuple[float, float], *, flow: bool = False
) -> list[tuple[float, float]]:
    """Mean and variance of ``x`` after each substep, from the float64 table (columns of kdpm2core.schedule), for
    a start ``N(start[0], start[1])`` and the exact model output of :func:`output_coefficients`."""
    mean = np.array([start[0], 0.0])  # of (x, stored)
    cov = np.diag([start[1], 0.0])
    out = []
    for (a, b, c, _, _, _, n), sigma in zip(table, sigma_in):
        g, h = output_coefficients(float(sigma), flow)
        row = np.array([b + c * g, a])  # prev = row . (x, stored) + c h + n eps
        prev_mean = row @ mean + c * h
        prev_var = row @ cov @ row + n * n
        cov = np.array([[prev_var, row @ cov[:, 0]], [row @ cov[:, 0], cov[0, 0]]])  # stored' = x
        mean = np.array([prev_mean, mean[0]])
        out.append((float(prev_mean), float(prev_var)))
    return out


def _run(case, scheduler, x, functional: bool = False):
    """The loop on ``case``; returns the host copies of ``x`` after every substep. Each step continues from its
    host copy moved back (exact: float64 holds every value of the dtype), so that lazy backends (Dask) do not
    recompute the whole history at every read."""
    xs = []
    if functional:
        plan = F.make_plan(scheduler, dtype=case.dtype)
        state = F.init(plan, x)
    for k in range(len(scheduler.schedule.sigma_in)):
        g, h = output_coefficients(float(scheduler.schedule.sigma_in[k]), is_flow(scheduler.config))
        output = x * g + h  # D(x) for prediction_type "sample", the velocity on a flow schedule
        if functional:
            eps = noise.normal(case.xp, SEED, SHAPE, substep=k, dtype=case.dtype, device=plan.info.device)
            (x, _), state = F.step(plan, state, output, x, noise=eps)
        else:
            x = scheduler.step(output, scheduler.timesteps[k], x).prev_sample
        xs.append(case.to_numpy(x))
        x = case.array(xs[-1])
    return xs


#: the sampler on each kind of schedule: Karras sigmas (prediction "sample"), and SD3's flow schedule (shift 3)
SCHEDULES = ("karras", "flow")


def _scheduler(case, schedule: str):
    if schedule == "flow":
        scheduler = KDPM2AncestralDiscreteScheduler(
            prediction_type="flow_prediction", shift=3.0, backend=case.backend_name, noise_seed=SEED
        )
        scheduler.set_timesteps(8, device=case.device_name)
        return scheduler
    scheduler = KDPM2AncestralDiscreteScheduler(prediction_type="sample", backend=case.backend_name, noise_seed=SEED)
    scheduler.set_timesteps(sigmas=SIGMAS.tolist(), device=case.device_name)
    return scheduler


def _start_moments(scheduler) -> tuple[float, float]:
    """The data's noised marginal at the first noise level, the start the sampler assumes: ``N(mu, s0^2 +
    sigma^2)``, or on a flow schedule ``N((1 - s) mu, (1 - s)^2 s0^2 + s^2)`` (``N(0, 1)`` at ``s = 1``)."""
    first = float(scheduler.schedule.sigma_in[0])
    signal = 1.0 - first if is_flow(scheduler.config) else 1.0
    return signal * GAUSSIAN.mu, signal**2 * GAUSSIAN.s0**2 + first**2


def _start(case, moments: tuple[float, float]):
    z = noise.initial_latent(case.xp, SEED, SHAPE, dtype=case.dtype, device=case.device)
    return z * math.sqrt(moments[1]) + moments[0]


@pytest.mark.kdpm2_dtypes("float32")
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_gaussian_moments_after_every_substep(kdpm2_case, schedule):
    """The sample mean and variance of 16384 elements after every substep equal the exact Gaussian ones within
    5 standard errors: ``sqrt(var / N)`` for the mean, ``var sqrt(2 / (N - 1))`` for the variance (normal data).
    float32 rounding (about 1e-7 relative per substep) is far below these (5.5e-2 relative for the variance)."""
    case = kdpm2_case
    scheduler = _scheduler(case, schedule)
    host = scheduler.schedule
    assert np.any(host.table[:, 6] > 0), "the schedule adds no noise"
    start = _start_moments(scheduler)
    expected = exact_moments(host.table, host.sigma_in, start, flow=is_flow(scheduler.config))
    count = math.prod(SHAPE)
    for k, values in enumerate(_run(case, scheduler, _start(case, start))):
        mean, var = expected[k]
        got_mean, got_var = float(values.mean()), float(values.var(ddof=1))
        assert abs(got_mean - mean) <= 5 * math.sqrt(var / count), (
            f"{case.label} substep {k}: mean {got_mean:.5g}, exact {mean:.5g} (variance {var:.4g})"
        )
        assert abs(got_var - var) <= 5 * var * math.sqrt(2 / (count - 1)), (
            f"{case.label} substep {k}: variance {got_var:.5g}, exact {var:.5g}"
        )


@pytest.mark.kdpm2_dtypes("float32", "float64")
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_functional_ancestral_steps_equal_the_scheduler(kdpm2_case, schedule):
    """``functional.step`` with ``noise=`` the portable noise of ``(seed, substep)`` is the scheduler's loop with
    that ``noise_seed``, bit for bit: the same table, the same noise, the same operations."""
    case = kdpm2_case
    start = _start_moments(_scheduler(case, schedule))
    stateful = _run(case, _scheduler(case, schedule), _start(case, start))
    functional = _run(case, _scheduler(case, schedule), _start(case, start), functional=True)
    for k, (a, b) in enumerate(zip(stateful, functional)):
        assert np.array_equal(a, b), f"{case.label}: substep {k} differs"
