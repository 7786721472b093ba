"""DPM2 a on flow-matching schedules: ComfyUI's RF ancestral step (``sample_dpm_2_ancestral_RF``) as rows of the
coefficient table, against a float64 loop written here from its formulas.

Per step from ``s`` to ``s_next``: ``s_down = s_next (1 + (s_next / s - 1) eta)``, ``alpha_ratio = (1 - s_next) /
(1 - s_down)``, ``s_up = sqrt(s_next**2 - s_down**2 alpha_ratio**2)``; DPM2 from ``s`` to ``s_down`` (Euler to
``sqrt(s s_down)``, then the midpoint step; one Euler step where ``s_down`` is 0), then ``x = alpha_ratio x +
s_noise s_up noise``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from flow_configs import SD3_MEDIUM

from kdpm2core import KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler, noise
from kdpm2core import functional as F
from kdpm2core.config import validate_config
from kdpm2core.schedule import build_schedule, flow_ancestral_step, substep_table

MEAN, STD = 0.5, 0.6  # the data, N(MEAN, STD^2) per element
SEED = 1205
SHAPE = (4, 64)


def gaussian_denoiser(x, s: float):
    """``E[x0 | x_s]`` for ``x_s = (1 - s) x0 + s n``: ``MEAN + (1 - s) STD^2 / V (x - (1 - s) MEAN)``, ``V = (1 -
    s)^2 STD^2 + s^2`` (affine in ``x``; any array type)."""
    s = float(s)
    gain = (1 - s) * STD**2 / ((1 - s) ** 2 * STD**2 + s**2)
    return x * gain + (MEAN - gain * (1 - s) * MEAN)


def gaussian_velocity(x, s: float):
    """The model output of a flow model, ``v = (x - D(x, s)) / s``."""
    return (x - gaussian_denoiser(x, s)) * (1.0 / float(s))


def reference_dpm2_ancestral_rf(x, s_values, eta: float, s_noise: float, noise_of_step):
    """The float64 loop, straight from the formulas above, with the denoiser ``D(x, s) = x - s v(x, s)``. Returns
    the sample after each step, and ``max |term|`` over the additions it made (the scale of its rounding)."""
    x = np.asarray(x, dtype=np.float64)
    history, scale = [], float(np.abs(x).max())
    for i, (s, s_next) in enumerate(zip(s_values[:-1], s_values[1:])):
        s, s_next = float(s), float(s_next)
        downstep_ratio = 1 + (s_next / s - 1) * eta
        s_down = s_next * downstep_ratio
        alpha_ratio = (1 - s_next) / (1 - s_down)
        s_up = math.sqrt(s_next**2 - s_down**2 * alpha_ratio**2)
        d = (x - (x - s * gaussian_velocity(x, s))) / s
        if s_down == 0:
            x = x + d * (s_down - s)
        else:
            s_mid = math.sqrt(s * s_down)
            x_mid = x + d * (s_mid - s)
            d_mid = (x_mid - (x_mid - s_mid * gaussian_velocity(x_mid, s_mid))) / s_mid
            moved = x + d_mid * (s_down - s)
            scaled_noise = noise_of_step(i) * (s_noise * s_up)
            scale = max(scale, float(np.abs(x_mid).max()), float(np.abs(d_mid * (s_down - s)).max()))
            x = alpha_ratio * moved + scaled_noise
            scale = max(scale, float(np.abs(scaled_noise).max()))
        scale = max(scale, float(np.abs(x).max()))
        history.append(x)
    return history, scale


def sd3_scheduler(steps: int = 12) -> KDPM2AncestralDiscreteScheduler:
    scheduler = KDPM2AncestralDiscreteScheduler.from_config(SD3_MEDIUM, backend="numpy", noise_seed=SEED)
    scheduler.set_timesteps(steps)
    return scheduler


def step_values(scheduler) -> np.ndarray:
    """The schedule's ``s`` at each step start (Euler rows), and the final 0."""
    host = scheduler.schedule
    return np.append(host.sigma_in[host.table[:, 5] == 1], host.sigmas[-1])


