"""Schedule invariants for any options, property-based with hypothesis."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdpm2core.testing.support import describe

# The target fixture is an immutable description of a backend, so sharing it across examples is safe.
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def options(draw):
    """A valid config and step count. ``leading`` timesteps plus ``steps_offset`` can exceed the training
    range in diffusers too, so the offset is drawn below the room the spacing leaves."""
    num_train = draw(st.sampled_from([50, 100, 1000]))
    steps = draw(st.integers(1, num_train))
    config = {
        "num_train_timesteps": num_train,
        "beta_schedule": draw(st.sampled_from(["linear", "scaled_linear", "squaredcos_cap_v2"])),
        "prediction_type": draw(st.sampled_from(["epsilon", "v_prediction", "sample"])),
        "timestep_spacing": draw(st.sampled_from(["linspace", "leading", "trailing"])),
    }
    family = draw(st.sampled_from([None, "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"]))
    if family:
        config[family] = True
    if config["timestep_spacing"] == "leading":
        room = num_train - 1 - (num_train // steps) * (steps - 1)
        config["steps_offset"] = draw(st.integers(0, max(room, 0)))
    return config, steps


def _check(target, scheduler, config, n, final_zero=True):
    what = f"{target.label} [{describe(config)}, {n} steps]"
    sigmas = target.to_numpy(scheduler.sigmas)
    timesteps = target.to_numpy(scheduler.timesteps)
    assert np.all(np.isfinite(sigmas)), f"{what}: non-finite sigmas {sigmas}"
    assert np.all(np.diff(sigmas) <= 0), f"{what}: sigmas increase at {np.flatnonzero(np.diff(sigmas) > 0)}"
    if final_zero:
        assert sigmas[-1] == 0, f"{what}: last sigma is {sigmas[-1]}, not 0"
        assert len(timesteps) == 2 * n - 1, f"{what}: {len(timesteps)} timesteps, expected {2 * n - 1}"
    assert np.all(np.isfinite(timesteps)), f"{what}: non-finite timesteps"
    top = config.get("num_train_timesteps", 1000) - 1
    assert timesteps.min() >= 0 and timesteps.max() <= top, (
        f"{what}: timesteps span [{timesteps.min()}, {timesteps.max()}], outside [0, {top}]"
    )
    assert np.isfinite(scheduler.init_noise_sigma) and scheduler.init_noise_sigma >= sigmas.max() - 1e-6


@SETTINGS
@given(drawn=options())
def test_schedule_invariants(kdpm2_target, drawn):
    config, steps = drawn
    scheduler = kdpm2_target.scheduler(**config)
    scheduler.set_timesteps(steps, device=kdpm2_target.device_name)
    _check(kdpm2_target, scheduler, config, steps)


@SETTINGS
@given(
    sigmas=st.lists(st.floats(0.0009765625, 200.0, width=32), min_size=1, max_size=30, unique=True),
    final_zero=st.booleans(),
)
def test_custom_sigma_invariants(kdpm2_target, sigmas, final_zero):
    """k-diffusion style ``sigmas=``: n steps give 2n - 1 substeps when the last sigma is 0, else 2n."""
    values = sorted(sigmas, reverse=True) + ([0.0] if final_zero or len(sigmas) == 1 else [])
    scheduler = kdpm2_target.scheduler()
    scheduler.set_timesteps(sigmas=values, device=kdpm2_target.device_name)
    n = len(values) - 1
    _check(kdpm2_target, scheduler, {"sigmas": values}, n, final_zero=values[-1] == 0)
    if values[-1] > 0:
        count = len(kdpm2_target.to_numpy(scheduler.timesteps))
        assert count == 2 * n, f"{kdpm2_target.label}: {count} timesteps for {n} steps ending at {values[-1]}"
