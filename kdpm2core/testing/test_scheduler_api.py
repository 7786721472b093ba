"""The diffusers-facing API on every backend: ``scale_model_input``, ``add_noise``, ``set_begin_index`` starts and
config round trips (dict, ``save_config``/``from_pretrained``, and diffusers' own config JSON)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from kdpm2core.testing import cases
from kdpm2core.testing.support import EPS, assert_close

CONFIG = {"beta_schedule": "scaled_linear", "use_karras_sigmas": True, "prediction_type": "v_prediction"}


def _device(case):
    return case.backend.device_of(case.array(0.0))


def test_scale_model_input(kdpm2_case):
    """``sample / sqrt(sigma^2 + 1)`` with the substep's sigma: the step's sigma on Euler substeps, the
    interpolated one on midpoint substeps; the dtype and device are kept and the input is not modified."""
    scheduler = kdpm2_case.scheduler(**CONFIG)
    scheduler.set_timesteps(4, device=kdpm2_case.device_name)
    sigmas = kdpm2_case.to_numpy(scheduler.sigmas)
    values = np.array([[0.5, -1.25], [2.0, 3.5]])
    sample = kdpm2_case.array(values)
    for k in range(scheduler.timesteps.shape[0]):
        t = scheduler.timesteps[k]
        step_sigma, next_sigma = sigmas[k - k % 2], sigmas[k - k % 2 + 1]  # diffusers' layout s0, s1, s1, s2, ...
        sigma = step_sigma if k % 2 == 0 else math.sqrt(step_sigma * next_sigma)
        scaled = scheduler.scale_model_input(sample, t)
        assert_close(
            scaled,
            values / math.sqrt(sigma**2 + 1),
            kdpm2_case,
            what=f"substep {k} scale_model_input",
            rtol=4 * EPS[kdpm2_case.dtype_name],
            device=_device(kdpm2_case),
        )
        assert np.array_equal(kdpm2_case.to_numpy(sample), values), (
            f"{kdpm2_case.label}: scale_model_input wrote its input"
        )
        scheduler.step(sample, t, sample)


@pytest.mark.parametrize("begin_index", [None, 2])
def test_add_noise(kdpm2_case, begin_index):
    """Per-sample sigmas by timestep lookup when no begin index is set; the begin index's sigma otherwise."""
    scheduler = kdpm2_case.scheduler(**CONFIG)
    scheduler.set_timesteps(5, device=kdpm2_case.device_name)
    host_t, sigmas = kdpm2_case.to_numpy(scheduler.timesteps), kdpm2_case.to_numpy(scheduler.sigmas)
    positions = [0, 3, 8]
    if begin_index is not None:
        scheduler.set_begin_index(begin_index)
        chosen = [begin_index] * 3
    else:  # a timestep that occurs twice selects its second occurrence (diffusers' rule)
        chosen = [int(np.flatnonzero(host_t == host_t[p])[-1]) for p in positions]
    original, noise = kdpm2_case.array(cases.ORIGINAL), kdpm2_case.array(cases.ORIGINAL_NOISE)
    keep = kdpm2_case.to_numpy(original), kdpm2_case.to_numpy(noise)
    timesteps = kdpm2_case.asarray(host_t[positions], "float32")
    noisy = scheduler.add_noise(original, noise, timesteps)
    expected = keep[0] + keep[1] * sigmas[chosen][:, None]
    assert_close(
        noisy,
        expected,
        kdpm2_case,
        what=f"add_noise begin_index={begin_index}",
        rtol=4 * EPS[kdpm2_case.dtype_name],
        device=_device(kdpm2_case),
    )
    assert np.array_equal(kdpm2_case.to_numpy(original), keep[0]) and np.array_equal(
        kdpm2_case.to_numpy(noise), keep[1]
    )


