"""Schedules, trajectories, ``add_noise`` and img2img starts against data generated once from diffusers.

The data (``data/diffusers_reference.npz``, written by :mod:`kdpm2core.testing.make_reference_data`) covers
4 beta schedules x 4 spacings x 4 sigma families x 2 prediction types x 4 step counts. Tests are grouped by
beta schedule and spacing; each checks every combination in its group and reports all that fail.

diffusers keeps its schedule in float32 (its interpolated sigmas come from float32 ``log``/``exp``) and ran
the trajectories in float64, so the float64 tolerance is set by float32 schedule rounding, not by the
backend: see DIFFUSERS_SIGMA_ULPS and DIFFUSERS_TRAJECTORY_ULPS below. For the same reason the
trajectories run in one dtype per backend, the widest it has; the other dtypes are compared with the NumPy
backend in ``test_sampling``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from kdpm2core.testing import cases
from kdpm2core.testing.cases import NOISE, ORIGINAL, ORIGINAL_NOISE, case_arrays, toy_model
from kdpm2core.testing.support import EPS, assert_close, sample_loop

GROUPS = [f"{b}/{s}" for b in cases.BETAS for s in cases.SPACINGS]
SCHEDULE_RTOL = 2.0**-22  # two float32 ulps: diffusers' float32 schedule against ours rounded to float32


def _group(group: str) -> list[dict]:
    return [case for case in cases.load()["cases"] if case["key"].startswith(group + "/")]


def _check_all(group: str, check) -> None:
    """Run ``check(case)`` for each case of ``group``; fail once, listing every combination that failed."""
    failures = []
    for case in _group(group):
        try:
            check(case)
        except AssertionError as exc:
            failures.append(f"  {case['key']}: {exc}")
    if failures:
        raise AssertionError(f"{len(failures)} option combinations failed in {group}:\n" + "\n".join(failures))


# diffusers computes its interpolated sigmas in float32 as exp(lerp(log)), which is off by up to about
# (1 + |ln sigma|) float32 ulps (11 for the sigma ~ 2e4 of squaredcos_cap_v2); the input scale inherits that.
DIFFUSERS_SIGMA_ULPS = 16
# Along a trajectory, those sigma errors pass through the substep coefficients; with v_prediction and 2 steps
# the midpoint coefficients reach ~100 and the error ~49 float32 ulps of the trajectory's scale per substep
# (measured worst case: squaredcos_cap_v2/trailing/*/v_prediction/steps=2, substep 1).
DIFFUSERS_TRAJECTORY_ULPS = 64


def _trajectory_rtol(dtype: str, substeps: int) -> float:
    """Allowed error, relative to the trajectory's scale, after ``substeps`` substeps: diffusers' float32
    schedule error plus 8 roundoffs of the dtype under test, per substep (errors add up along the loop)."""
    return (DIFFUSERS_TRAJECTORY_ULPS * 2.0**-24 + 8 * EPS[dtype]) * substeps


def _input_rtol(dtype: str) -> float:
    """Allowed relative error of one ``scale_model_input`` result against diffusers' scale."""
    return DIFFUSERS_SIGMA_ULPS * 2.0**-24 + 4 * EPS[dtype]


@pytest.mark.parametrize("group", GROUPS)
def test_schedule_matches_diffusers(kdpm2_target, group):
    device = kdpm2_target.backend.device_of(kdpm2_target.asarray(0.0, "float32"))

    def check(case):
        what = case["key"]
        scheduler = kdpm2_target.scheduler(**case["config"])
        scheduler.set_timesteps(case["steps"], device=kdpm2_target.device_name)
        timesteps, sigmas = case_arrays(case, "timesteps"), case_arrays(case, "sigmas")
        assert len(timesteps) == 2 * case["steps"] - 1, f"{what}: diffusers data has {len(timesteps)} timesteps"
        assert_close(
            scheduler.timesteps,
            timesteps,
            kdpm2_target,
            what=f"{what} timesteps",
            dtype="float32",
            rtol=SCHEDULE_RTOL,
            atol=SCHEDULE_RTOL * 1000,
            device=device,
        )
        assert_close(
            scheduler.sigmas,
            sigmas,
            kdpm2_target,
            what=f"{what} sigmas",
            dtype="float32",
            rtol=SCHEDULE_RTOL,
            atol=0,
            device=device,
        )
        expected = case["init_noise_sigma"]
        assert math.isclose(scheduler.init_noise_sigma, expected, rel_tol=SCHEDULE_RTOL), (
            f"{kdpm2_target.label} [{what}]: init_noise_sigma {scheduler.init_noise_sigma!r}, diffusers {expected!r}"
        )

    _check_all(group, check)


