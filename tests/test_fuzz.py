"""Property-based fuzzing (hypothesis) of every configuration option, step count, custom sigmas and the JSON
config loader: only the documented validation errors, never NaN or inf in a schedule, the functional API
agrees with the stateful one, and any bytes give a config or a clear error.

Budget: a few thousand examples in about 30 s of one core; ``deadline=None`` because the machine is shared.
Set ``KDPM2_FUZZ_SCALE`` (e.g. 10) for a longer local run.
"""

from __future__ import annotations

import json
import math
import os
import string
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdpm2core import KDPM2DiscreteScheduler
from kdpm2core import config as _config

SCALE = float(os.environ.get("KDPM2_FUZZ_SCALE", "1"))
DOCUMENTED = (ValueError, TypeError, LookupError)
# an error is clear when it names what was wrong: a parameter, a config key, or the input's source
NAMES = set(_config.DEFAULTS) | {
    "num_inference_steps",
    "sigmas",
    "num_train_timesteps",
    "timestep",
    "_class_name",
    "_use_default_values",
}


def fuzz_settings(examples: int):
    return settings(
        max_examples=max(1, int(examples * SCALE)),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        derandomize=SCALE == 1,  # CI runs the same examples every time; a longer local run explores
    )


def some(valid, *invalid):
    """Mostly valid values, sometimes one of ``invalid``."""
    return st.one_of(valid, valid, valid, *invalid) if invalid else valid


junk = st.sampled_from([None, "", "1", [], {}, 1.5, True, -1, float("nan"), float("inf")])
probability = st.floats(min_value=1e-6, max_value=0.2)
configs = st.fixed_dictionaries(
    {},
    optional={
        "num_train_timesteps": some(st.integers(1, 1200), st.integers(-3, 0), junk),
        "beta_start": some(probability, st.floats(allow_nan=True, allow_infinity=True), junk),
        "beta_end": some(probability, st.floats(-1, 2), junk),
        "beta_schedule": some(st.sampled_from(_config.CHOICES["beta_schedule"]), st.text(max_size=8), junk),
        "trained_betas": some(
            st.none(),
            st.lists(st.floats(1e-7, 0.5), min_size=1, max_size=300),
            st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=20),
            st.lists(junk, max_size=3),
            junk,
        ),
        "use_karras_sigmas": some(st.booleans(), junk),
        "use_exponential_sigmas": some(st.booleans(), junk),
        "use_beta_sigmas": some(st.booleans(), junk),
        "prediction_type": some(st.sampled_from(_config.CHOICES["prediction_type"]), st.text(max_size=8), junk),
        "timestep_spacing": some(st.sampled_from(_config.CHOICES["timestep_spacing"]), junk),
        "steps_offset": some(st.integers(0, 60), st.integers(-5, -1), junk),
    },
)


@st.composite
def consistent_configs(draw):
    """Mostly one trained beta per training timestep, as the constructor requires; sometimes not."""
    config = draw(configs)
    betas = config.get("trained_betas")
    if isinstance(betas, list) and betas and draw(st.integers(0, 3)):
        config["num_train_timesteps"] = len(betas)
    return config


step_counts = some(st.integers(1, 80), st.integers(81, 1500), st.integers(-2, 0), junk)


def assert_clear(error: BaseException, *names: str) -> None:
    message = str(error)
    assert isinstance(error, DOCUMENTED), f"{type(error).__name__}: {message}"
    assert any(name in message for name in (*NAMES, *names)), f"unclear {type(error).__name__}: {message!r}"