def test_set_begin_index_start_equals_the_tail_of_a_full_run(kdpm2_case):
    """Starting at an even substep from the sample a full run had there continues that run exactly."""
    scheduler = kdpm2_case.scheduler(**CONFIG)
    scheduler.set_timesteps(4, device=kdpm2_case.device_name)
    scheduler.set_begin_index(0)
    host_t = kdpm2_case.to_numpy(scheduler.timesteps)
    model = lambda x, k: cases.toy_model(
        scheduler.scale_model_input(x, scheduler.timesteps[k]), float(host_t[k]), xp=kdpm2_case.xp
    )
    x = kdpm2_case.array(cases.NOISE * scheduler.init_noise_sigma)
    trajectory = [x]
    for k in range(len(host_t)):
        t = scheduler.timesteps[k]
        x = scheduler.step(model(x, k), t, x).prev_sample
        trajectory.append(x)
    begin = 4
    scheduler.set_timesteps(4, device=kdpm2_case.device_name)
    scheduler.set_begin_index(begin)
    y = trajectory[begin]
    for k in range(begin, len(host_t)):
        y = scheduler.step(model(y, k), scheduler.timesteps[k], y).prev_sample
    assert_close(y, kdpm2_case.to_numpy(x), kdpm2_case, what=f"restart at begin_index={begin}", rtol=0, atol=0)
    assert scheduler.step_index == len(host_t)


def test_odd_begin_index_is_refused(kdpm2_target):
    """A midpoint substep needs the Euler substep before it: starting there is an error, not a wrong result."""
    scheduler = kdpm2_target.scheduler()
    scheduler.set_timesteps(3, device=kdpm2_target.device_name)
    scheduler.set_begin_index(1)
    x = kdpm2_target.asarray(np.ones(3), "float32")
    with pytest.raises(ValueError, match="midpoint"):
        scheduler.step(x, scheduler.timesteps[1], x)
    with pytest.raises(ValueError, match="begin_index"):
        scheduler.set_begin_index(scheduler.timesteps.shape[0])


def _config_cases():
    return [case for case in cases.load()["cases"] if "diffusers_config_json" in case]


def test_config_round_trips(kdpm2_target, tmp_path):
    """``from_config(config)``, ``save_config`` + ``from_pretrained``, and diffusers' saved JSON all give the
    same options and the same schedule; the config is a read-only dict with attribute access."""
    failures = []
    for case in _config_cases():
        diffusers_json = json.loads(case["diffusers_config_json"])
        from kdpm2core import KDPM2DiscreteScheduler

        first = KDPM2DiscreteScheduler.from_config(diffusers_json, backend=kdpm2_target.backend_name)
        again = KDPM2DiscreteScheduler.from_config(first.config, backend=kdpm2_target.backend_name)
        directory = tmp_path / case["key"].replace("/", "_")
        first.save_config(directory)
        loaded = KDPM2DiscreteScheduler.from_pretrained(directory, backend=kdpm2_target.backend_name)
        for name, other in (("from_config(config)", again), ("save_config/from_pretrained", loaded)):
            if dict(other.config) != dict(first.config):
                failures.append(f"{case['key']}: {name} changed the config")
        for key, value in diffusers_json.items():
            if key.startswith("_"):
                continue
            mine = first.config[key]
            if (list(mine) if isinstance(mine, tuple) else mine) != value and not _close_list(mine, value):
                failures.append(f"{case['key']}: {key} is {mine!r} after from_config, diffusers saved {value!r}")
        if first.config.prediction_type != diffusers_json["prediction_type"]:
            failures.append(f"{case['key']}: attribute access disagrees")
        for scheduler in (first, again, loaded):
            scheduler.set_timesteps(case["steps"], device=kdpm2_target.device_name)
        steps = [kdpm2_target.to_numpy(s.timesteps) for s in (first, again, loaded)]
        if not (np.array_equal(steps[0], steps[1]) and np.array_equal(steps[0], steps[2])):
            failures.append(f"{case['key']}: round trips give different timesteps")
        if not np.allclose(steps[0], cases.case_arrays(case, "timesteps"), rtol=2.0**-22, atol=2.0**-22 * 1000):
            failures.append(f"{case['key']}: timesteps from diffusers' JSON differ from diffusers' own")
    assert _config_cases(), "the reference data holds no diffusers config JSON"
    assert not failures, f"{kdpm2_target.label}:\n  " + "\n  ".join(failures)
    with pytest.raises(TypeError):
        first.config["prediction_type"] = "epsilon"


def _close_list(mine, value) -> bool:
    if not isinstance(value, list):
        return False
    return len(mine) == len(value) and np.allclose(
        np.asarray(mine, dtype=float), np.asarray(value, dtype=float), rtol=1e-7
    )