@pytest.mark.kdpm2_dtypes("widest")
@pytest.mark.parametrize("group", GROUPS)
def test_trajectory_matches_diffusers(kdpm2_case, group):
    """A full sampling loop with the toy model: every substep's model input, timestep, prev_sample and
    pred_original_sample against diffusers'."""

    def check(case):
        if "prev" not in case["slices"]:
            return
        scheduler = kdpm2_case.scheduler(**case["config"])
        scheduler.set_timesteps(case["steps"], device=kdpm2_case.device_name)
        scheduler.set_begin_index(0)  # see make_reference_data: diffusers' duplicate-timestep rule
        timesteps, scales = case_arrays(case, "timesteps"), case_arrays(case, "scales")
        prev, pred = case_arrays(case, "prev"), case_arrays(case, "pred")
        start = NOISE * scheduler.init_noise_sigma
        seen = []

        def model(model_input, t):
            seen.append(t)
            return toy_model(model_input, t, xp=kdpm2_case.xp)

        x, got = sample_loop(scheduler, kdpm2_case.array(start), model, kdpm2_case)
        for k, t in enumerate(seen):
            if not math.isclose(t, timesteps[k], rel_tol=SCHEDULE_RTOL, abs_tol=SCHEDULE_RTOL * 1000):
                raise AssertionError(f"{kdpm2_case.label}: substep {k} timestep {t!r}, diffusers {timesteps[k]!r}")
        scale = max(float(np.max(np.abs(start))), float(np.max(np.abs(prev))))
        samples = np.concatenate([kdpm2_case.to_numpy(kdpm2_case.array(start))[None], got["prev"][:-1]])
        for k in range(len(prev)):
            rtol = _trajectory_rtol(kdpm2_case.dtype_name, k + 1)
            # the model input is our own sample / sqrt(sigma^2 + 1), with diffusers' sigma at that substep: one
            # substep's rounding on its own scale
            want_input = samples[k] * scales[k]
            for name, values, want, tol in (
                ("prev_sample", got["prev"][k], prev[k], rtol * scale),
                ("pred_original_sample", got["pred"][k], pred[k], rtol * scale),
                (
                    "scale_model_input",
                    got["model_input"][k],
                    want_input,
                    _input_rtol(kdpm2_case.dtype_name) * np.max(np.abs(want_input)),
                ),
            ):
                err = float(np.max(np.abs(values - want)))
                if not err <= tol:
                    raise AssertionError(
                        f"{kdpm2_case.label}: substep {k} {name} max abs error {err:.3g} > allowed {tol:.3g} "
                        f"(the trajectory's scale is {scale:.3g})"
                    )
        rtol = _trajectory_rtol(kdpm2_case.dtype_name, len(prev))
        assert_close(x, prev[-1], kdpm2_case, what="final sample", rtol=rtol, atol=rtol * scale)

    _check_all(group, check)


@pytest.mark.kdpm2_dtypes("widest")
@pytest.mark.parametrize("group", GROUPS)
def test_add_noise_and_img2img_match_diffusers(kdpm2_case, group):
    """Training-style ``add_noise`` (one timestep per sample, no begin index), and an img2img run: noise
    with ``add_noise`` after ``set_begin_index``, then sample from that substep on."""
    original = kdpm2_case.array(ORIGINAL)
    noise = kdpm2_case.array(ORIGINAL_NOISE)

    def check(case):
        if "add_noise" in case["slices"]:
            scheduler = kdpm2_case.scheduler(**case["config"])
            scheduler.set_timesteps(case["steps"], device=kdpm2_case.device_name)
            host = kdpm2_case.to_numpy(scheduler.timesteps)
            timesteps = kdpm2_case.asarray(host[case["add_noise_positions"]], "float32")
            noisy = scheduler.add_noise(original, noise, timesteps)
            rtol = SCHEDULE_RTOL + 4 * EPS[kdpm2_case.dtype_name]
            assert_close(noisy, case_arrays(case, "add_noise"), kdpm2_case, what=f"{case['key']} add_noise", rtol=rtol)
        if "img2img" in case["slices"]:
            scheduler = kdpm2_case.scheduler(**case["config"])
            scheduler.set_timesteps(case["steps"], device=kdpm2_case.device_name)
            begin = case["begin_index"]
            scheduler.set_begin_index(begin)
            start = scheduler.add_noise(
                kdpm2_case.array(NOISE * 0.3),
                kdpm2_case.array(NOISE[::-1].copy()),
                scheduler.timesteps[begin : begin + 1],
            )
            rtol = SCHEDULE_RTOL + 4 * EPS[kdpm2_case.dtype_name]
            assert_close(
                start,
                case_arrays(case, "img2img_start"),
                kdpm2_case,
                what=f"{case['key']} img2img add_noise",
                rtol=rtol,
            )
            x, got = sample_loop(
                scheduler, start, lambda m, t: toy_model(m, t, xp=kdpm2_case.xp), kdpm2_case, start=begin
            )
            rtol = _trajectory_rtol(kdpm2_case.dtype_name, len(got["prev"]))
            scale = max(float(np.max(np.abs(got["prev"]))), float(np.max(np.abs(case_arrays(case, "img2img_start")))))
            assert_close(
                x,
                case_arrays(case, "img2img"),
                kdpm2_case,
                what=f"{case['key']} img2img from substep {begin}",
                rtol=rtol,
                atol=rtol * scale,
            )

    _check_all(group, check)
