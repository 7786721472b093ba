"""Flow-matching (rectified-flow) schedules: diffusers' flow configs load, and the schedules equal diffusers'.

Float32 bounds: diffusers computes a flow schedule in float64 except for a few float32 operations (the lowest
training value ``1 / N`` and its shift when the scheduler is made; custom ``sigmas``, which it rounds to float32
and shifts in float32), then rounds to float32. We compute in float64 and round once. The shift
``k s / (1 + (k - 1) s)`` and the dynamic shift have a relative condition number at most 1 in ``s`` (for
``k >= 1`` and ``e^mu >= 1``), so the at most 5 float32 roundings on diffusers' side (rounding the input, two
products, the sum, the quotient) stay at most ``5 u`` relative, ``u = 2**-24``; the two final roundings to
float32 add ``2 u``: step sigmas agree to ``7 u`` (asserted with ``8 u``), and timesteps ``1000 s``, rounded once
more, to ``10 u``.
"""

import math
import warnings

import numpy as np
import pytest

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

from flow_configs import FLUX_DEV, SD3_MEDIUM  # noqa: E402

from kdpm2core import KDPM2DiscreteScheduler  # noqa: E402

U = 2.0**-24
SIGMA_RTOL = 8 * U
TIMESTEP_RTOL = 10 * U