def assert_finite_schedule(s: KDPM2DiscreteScheduler) -> None:
    host = s._host
    for name, values in [
        ("timesteps", np.asarray(s.timesteps)),
        ("sigmas", np.asarray(s.sigmas)),
        ("sigma_in", host.sigma_in),
        ("table", host.table),
    ]:
        assert np.all(np.isfinite(values)), f"{name} holds NaN or inf: {values}"
    assert math.isfinite(s.init_noise_sigma) and s.init_noise_sigma > 0
    assert np.all(host.sigmas >= 0) and np.all(host.sigma_in > 0)
    assert len(s.timesteps) == len(host.table) == len(host.sigma_in)
    assert np.all(np.isin(host.table[:, 5], (0.0, 1.0))) and host.table[0, 5] == 1  # the first substep is Euler


def run_loop(s: KDPM2DiscreteScheduler) -> np.ndarray:
    """A whole float64 loop with a bounded model: the result must be finite."""
    x = np.array([-1.0, 0.5, 2.0]) * s.init_noise_sigma
    for t in s.timesteps:
        x = s.step(np.tanh(s.scale_model_input(x, t)), t, x).prev_sample
    return x


def check_functional_agrees(s: KDPM2DiscreteScheduler, final: np.ndarray, **request) -> None:
    """The functional API, built from the same options (``request``: the step count or the sigmas) and given
    the same model, ends bit for bit where the stateful loop ended; so does a plan taken from the scheduler."""
    try:
        from kdpm2core import functional
    except ImportError:
        return
    for plan in (
        # the options only: the config also lists the ones left at their defaults (_use_default_values)
        functional.make_plan(
            **request, backend="numpy", dtype="float64", **{key: s.config[key] for key in _config.DEFAULTS}
        ),
        functional.make_plan(s, dtype="float64"),
    ):
        x = np.array([-1.0, 0.5, 2.0]) * functional.init_noise_sigma(plan)
        ours = functional.sample(plan, lambda scaled, t: np.tanh(scaled), x)
        np.testing.assert_array_equal(ours, final)


@fuzz_settings(800)
@given(config=consistent_configs(), steps=step_counts)
def test_any_config_and_step_count(config, steps):
    try:
        s = KDPM2DiscreteScheduler(**config)
    except DOCUMENTED as error:
        assert_clear(error)
        return
    assert_finite_schedule(s)  # the training-length schedule built by the constructor
    try:
        s.set_timesteps(steps)
    except DOCUMENTED as error:
        assert_clear(error)
        return
    assert_finite_schedule(s)
    substeps = 2 * steps - 1
    assert len(s.timesteps) == substeps and s.num_inference_steps == steps
    if steps <= 80:
        final = run_loop(s)  # no ValueError either: a repeated first timestep starts at its Euler half
        assert np.all(np.isfinite(final))
        if steps <= 20:
            check_functional_agrees(s, final, num_inference_steps=steps)


sigma_lists = some(
    st.lists(st.floats(0, 1e4), min_size=2, max_size=40).map(lambda v: sorted(set(v), reverse=True)),
    st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=6),
    st.lists(junk, max_size=3),
    junk,
)


@fuzz_settings(500)
@given(sigmas=sigma_lists, prediction_type=st.sampled_from(_config.CHOICES["prediction_type"]))
def test_any_custom_sigmas(sigmas, prediction_type):
    s = KDPM2DiscreteScheduler(prediction_type=prediction_type)
    try:
        s.set_timesteps(sigmas=sigmas)
    except DOCUMENTED as error:
        assert_clear(error)
        return
    assert_finite_schedule(s)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow or invalid-value warning from inside kdpm2core
        final = run_loop(s)  # a repeated first timestep (sigmas above the training range) starts at its Euler half
    assert np.all(np.isfinite(final))
    check_functional_agrees(s, final, sigmas=sigmas)


def test_custom_sigmas_above_training_range():
    # Found by the fuzzer: sigmas above the training sigma_max (about 14.6 here) clamp to timestep 999, twice,
    # so diffusers' duplicate rule would start a loop without set_begin_index on a midpoint substep; ours starts
    # at its Euler half.
    s = KDPM2DiscreteScheduler()
    s.set_timesteps(sigmas=[317.0, 2.0])
    assert np.all(np.isfinite(run_loop(s)))