def growth(table: np.ndarray, sigma_in: np.ndarray) -> float:
    """How much an error in ``(x, stored)`` can grow over the whole run for the affine velocity ``g x + h``: each
    substep maps the error to ``(b + c g) e_x + a e_stored`` (and ``stored' = x``), so the max-norm grows by at
    most ``max(1, |b + c g| + |a|)`` per substep."""
    total = 1.0
    for (a, b, c, *_), s in zip(table, sigma_in):
        g = float(gaussian_velocity(1.0, s) - gaussian_velocity(0.0, s))
        total *= max(1.0, abs(b + c * g) + abs(a))
    return total


def start_noise(dtype) -> np.ndarray:
    return noise.initial_latent(np, SEED, SHAPE, dtype=np.dtype(dtype).type)  # s = 1: the sample is the noise


# ---- the rows ------------------------------------------------------------------------------------------------------
def test_flow_ancestral_step_restores_the_flow_marginal():
    """``alpha_ratio`` and ``s_up`` take ``x_down = (1 - s_down) x0 + s_down n`` to signal ``1 - s_next`` and noise
    variance ``s_next**2``; ``s_down = s_next**2 / s`` at eta = 1; the step to 0 has ``s_down = 0``, ratio 1,
    ``s_up = 0``; eta = 0 is ``(s_next, 0, 1)`` exactly."""
    s = np.array([1.0, 0.9, 0.5, 0.01, 0.3])
    s_next = np.array([0.9, 0.5, 0.01, 0.001, 0.0])
    for eta in (1.0, 0.5, 1e-9):
        down, up, ratio = flow_ancestral_step(s, s_next, eta)
        np.testing.assert_allclose(ratio * (1 - down), 1 - s_next, rtol=1e-15)
        np.testing.assert_allclose((ratio * down) ** 2 + up**2, s_next**2, rtol=1e-14, atol=0)
        np.testing.assert_allclose(down, s_next * (1 + (s_next / s - 1) * eta), rtol=1e-14, atol=0)
        assert down[-1] == 0 and ratio[-1] == 1 and up[-1] == 0
    np.testing.assert_allclose(flow_ancestral_step(s, s_next, 1.0)[0], s_next**2 / s, rtol=1e-15)
    down, up, ratio = flow_ancestral_step(s, s_next, 0.0)
    assert np.array_equal(down, s_next) and not np.any(up) and np.all(ratio == 1)


def test_smallest_eta_is_the_deterministic_table_bit_for_bit():
    """The formulas themselves, not a shortcut for eta = 0: at the smallest positive eta ``s_down == s_next``,
    ``alpha_ratio == 1`` and ``s_up == 0`` exactly, so the table is DPM2's."""
    options = validate_config(dict(SD3_MEDIUM, prediction_type="flow_prediction"))
    plain = build_schedule(options, 9)
    tiny = build_schedule(options, 9, eta=5e-324)
    for got, expected in zip(tiny, plain):
        np.testing.assert_array_equal(got, expected)
    assert not np.any(plain.table[:, 6])


def test_ancestral_rows_scale_the_midpoint_row_by_alpha_ratio():
    scheduler = sd3_scheduler(6)
    host = scheduler.schedule
    steps = step_values(scheduler)
    down, up, ratio = flow_ancestral_step(steps[:-1], steps[1:], 1.0)
    _, _, deterministic, _ = substep_table(steps[:-1], down, "flow_prediction")  # DPM2 to s_down, eta 0
    midpoint = host.table[:, 0] != 0
    np.testing.assert_array_equal(host.table[~midpoint], deterministic[~midpoint])
    np.testing.assert_allclose(host.table[midpoint, :3], deterministic[midpoint, :3] * ratio[:-1, None], rtol=1e-15)
    np.testing.assert_array_equal(host.table[midpoint, 3:6], deterministic[midpoint, 3:6])
    np.testing.assert_array_equal(host.table[midpoint, 6], up[:-1])
    assert host.table[-1, 5] == 1 and host.table[-1, 6] == 0  # the last step: one Euler substep, no noise
    # timesteps are s * 1000 at every substep, the midpoints sqrt(s * s_down) included
    np.testing.assert_array_equal(np.asarray(scheduler.timesteps), (host.sigma_in * 1000).astype(np.float32))
    plan = F.make_plan(scheduler, dtype="float64")  # rebuilt on the host with the class's eta = 1: the same rows
    np.testing.assert_array_equal(plan.table, host.table)
    np.testing.assert_array_equal(plan.timesteps, scheduler.timesteps)