def ours_from(config, **overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning about known keys
        return KDPM2DiscreteScheduler.from_config(config, **overrides)


def steps_of(scheduler):
    """The step values of ``s`` (Euler rows) with the final 0, and the timesteps of the Euler rows."""
    host = scheduler.schedule
    euler = host.table[:, 5] == 1
    timesteps = np.asarray(scheduler.timesteps)[euler]
    return np.append(host.sigma_in[euler], host.sigmas[-1]), timesteps


def assert_same_schedule(ours, theirs):
    sigmas, timesteps = steps_of(ours)
    expected = theirs.sigmas.double().numpy()
    assert sigmas.shape == expected.shape
    np.testing.assert_allclose(sigmas, expected, rtol=SIGMA_RTOL, atol=0)
    np.testing.assert_allclose(timesteps, theirs.timesteps.double().numpy(), rtol=TIMESTEP_RTOL, atol=0)


@pytest.mark.parametrize("config", [SD3_MEDIUM, FLUX_DEV], ids=["sd3-medium", "flux-dev"])
def test_shipped_configs_load_without_warnings_as_flow(config):
    ours = ours_from(config)
    assert ours.config.prediction_type == "flow_prediction"
    assert ours.config.shift == 3.0
    assert ours.config.use_dynamic_shifting == config.get("use_dynamic_shifting", False)
    assert ours.init_noise_sigma == 1.0
    # and back: diffusers' flow scheduler built from ours has the shipped settings
    back = diffusers.FlowMatchEulerDiscreteScheduler.from_config(ours.config)
    assert {key: back.config[key] for key in config if not key.startswith("_")} == {
        key: value for key, value in config.items() if not key.startswith("_")
    }


@pytest.mark.parametrize("steps", [1, 2, 7, 28, 50])
def test_sd3_schedule_matches_flow_match_euler(steps):
    ours, theirs = ours_from(SD3_MEDIUM), diffusers.FlowMatchEulerDiscreteScheduler.from_config(SD3_MEDIUM)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    assert_same_schedule(ours, theirs)


@pytest.mark.parametrize("mu", [0.5, 0.8, 1.15])
@pytest.mark.parametrize("steps", [4, 28])
def test_flux_dynamic_shift_with_pipeline_sigmas_matches(mu, steps):
    sigmas = np.linspace(1.0, 1 / steps, steps)  # what FluxPipeline passes
    ours, theirs = ours_from(FLUX_DEV), diffusers.FlowMatchEulerDiscreteScheduler.from_config(FLUX_DEV)
    ours.set_timesteps(sigmas=sigmas, mu=mu)
    theirs.set_timesteps(sigmas=sigmas, mu=mu)
    assert_same_schedule(ours, theirs)


OPTION_CASES = {
    "shift-1": {"shift": 1.0},
    "shift-5": {"shift": 5.0},
    "terminal": {"shift": 3.0, "shift_terminal": 0.1},
    "karras": {"shift": 3.0, "use_karras_sigmas": True},
    "exponential": {"shift": 3.0, "use_exponential_sigmas": True},
    "beta": {"shift": 3.0, "use_beta_sigmas": True},
    "linear-time-shift": {"use_dynamic_shifting": True, "time_shift_type": "linear"},
    "dynamic-karras": {"use_dynamic_shifting": True, "use_karras_sigmas": True},
    "num-train-500": {"num_train_timesteps": 500, "shift": 2.0},
}


@pytest.mark.parametrize("options", OPTION_CASES.values(), ids=OPTION_CASES)
@pytest.mark.parametrize("steps", [3, 20])
def test_flow_match_options_match(options, steps):
    if options.get("use_beta_sigmas"):
        pytest.importorskip("scipy")
    ours = KDPM2DiscreteScheduler(prediction_type="flow_prediction", **options)
    theirs = diffusers.FlowMatchEulerDiscreteScheduler(**options)
    mu = 1.7 if options.get("use_dynamic_shifting") else None
    ours.set_timesteps(steps, mu=mu)
    theirs.set_timesteps(steps, mu=mu)
    assert_same_schedule(ours, theirs)


def test_timesteps_argument_as_flow_match_without_shift():
    # diffusers keeps given timesteps as they are; with shift 1 they are s * 1000 of its sigmas, as ours
    timesteps = [1000.0, 750.0, 400.0, 120.0]
    ours = KDPM2DiscreteScheduler(prediction_type="flow_prediction")
    theirs = diffusers.FlowMatchEulerDiscreteScheduler()
    ours.set_timesteps(timesteps=timesteps)
    theirs.set_timesteps(timesteps=timesteps)
    assert_same_schedule(ours, theirs)


@pytest.mark.parametrize("steps", [1, 5, 30])
@pytest.mark.parametrize("flow_shift", [1.0, 3.0])
def test_dpmsolver_flow_sigmas_match(steps, flow_shift):
    # DPMSolverMultistepScheduler computes these in float64 and rounds once, as we do, but in another order:
    # both roundings of values a few float64 ulps apart agree to 2 u
    options = {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": flow_shift}
    ours = KDPM2DiscreteScheduler(**options)
    theirs = diffusers.DPMSolverMultistepScheduler(**options)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    sigmas, _ = steps_of(ours)
    np.testing.assert_allclose(sigmas, theirs.sigmas.double().numpy(), rtol=2 * U + 1e-15, atol=0)


def test_midpoints_are_geometric_means_and_timesteps_follow_s():
    ours = ours_from(SD3_MEDIUM)
    ours.set_timesteps(6)
    host = ours.schedule
    mid = host.table[:, 0] == 1
    hat, nxt = host.sigma_in[np.flatnonzero(mid) - 1], host.sigmas[2 : 2 * mid.sum() + 1 : 2]
    np.testing.assert_allclose(host.sigma_in[mid], np.sqrt(hat * nxt), rtol=1e-15)
    # timesteps are s * 1000, rounded once to float32
    np.testing.assert_array_equal(np.asarray(ours.timesteps), (host.sigma_in * 1000).astype(np.float32))


def test_model_input_is_the_sample_and_the_step_is_euler_in_s():
    ours = ours_from(SD3_MEDIUM)
    ours.set_timesteps(3)
    x = np.random.default_rng(0).standard_normal((2, 4))
    v = np.random.default_rng(1).standard_normal((2, 4))
    t = ours.timesteps[0]
    np.testing.assert_array_equal(ours.scale_model_input(x, t), x)
    s0, s_mid = ours.schedule.sigma_in[:2]
    prev, pred = ours.step(v, t, x, return_dict=False)
    np.testing.assert_allclose(prev, x + (s_mid - s0) * v, rtol=1e-15, atol=1e-15)  # Euler to the midpoint
    np.testing.assert_allclose(pred, x - s0 * v, rtol=1e-15, atol=1e-15)  # x0 = x - s v


def test_add_noise_is_the_flow_interpolation():
    ours = ours_from(SD3_MEDIUM)
    ours.set_timesteps(4)
    x0, noise = np.full((1, 3), 2.0), np.full((1, 3), -1.0)
    s = float(np.float32(ours.schedule.sigma_in[2]))
    noisy = ours.add_noise(x0, noise, np.asarray([ours.timesteps[2]]))
    np.testing.assert_allclose(noisy, (1 - s) * x0 + s * noise, rtol=1e-15)
    np.testing.assert_array_equal(ours.scale_noise(x0, np.asarray([ours.timesteps[2]]), noise), noisy)


def test_mu_is_ignored_without_dynamic_shifting_as_in_diffusers():
    a, b = ours_from(SD3_MEDIUM), ours_from(SD3_MEDIUM)
    a.set_timesteps(5)
    b.set_timesteps(5, mu=2.0)
    np.testing.assert_array_equal(a.schedule.table, b.schedule.table)


def test_state_dict_keeps_mu():
    ours = ours_from(FLUX_DEV)
    ours.set_timesteps(sigmas=np.linspace(1, 0.25, 4), mu=0.9)
    other = ours_from(FLUX_DEV)
    other.load_state_dict(ours.state_dict())
    np.testing.assert_array_equal(other.schedule.table, ours.schedule.table)
    assert math.isclose(other.state_dict()["schedule"]["mu"], 0.9)


@pytest.mark.parametrize(
    ("options", "call", "message"),
    [
        ({"invert_sigmas": True}, {}, "invert_sigmas"),
        ({"stochastic_sampling": True}, {}, "stochastic_sampling"),
        ({"time_shift_type": "cubic"}, {}, "time_shift_type"),
        ({"shift": 0.0}, {}, "shift must be > 0"),
        ({"shift_terminal": 1.0}, {}, "shift_terminal"),
        ({"use_flow_sigmas": True, "prediction_type": "epsilon"}, {}, "use_flow_sigmas"),
        ({"use_dynamic_shifting": True, "prediction_type": "epsilon"}, {}, "use_dynamic_shifting"),
        ({"prediction_type": "epsilon"}, {"num_inference_steps": 4, "mu": 1.0}, "mu"),
        ({"prediction_type": "epsilon"}, {"timesteps": [999, 500]}, "timesteps"),
        ({"use_dynamic_shifting": True}, {"num_inference_steps": 4}, "mu must be passed"),
        ({}, {"sigmas": [1.5, 0.5]}, "sigmas of a flow-matching schedule"),
        ({}, {"sigmas": [0.5, 0.4], "timesteps": [500, 400]}, "not both"),
    ],
)
def test_bad_flow_options_name_the_option(options, call, message):
    with pytest.raises((TypeError, ValueError), match=message):
        scheduler = KDPM2DiscreteScheduler(**{"prediction_type": "flow_prediction", **options})
        scheduler.set_timesteps(**call)


def test_checkpoint_mid_step_resumes_a_dynamic_shift_run_bit_for_bit(tmp_path):
    from kdpm2core.checkpoint import load_checkpoint, save_checkpoint

    def velocity(x, t):
        return np.tanh(x) - x * (t / 1000.0)

    def run(scheduler, x, start, stop):
        for k in range(start, stop):
            t = scheduler.timesteps[k]
            x = scheduler.step(velocity(scheduler.scale_model_input(x, t), t), t, x, return_dict=False)[0]
        return x

    whole = ours_from(FLUX_DEV)
    whole.set_timesteps(sigmas=np.linspace(1, 0.2, 5), mu=1.1)
    x0 = np.random.default_rng(3).standard_normal((2, 3))
    expected = run(whole, x0, 0, len(whole.timesteps))
    first = ours_from(FLUX_DEV)
    first.set_timesteps(sigmas=np.linspace(1, 0.2, 5), mu=1.1)
    half = run(first, x0, 0, 3)  # after an Euler substep: the stored sample goes into the checkpoint
    save_checkpoint(tmp_path, first, x=half)
    resumed, arrays = load_checkpoint(tmp_path)
    assert resumed.config.prediction_type == "flow_prediction" and resumed.step_index == 3
    np.testing.assert_array_equal(run(resumed, arrays["x"], 3, len(resumed.timesteps)), expected)


def test_functional_plan_takes_the_flow_options_and_refuses_churn():
    from kdpm2core import functional as F

    scheduler = ours_from(FLUX_DEV)
    scheduler.set_timesteps(7, mu=0.7)
    plan = F.make_plan(num_inference_steps=7, backend="numpy", dtype="float64", mu=0.7, **FLUX_DEV_OPTIONS)
    np.testing.assert_array_equal(plan.table, scheduler.schedule.table)
    np.testing.assert_array_equal(plan.input_scale, np.ones(13))
    assert F.init_noise_sigma(plan) == 1.0
    with pytest.raises(ValueError, match="s_churn"):
        F.make_plan(num_inference_steps=4, backend="numpy", prediction_type="flow_prediction", s_churn=1.0)


FLUX_DEV_OPTIONS = {key: value for key, value in FLUX_DEV.items() if not key.startswith("_")}
FLUX_DEV_OPTIONS["prediction_type"] = "flow_prediction"