# -- the JSON config loader -------------------------------------------------------------------------------------
short_text = st.text(st.characters(codec="utf-8"), max_size=6)
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False), short_text
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(short_text, inner, max_size=3),
    max_leaves=6,
)
config_objects = st.dictionaries(
    st.one_of(
        st.sampled_from(sorted(_config.DEFAULTS) + ["_class_name", "clip_sample"]),
        st.text(string.ascii_lowercase, max_size=6),
    ),
    st.one_of(
        json_values,
        st.sampled_from([1000, 0.00085, 0.012, "linear", "v_prediction", "trailing", True, 1, [0.01, 0.02]]),
    ),
    max_size=8,
)


@fuzz_settings(1500)
@given(
    data=st.one_of(
        st.binary(max_size=200), st.binary(max_size=200), config_objects.map(lambda c: json.dumps(c).encode())
    )
)
def test_any_bytes_give_a_config_or_a_clear_error(data):
    try:
        parsed = _config.parse_config_bytes(data, source="fuzzed.json")
    except ValueError as error:  # TypeError would be our bug here: the input is bytes
        assert "fuzzed.json" in str(error)
        return
    assert isinstance(parsed, dict)


@fuzz_settings(600)
@given(config=config_objects)
def test_any_json_object_gives_a_scheduler_or_a_clear_error(config):
    parsed = _config.parse_config_bytes(json.dumps(config).encode())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # unknown keys are reported with a warning
        try:
            s = KDPM2DiscreteScheduler.from_config(parsed)
        except DOCUMENTED as error:
            assert_clear(error)
            return
    assert_finite_schedule(s)


_directory = tempfile.TemporaryDirectory(prefix="kdpm2-fuzz-")


@fuzz_settings(150)
@given(data=st.one_of(st.binary(max_size=100), config_objects.map(lambda c: json.dumps(c).encode())))
def test_from_pretrained_reads_any_file(data):
    folder = Path(_directory.name)
    (folder / _config.CONFIG_NAME).write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        try:
            s = KDPM2DiscreteScheduler.from_pretrained(folder)
        except DOCUMENTED as error:
            assert_clear(error, str(folder))
            return
    assert_finite_schedule(s)


def test_size_limit(tmp_path):
    limit = _config.MAX_CONFIG_BYTES
    padded = b'{"beta_schedule": "linear"' + b" " * (limit - 27) + b"}"
    assert len(padded) == limit and _config.parse_config_bytes(padded) == {"beta_schedule": "linear"}
    with pytest.raises(ValueError, match="limit"):
        _config.parse_config_bytes(padded + b" ")
    (tmp_path / _config.CONFIG_NAME).write_bytes(padded + b" ")
    with pytest.raises(ValueError, match=f"{_config.CONFIG_NAME}.*limit"):
        KDPM2DiscreteScheduler.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "data, words",
    [
        (b"[" * 100_000, ["not valid JSON"]),  # recursion
        (b'{"num_train_timesteps": ' + b"9" * 5000 + b"}", ["not valid JSON", "digits"]),
        (b'{"beta_start": NaN}', ["NaN"]),
        (b"\xff\xfe{}", ["utf-8"]),
        (b"[1, 2]", ["JSON object"]),
    ],
)
def test_hostile_json_gives_clear_value_error(data, words):
    with pytest.raises(ValueError) as caught:
        _config.parse_config_bytes(data, source="hostile.json")
    assert "hostile.json" in str(caught.value)
    for word in words:
        assert word in str(caught.value)


def test_huge_values_from_a_file_are_rejected_not_allocated():
    # a downloaded config must not make the scheduler allocate without bound
    for key, value in [("num_train_timesteps", 10**12), ("num_train_timesteps", 2**64), ("beta_start", 1e308)]:
        with pytest.raises(DOCUMENTED) as caught:
            KDPM2DiscreteScheduler.from_config({key: value})
        assert key in str(caught.value)