def test_eta_that_overshoots_is_refused_naming_eta():
    with pytest.raises(ValueError, match="eta=2.0 takes s_down below 0"):
        F.make_plan(sigmas=[1.0, 0.3, 0.1], prediction_type="flow_prediction", eta=2.0, backend="numpy")
    # eta > 1 where every step keeps s_down >= 0 (and the step to 0) is fine
    F.make_plan(sigmas=[1.0, 0.9, 0.8], prediction_type="flow_prediction", eta=1.5, backend="numpy")


# ---- against the reference -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(("eta", "s_noise"), [(1.0, 1.0), (0.5, 0.8)])
def test_sample_and_stateful_loop_match_the_reference(dtype, eta, s_noise):
    """``functional.sample(seed=...)`` (a k-diffusion denoiser) and the stateful ancestral scheduler (eta 1, a
    velocity model) against the float64 loop, given the portable noise of each step's midpoint substep."""
    scheduler = sd3_scheduler()
    s_values = step_values(scheduler)
    x0 = start_noise(dtype)
    plan = F.make_plan(scheduler, dtype=dtype, eta=eta, s_noise=s_noise)
    midpoint_of_step = np.flatnonzero(np.asarray(plan.table)[:, 0] != 0)  # each step's noise: its midpoint's

    def noise_of_step(i):
        return noise.normal(np, SEED, SHAPE, substep=int(midpoint_of_step[i]), dtype=np.dtype(dtype).type).astype(
            np.float64
        )

    history, scale = reference_dpm2_ancestral_rf(x0, s_values, eta, s_noise, noise_of_step)
    functional = F.sample(plan, gaussian_denoiser, x0.copy(), denoiser=True, seed=SEED)
    runs = {"functional": functional}
    if eta == 1.0 and s_noise == 1.0:  # the class's eta
        x = x0.copy()
        for k, t in enumerate(scheduler.timesteps):
            x = scheduler.step(gaussian_velocity(x, scheduler.schedule.sigma_in[k]), t, x).prev_sample
        runs["stateful"] = x
    # Each side rounds at most 20 times per substep, each an error of at most u times a value within ``scale``
    # (the largest term either loop adds): ours the coefficients to the dtype (4), the products and sums of the
    # combination (7), the model (the sigma it gets, its coefficients, product, sum, and the velocity's
    # difference and product: 6 at most), the reference fewer. The table's maps grow an error by at most
    # ``growth`` over the run. float64 adds the coefficients' own rounding: the reference computes ``s_up`` as a
    # difference of squares, relative error ``u (s_next / s_up)**2``, taken into the scale by ``cancel``.
    u = float(np.finfo(dtype).eps) / 2
    steps = s_values[:-1]
    down, up, _ = flow_ancestral_step(steps, s_values[1:], eta)
    cancel = float(np.max((s_values[1:][up > 0] / up[up > 0]) ** 2))
    substeps = len(plan.table)
    bound = 2 * growth(np.asarray(plan.table), np.asarray(plan.sigmas)) * substeps * (20 * u + 2.0**-53 * cancel)
    bound *= scale
    for name, got in runs.items():
        assert got.dtype == np.dtype(dtype)
        error = float(np.abs(got - history[-1]).max())
        assert error <= bound, f"{name}: max difference {error:.3g} > bound {bound:.3g} (scale {scale:.3g})"
        assert error <= (1e-12 if dtype == "float64" else 1e-5) * scale, name  # the figures


def test_eta_zero_is_the_deterministic_flow_sampler_bit_for_bit():
    scheduler = sd3_scheduler()
    deterministic = KDPM2DiscreteScheduler.from_config(SD3_MEDIUM, backend="numpy")
    deterministic.set_timesteps(12)
    x0 = start_noise("float32")
    zero = F.make_plan(scheduler, eta=0.0)
    plain = F.make_plan(deterministic)
    np.testing.assert_array_equal(zero.table, plain.table)
    np.testing.assert_array_equal(zero.timesteps, plain.timesteps)

    def model(x, t):  # a velocity model of the timestep, nonlinear
        return np.tanh(x) * (float(t) / 1000.0) - 0.3 * x

    ours = F.sample(zero, model, x0.copy())
    np.testing.assert_array_equal(ours, F.sample(plain, model, x0.copy()))
    ancestral = F.sample(F.make_plan(scheduler), model, x0.copy(), seed=SEED)
    assert float(np.abs(ancestral - ours).max()) > 1e-2  # the noise does something


