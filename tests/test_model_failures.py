"""A model that emits NaN or inf: the values propagate exactly where diffusers' do, and the opt-in check mode
stops the loop with a clear error naming the substep and the sigma, leaving the scheduler able to go on."""

from __future__ import annotations

import copy
import functools
import json
import warnings

import numpy as np
import pytest

from kdpm2core import KDPM2DiscreteScheduler
from kdpm2core.errors import NonFiniteError

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

STEPS = 4
POSITIONS = [1, 4]  # the elements the broken model corrupts


def model(x):
    """Elementwise like a real network's failure: a non-finite input gives a non-finite output."""
    return 0.1 * x + 0.2


def run(scheduler, sample, inject_at, value, to_host):
    """The sampling loop; at substep ``inject_at`` the model output holds ``value`` at POSITIONS.
    Returns the host (prev_sample, pred_original_sample) of every substep."""
    out = []
    for i, t in enumerate(scheduler.timesteps):
        output = model(scheduler.scale_model_input(sample, t))
        if i == inject_at:
            output = output * 1  # a fresh array: never write into the model's own output
            output[POSITIONS] = value
        prev, pred = scheduler.step(output, t, sample, return_dict=False)
        out.append((to_host(prev).copy(), to_host(pred).copy()))
        sample = prev
    return out


@functools.cache
def _diffusers_built(prediction_type):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # diffusers' own NumPy 2 warnings, thousands per build
        return diffusers.KDPM2DiscreteScheduler(prediction_type=prediction_type)


def diffusers_scheduler(prediction_type="epsilon"):
    """diffusers' KDPM2 with STEPS steps (its constructor is slow: build once, copy)."""
    reference = copy.deepcopy(_diffusers_built(prediction_type))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        reference.set_timesteps(STEPS)
    return reference


@functools.cache
def diffusers_run(start_bytes, prediction_type, inject_at, value):
    """diffusers' KDPM2 on torch float32, run once per case and shared by the backends."""
    reference = diffusers_scheduler(prediction_type)
    x = np.frombuffer(start_bytes, dtype=np.float32) * np.float32(reference.init_noise_sigma)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return run(reference, torch.from_numpy(x), inject_at, value, lambda a: a.numpy())


@pytest.fixture(scope="module")
def start():
    return np.random.default_rng(7).standard_normal(6).astype(np.float32)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])  # diffusers' KDPM2 lacks "sample"
@pytest.mark.parametrize("inject_at", [0, 1, 2, 2 * STEPS - 2])  # Euler, midpoint, next Euler, last (to 0)
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_model_output_propagates_as_in_diffusers(start, backend, prediction_type, inject_at, value):
    expected = diffusers_run(start.tobytes(), prediction_type, inject_at, value)
    ours = KDPM2DiscreteScheduler(prediction_type=prediction_type, backend=backend)
    ours.set_timesteps(STEPS)
    x = start * np.float32(ours.init_noise_sigma)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's "invalid value" on inf - inf
        got = run(ours, ours.backend.asarray(x), inject_at, value, ours.backend.to_numpy)
    assert len(got) == len(expected) == 2 * STEPS - 1
    for k, ((prev_d, pred_d), (prev, pred)) in enumerate(zip(expected, got)):
        if k < inject_at:
            assert np.all(np.isfinite(prev)) and np.all(np.isfinite(pred))
        for name, mine, theirs in (("prev_sample", prev, prev_d), ("pred_original_sample", pred, pred_d)):
            # The same elements are non-finite. Their kind may differ: where diffusers forms
            # (sample - pred_original) / sigma from two infinities it gets NaN; our float64 coefficients
            # combine the inputs directly and keep the inf.
            finite = np.isfinite(theirs)
            np.testing.assert_array_equal(np.isfinite(mine), finite, err_msg=f"{name} at substep {k}")
            np.testing.assert_allclose(mine[finite], theirs[finite], rtol=2e-5, atol=1e-5, err_msg=f"{name} at {k}")
    assert not np.all(np.isfinite(got[inject_at][0]))  # the corruption did reach the sample


