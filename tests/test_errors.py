"""Bad input raises ValueError, TypeError or LookupError (never IndexError or KeyError from deep inside) with a
message naming the offending parameter; nothing returns NaN silently. Also: custom ``sigmas=`` that work."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from kdpm2core import KDPM2DiscreteScheduler
from kdpm2core.config import MAX_CONFIG_BYTES

from conftest import BACKENDS

ACCEPTED = (ValueError, TypeError, LookupError)


def raises_naming(name: str, call, *, kinds=ACCEPTED):
    """``call()`` raises one of ``kinds`` (not IndexError/KeyError) and the message contains ``name``."""
    with pytest.raises(kinds) as info:
        call()
    assert not isinstance(info.value, (IndexError, KeyError)), repr(info.value)
    assert name in str(info.value), f"{name!r} not in {str(info.value)!r}"
    return info.value


# ---- options ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "key, value",
    [("beta_schedule", "cosine"), ("prediction_type", "eps"), ("timestep_spacing", "uniform"), ("beta_schedule", "")],
)
def test_unknown_option_values(key, value):
    error = raises_naming(key, lambda: KDPM2DiscreteScheduler(**{key: value}), kinds=ValueError)
    assert repr(value) in str(error)


@pytest.mark.parametrize("value", [0, -1, -1000])
def test_num_train_timesteps_below_one(value):
    raises_naming("num_train_timesteps", lambda: KDPM2DiscreteScheduler(num_train_timesteps=value), kinds=ValueError)


@pytest.mark.parametrize(
    "key, value",
    [
        ("num_train_timesteps", 1000.0),
        ("num_train_timesteps", "1000"),
        ("num_train_timesteps", True),
        ("steps_offset", 1.5),
        ("beta_start", "0.001"),
        ("beta_end", None),
        ("use_karras_sigmas", 1),
        ("use_beta_sigmas", "true"),
        ("prediction_type", 3),
        ("trained_betas", "0.1,0.2"),
        ("trained_betas", {"a": 0.1}),
        ("trained_betas", [[0.1, 0.2]]),
        ("trained_betas", [0.1, "x"]),
    ],
)
def test_config_value_of_wrong_type(key, value):
    raises_naming(key, lambda: KDPM2DiscreteScheduler(**{key: value}), kinds=TypeError)
    raises_naming(key, lambda: KDPM2DiscreteScheduler.from_config({key: value}), kinds=TypeError)


@pytest.mark.parametrize("key", ["beta_start", "beta_end"])
@pytest.mark.parametrize("value", [0.0, -0.1, 1.0, 1.5, math.nan, math.inf, -math.inf])
def test_betas_outside_the_open_unit_interval(key, value):
    raises_naming(key, lambda: KDPM2DiscreteScheduler(**{key: value}), kinds=ValueError)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.01, 1.2, math.nan, math.inf])
def test_trained_betas_outside_the_open_unit_interval(bad):
    betas = np.linspace(1e-4, 0.02, 100).tolist()
    betas[37] = bad
    raises_naming(
        "trained_betas", lambda: KDPM2DiscreteScheduler(num_train_timesteps=100, trained_betas=betas), kinds=ValueError
    )
    raises_naming("trained_betas", lambda: KDPM2DiscreteScheduler(trained_betas=np.asarray(betas)), kinds=ValueError)
    raises_naming("trained_betas", lambda: KDPM2DiscreteScheduler(trained_betas=[]), kinds=ValueError)


@pytest.mark.parametrize("length", [2, 999, 1001])
def test_trained_betas_must_match_num_train_timesteps(length):
    """One beta per training timestep: with another length the timesteps and sigmas disagree (with
    num_train_timesteps=1 and two betas the schedule repeats its first timestep and diffusers returns NaN)."""
    betas = np.linspace(1e-4, 0.02, length)
    raises_naming("trained_betas", lambda: KDPM2DiscreteScheduler(trained_betas=betas), kinds=ValueError)
    raises_naming("num_train_timesteps", lambda: KDPM2DiscreteScheduler(trained_betas=betas), kinds=ValueError)
    assert KDPM2DiscreteScheduler(num_train_timesteps=length, trained_betas=betas).config.num_train_timesteps == length


def test_betas_that_break_the_noise_table():
    """Each beta inside (0, 1), but the table they give is unusable: a first beta that float32 rounds away
    (sigma 0, log(0)), and a cumulative product that underflows (sigma inf). Both name the parameters."""
    raises_naming("beta_start", lambda: KDPM2DiscreteScheduler(beta_start=1e-12), kinds=ValueError)
    raises_naming(
        "beta_start",
        lambda: KDPM2DiscreteScheduler(beta_start=0.5, beta_end=0.99, num_train_timesteps=5000),
        kinds=ValueError,
    )
    raises_naming(
        "trained_betas", lambda: KDPM2DiscreteScheduler(trained_betas=[1e-12] + [0.01] * 99), kinds=ValueError
    )


@pytest.mark.parametrize(
    "families",
    [("karras", "exponential"), ("karras", "beta"), ("exponential", "beta"), ("karras", "exponential", "beta")],
)
def test_more_than_one_sigma_family(families):
    error = raises_naming(
        "sigma", lambda: KDPM2DiscreteScheduler(**{f"use_{f}_sigmas": True for f in families}), kinds=ValueError
    )
    for family in families:
        assert f"use_{family}_sigmas" in str(error)


# ---- set_timesteps ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0, -1, 2.5, True, False, "3", 3.0, [3], None])
def test_num_inference_steps_not_a_positive_integer(value):
    scheduler = KDPM2DiscreteScheduler()
    raises_naming("num_inference_steps", lambda: scheduler.set_timesteps(value))
    scheduler.set_timesteps(np.int64(3))  # NumPy integers are integers
    assert scheduler.num_inference_steps == 3 and len(scheduler.timesteps) == 5


def test_num_train_timesteps_argument_of_set_timesteps():
    scheduler = KDPM2DiscreteScheduler()
    raises_naming("num_train_timesteps", lambda: scheduler.set_timesteps(5, num_train_timesteps=0))
    raises_naming("num_train_timesteps", lambda: scheduler.set_timesteps(5, num_train_timesteps=2.0))


@pytest.mark.parametrize(
    "sigmas",
    [
        [1.0, 2.0, 0.0],
        [3.0, 3.0, 0.0],
        [5.0, 1.0, 2.0],
        [1.0],
        [],
        [[2.0, 1.0]],
        [2.0, math.nan, 0.0],
        [math.inf, 1.0, 0.0],
        [2.0, 1.0, -1.0],
        [1e39, 1.0, 0.0],
        "abc",
    ],
)
def test_custom_sigmas_must_be_decreasing_finite_and_non_negative(sigmas):
    scheduler = KDPM2DiscreteScheduler()
    raises_naming("sigmas", lambda: scheduler.set_timesteps(sigmas=sigmas))


def test_both_or_neither_of_steps_and_sigmas():
    scheduler = KDPM2DiscreteScheduler()
    raises_naming("num_inference_steps", lambda: scheduler.set_timesteps(5, sigmas=[2.0, 1.0, 0.0]), kinds=ValueError)
    raises_naming("sigmas", lambda: scheduler.set_timesteps(), kinds=ValueError)


def test_begin_index_out_of_range():
    scheduler = KDPM2DiscreteScheduler()
    scheduler.set_timesteps(5)
    for bad in (-1, 9, 100):
        raises_naming("begin_index", lambda: scheduler.set_begin_index(bad), kinds=ValueError)
    raises_naming("begin_index", lambda: scheduler.set_begin_index(1.5), kinds=TypeError)


# ---- step ------------------------------------------------------------------------------------------------------
@pytest.fixture
def ready(backend_name):
    scheduler = KDPM2DiscreteScheduler(backend=backend_name)
    scheduler.set_timesteps(3)
    b = scheduler.backend
    return scheduler, b, b.asarray(np.ones((2, 3), np.float32))


def test_model_output_and_sample_of_different_shapes(ready):
    scheduler, b, x = ready
    other = b.asarray(np.ones((3, 2), np.float32))
    error = raises_naming("model_output", lambda: scheduler.step(other, scheduler.timesteps[0], x), kinds=ValueError)
    assert "sample" in str(error) and scheduler.step_index in (None, 0)


def test_model_output_and_sample_of_different_libraries(ready):
    scheduler, b, x = ready
    foreign = [np.ones((2, 3), np.float32).tolist()]
    if scheduler.backend.name != "numpy":
        foreign.append(np.ones((2, 3), np.float32))
    elif "torch" in BACKENDS:
        import torch

        foreign.append(torch.ones(2, 3))
    for other in foreign:
        raises_naming("model_output", lambda: scheduler.step(other, scheduler.timesteps[0], x), kinds=TypeError)
        raises_naming("sample", lambda: scheduler.step(x, scheduler.timesteps[0], other), kinds=TypeError)
        raises_naming("sample", lambda: scheduler.scale_model_input(other, scheduler.timesteps[0]), kinds=TypeError)
        raises_naming("noise", lambda: scheduler.add_noise(x, other, scheduler.timesteps[:1]), kinds=TypeError)


@pytest.mark.parametrize("timestep", [123.456, -5.0, 1e9])
def test_first_timestep_not_in_the_schedule(ready, timestep):
    scheduler, b, x = ready
    raises_naming("timestep", lambda: scheduler.step(x, timestep, x), kinds=ValueError)
    raises_naming("timestep", lambda: scheduler.scale_model_input(x, timestep), kinds=ValueError)
    raises_naming(
        "timestep", lambda: scheduler.add_noise(x, x, b.asarray(np.array([timestep], np.float32))), kinds=ValueError
    )
    assert scheduler.step_index is None  # nothing was half-done


def test_timestep_that_is_not_a_number(ready):
    scheduler, b, x = ready
    raises_naming("timestep", lambda: scheduler.step(x, "999", x))
    error = raises_naming("timestep", lambda: scheduler.step(x, None, x), kinds=TypeError)  # not "timestep nan"
    assert "None" in str(error) and "nan" not in str(error)
    raises_naming("timestep", lambda: scheduler.step(x, [999.0, 998.0], x), kinds=ValueError)


def test_stepping_past_the_end(ready):
    scheduler, b, x = ready
    for t in scheduler.timesteps:
        x = scheduler.step(x, t, x).prev_sample
    assert np.all(np.isfinite(b.to_numpy(x)))
    raises_naming("step_index", lambda: scheduler.step(x, scheduler.timesteps[-1], x), kinds=ValueError)
    raises_naming("step_index", lambda: scheduler.scale_model_input(x, scheduler.timesteps[-1]), kinds=ValueError)


def test_float_timestep_against_an_integer_schedule_is_not_truncated():
    scheduler = KDPM2DiscreteScheduler()
    schedule = np.array([999, 998, 997])
    assert scheduler.index_for_timestep(998, schedule) == scheduler.index_for_timestep(998.0, schedule) == 1
    raises_naming("timestep", lambda: scheduler.index_for_timestep(998.5, schedule), kinds=ValueError)


def test_device_of_another_library_names_the_backend_to_use():
    torch = pytest.importorskip("torch")
    scheduler = KDPM2DiscreteScheduler(backend="numpy")  # what a torch pipeline gets from from_config without backend=
    error = raises_naming("device", lambda: scheduler.set_timesteps(5, device=torch.device("cpu")), kinds=ValueError)
    assert "torch.device" in str(error) and "backend='torch'" in str(error)


def test_midpoint_begin_index_without_euler_substep(ready):
    scheduler, b, x = ready
    scheduler.set_begin_index(1)  # substep 1 is the midpoint of step 0: its Euler half never ran
    raises_naming("begin_index", lambda: scheduler.step(x, scheduler.timesteps[1], x), kinds=ValueError)


# ---- config files ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "content, name, kind",
    [
        (b"{not json", "not valid JSON", ValueError),
        (b"", "not valid JSON", ValueError),
        (b"\xff\xfe\x00{}", "not valid JSON", ValueError),
        (b"[1, 2, 3]", "JSON object", ValueError),
        (b'"a string"', "JSON object", ValueError),
        (b'{"beta_start": NaN}', "NaN", ValueError),
        (b'{"beta_end": Infinity}', "Infinity", ValueError),
        (b"[" * 100000 + b"]" * 100000, "not valid JSON", ValueError),
        (json.dumps({"num_train_timesteps": "1000"}).encode(), "num_train_timesteps", TypeError),
        (json.dumps({"use_karras_sigmas": "yes"}).encode(), "use_karras_sigmas", TypeError),
        (json.dumps({"trained_betas": {"0": 0.1}}).encode(), "trained_betas", TypeError),
        (json.dumps({"beta_schedule": "cosine"}).encode(), "beta_schedule", ValueError),
    ],
)
def test_malformed_config_file(tmp_path, content, name, kind):
    (tmp_path / "scheduler_config.json").write_bytes(content)
    error = raises_naming(name, lambda: KDPM2DiscreteScheduler.from_pretrained(tmp_path), kinds=kind)
    if kind is ValueError and name in ("not valid JSON", "JSON object", "NaN", "Infinity"):
        assert "scheduler_config.json" in str(error)  # names the file


def test_huge_config_file_is_refused_before_reading(tmp_path):
    (tmp_path / "scheduler_config.json").write_bytes(b"{" + b" " * MAX_CONFIG_BYTES + b"}")
    raises_naming("scheduler_config.json", lambda: KDPM2DiscreteScheduler.from_pretrained(tmp_path), kinds=ValueError)


def test_missing_config_file(tmp_path):
    raises_naming("scheduler_config.json", lambda: KDPM2DiscreteScheduler.from_pretrained(tmp_path), kinds=(OSError,))
    raises_naming("sub", lambda: KDPM2DiscreteScheduler.from_pretrained(tmp_path, subfolder="sub"), kinds=(OSError,))


def test_from_config_of_something_that_is_not_a_dict():
    raises_naming("config", lambda: KDPM2DiscreteScheduler.from_config([("beta_start", 0.1)]), kinds=TypeError)
    raises_naming("config", lambda: KDPM2DiscreteScheduler.from_config("scheduler_config.json"), kinds=TypeError)


def test_unknown_backend():
    error = raises_naming("nope", lambda: KDPM2DiscreteScheduler(backend="nope"), kinds=LookupError)
    for name in BACKENDS:
        assert name in str(error)


# ---- custom sigmas that work ---------------------------------------------------------------------------------
def test_custom_sigmas_ending_at_zero_and_at_a_positive_value(backend_name):
    scheduler = KDPM2DiscreteScheduler(backend=backend_name)
    b = scheduler.backend
    for sigmas, substeps in (([14.6, 7.0, 3.0, 1.0, 0.3, 0.0], 9), ([14.6, 7.0, 3.0, 1.0, 0.3], 8)):
        n = len(sigmas) - 1
        scheduler.set_timesteps(sigmas=b.asarray(np.asarray(sigmas, np.float32)) if backend_name == "torch" else sigmas)
        assert scheduler.num_inference_steps == n
        assert len(scheduler.timesteps) == substeps == (2 * n - 1 if sigmas[-1] == 0 else 2 * n)
        assert scheduler.init_noise_sigma == pytest.approx(14.6, rel=1e-7)
        x = b.asarray(np.full((3,), 14.6, np.float32))
        for t in scheduler.timesteps:
            assert scheduler.state_in_first_order == (scheduler.step_index is None or scheduler.step_index % 2 == 0)
            x = scheduler.step(b.asarray(np.ones(3, np.float32)), t, x).prev_sample
        assert scheduler.step_index == substeps
        # a final Euler substep to 0 keeps its sample, as diffusers' does; a final midpoint substep clears it
        assert scheduler.state_in_first_order == (sigmas[-1] > 0)
        # epsilon = 1 everywhere: x = sigma + c exactly, so the loop lands on the last sigma
        np.testing.assert_allclose(b.to_numpy(x), sigmas[-1], atol=2e-6)


def test_custom_sigmas_above_the_training_range_in_a_plain_loop(backend_name):
    """Sigmas above the training range map to the last training timestep, so a step and its midpoint share
    timestep 999. A loop without set_begin_index must start at the Euler substep (diffusers' duplicate rule
    would pick the second match, a midpoint substep that cannot start a loop) and run to the end."""
    scheduler = KDPM2DiscreteScheduler(backend=backend_name)
    b = scheduler.backend
    scheduler.set_timesteps(sigmas=[317.0, 40.0, 2.0, 0.0])
    timesteps = b.to_numpy(scheduler.timesteps)
    assert timesteps[0] == timesteps[1] == timesteps[2] == 999.0  # Euler, midpoint, next Euler
    x = b.asarray(np.full((3,), 317.0, np.float32))
    for t in scheduler.timesteps:
        x = scheduler.step(b.asarray(np.ones(3, np.float32)), t, x).prev_sample
    assert scheduler.step_index == len(timesteps)
    np.testing.assert_allclose(b.to_numpy(x), 0.0, atol=1e-4)  # epsilon = 1 and x = sigma: lands on 0