# ---- the exact distribution ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_exact_final_distribution_tends_to_the_data(eta):
    """For Gaussian data the state stays Gaussian, its moments in closed form from the table
    (kdpm2core.testing.test_ancestral.exact_moments, whose sampled counterpart the conformance suite checks on
    every backend). From ``N(0, 1)`` at s = 1 along ``s`` evenly spaced to 0: the final mean is the data's
    exactly (the rescale ``alpha_ratio`` keeps the signal at ``1 - s_next`` after every step), and the variance
    error, towards the data's ``STD**2``, shrinks at an observed order in [1.5, 2.2] from 64 to 512 steps, no
    slower than deterministic DPM2's on the same schedules (whose orders there rise towards 2 as slowly, 1.5 to
    1.8: the steps near s = 0 take geometric midpoints of values a factor 2 apart)."""
    from kdpm2core.testing.test_ancestral import GAUSSIAN, exact_moments

    errors = {}
    for sampler_eta in (eta, 0.0):
        errors[sampler_eta] = []
        for steps in (64, 128, 256, 512):
            s = np.linspace(1.0, 0.0, steps + 1)
            sigma_in, _, table, _ = substep_table(s[:-1], s[1:], "flow_prediction", eta=sampler_eta)
            mean, var = exact_moments(table, sigma_in, (0.0, 1.0), flow=True)[-1]
            assert mean == pytest.approx(GAUSSIAN.mu, abs=1e-14)
            errors[sampler_eta].append(abs(var - GAUSSIAN.s0**2))
    orders, plain = ([math.log2(e1 / e2) for e1, e2 in zip(e, e[1:])] for e in errors.values())
    assert all(1.5 <= p <= 2.2 and p >= q - 0.1 for p, q in zip(orders, plain)), (orders, plain, errors)
    assert errors[eta][-1] <= 2e-4


def test_from_config_takes_noise_seed():
    """``noise_seed`` is a constructor argument, not a config key: ``from_config`` (and ``from_pretrained``) pass
    it on, so that a pipeline's scheduler swap can fix the step noise."""
    scheduler, unused = KDPM2AncestralDiscreteScheduler.from_config(SD3_MEDIUM, return_unused_kwargs=True, noise_seed=9)
    assert scheduler.noise_seed == 9 and "noise_seed" not in unused and "noise_seed" not in scheduler.config
    with pytest.raises(ValueError, match="noise_seed"):
        KDPM2AncestralDiscreteScheduler.from_config(SD3_MEDIUM, noise_seed=-1)


# ---- a flow pipeline -----------------------------------------------------------------------------------------------
def test_tiny_sd3_pipeline_runs_the_ancestral_scheduler():
    """``from_config(pipe.scheduler.config)`` in a tiny StableDiffusion3Pipeline: flow pipelines do not pass their
    generator to ``step``, so the ancestral noise is the portable noise of ``noise_seed``; the run is a function
    of (generator, noise_seed): two runs agree bit for bit, another noise_seed or generator seed differs."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    import tiny_flow_pipelines as tiny

    pipe = tiny.sd3_pipeline()
    config = pipe.scheduler.config

    def run(noise_seed, generator_seed):
        pipe.scheduler = KDPM2AncestralDiscreteScheduler.from_config(config, backend="torch", noise_seed=noise_seed)
        assert pipe.scheduler.config.prediction_type == "flow_prediction"
        inputs = tiny.prompt_inputs(pipe)
        del inputs["latents"]  # drawn by the pipeline from the generator
        generator = torch.Generator().manual_seed(generator_seed)
        return tiny.run(pipe, steps=5, generator=generator, **inputs)

    first = run(3, 0)
    assert torch.isfinite(first).all()
    assert torch.equal(first, run(3, 0))
    assert not torch.allclose(first, run(4, 0), rtol=1e-3, atol=1e-3)
    assert not torch.allclose(first, run(3, 1), rtol=1e-3, atol=1e-3)