def test_midpoint_substep_reads_only_stored_sample_and_model_output():
    # A documented difference from diffusers: on an epsilon midpoint substep the coefficient of ``sample`` is
    # exactly 0 (prev = stored + dt * eps), so a non-finite ``sample`` beside a finite model output leaves
    # prev_sample finite, where diffusers' (sample - pred) / sigma gives NaN. pred_original_sample, which does
    # read ``sample``, is non-finite in both; check mode catches the sample either way.
    s = KDPM2DiscreteScheduler()
    s.set_timesteps(STEPS)
    x = np.ones(3)
    x = s.step(np.full(3, 0.5), s.timesteps[0], x).prev_sample
    broken = x.copy()
    broken[0] = np.nan
    prev, pred = s.step(np.full(3, 0.5), s.timesteps[1], broken, return_dict=False)
    assert np.all(np.isfinite(prev)) and np.isnan(pred[0]) and np.all(np.isfinite(pred[1:]))
    checked = KDPM2DiscreteScheduler(check_finite=True)
    checked.set_timesteps(STEPS)
    checked.step(np.full(3, 0.5), checked.timesteps[0], np.ones(3))
    with pytest.raises(NonFiniteError, match="sample has 1 non-finite"):
        checked.step(np.full(3, 0.5), checked.timesteps[1], broken)


def diffusers_sigma_seen(inject_at: int) -> float:
    """The sigma diffusers' KDPM2 gives the model at a substep (sigma_hat, or the interpolated sigma)."""
    reference = diffusers_scheduler()
    zero, one = torch.zeros(1), torch.ones(1)
    for t in reference.timesteps[:inject_at]:
        reference.step(zero, t, one)
    table = reference.sigmas if reference.state_in_first_order else reference.sigmas_interpol
    return float(table[inject_at])


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("inject_at, kind", [(0, "Euler"), (1, "midpoint"), (2 * STEPS - 2, "Euler")])
def test_check_mode_names_substep_and_sigma(start, backend, inject_at, kind):
    pytest.importorskip(backend)
    s = KDPM2DiscreteScheduler(backend=backend, check_finite=True)
    s.set_timesteps(STEPS)
    clean = KDPM2DiscreteScheduler(backend=backend)
    clean.set_timesteps(STEPS)
    b = s.backend
    sample = b.asarray(start * np.float32(s.init_noise_sigma))
    expected = sample
    for i, t in enumerate(s.timesteps):
        output = model(s.scale_model_input(sample, t))
        expected = clean.step(model(clean.scale_model_input(expected, t)), t, expected).prev_sample
        if i == inject_at:
            host = b.to_numpy(output).copy()
            host[POSITIONS] = np.nan
            with pytest.raises(NonFiniteError) as caught:
                s.step(b.asarray(host), t, sample)
            error = caught.value
            assert isinstance(error, ValueError) and isinstance(error, FloatingPointError)
            assert (error.name, error.substep, error.count) == ("model_output", inject_at, 2)
            assert error.sigma == pytest.approx(diffusers_sigma_seen(inject_at), rel=1e-6)
            message = str(error)
            assert f"substep {inject_at}" in message and kind in message and f"sigma {error.sigma:.6g}" in message
            assert s.step_index == inject_at  # nothing moved: a retry with a good output continues the run
        sample = s.step(output, t, sample).prev_sample
    assert b.to_numpy(sample).tobytes() == b.to_numpy(expected).tobytes()


def test_check_mode_catches_overflow_in_the_result():
    s = KDPM2DiscreteScheduler(check_finite=True)
    s.set_timesteps(STEPS)
    sample = np.full(2, 3e38, dtype=np.float32)
    with pytest.raises(NonFiniteError, match="prev_sample has 2 non-finite") as caught, np.errstate(over="ignore"):
        s.step(np.full(2, 3e38, dtype=np.float32), s.timesteps[0], sample)
    assert caught.value.name == "prev_sample" and s.step_index == 0 and s.state_in_first_order


def test_check_mode_is_off_by_default_and_not_part_of_the_config(tmp_path):
    s = KDPM2DiscreteScheduler()
    s.set_timesteps(STEPS)
    prev = s.step(np.array([np.nan, 1.0]), s.timesteps[0], np.ones(2)).prev_sample
    assert np.isnan(prev[0])  # no check, no error: NaN simply propagates
    checked = KDPM2DiscreteScheduler.from_config(s.config, check_finite=True)
    assert checked.check_finite and "check_finite" not in checked.config and checked.config == s.config
    saved = json.loads(checked.save_config(tmp_path).read_text())
    assert "check_finite" not in saved
    assert not KDPM2DiscreteScheduler.from_pretrained(tmp_path).check_finite
    assert KDPM2DiscreteScheduler.from_pretrained(tmp_path, check_finite=True).check_finite
    with pytest.raises(TypeError, match="check_finite"):
        KDPM2DiscreteScheduler(check_finite="yes")
