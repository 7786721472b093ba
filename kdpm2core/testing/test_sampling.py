"""Sampling on every shape and dtype: results keep dtype, shape and device, inputs are never written, and the
values agree with the NumPy backend.

The NumPy reference runs in float64 from the same (dtype-rounded) starting sample, so the tolerance is the
roundoff of the dtype under test, two units per substep, on the trajectory's scale.
"""

from __future__ import annotations

import numpy as np
import pytest

from kdpm2core.testing.cases import toy_model
from kdpm2core.testing.support import EPS, Case, assert_close

SHAPES = [(), (5,), (2, 3, 4, 4), (1, 2, 2, 3, 3)]
STEPS = 3  # 5 substeps: two midpoint substeps and the final Euler substep
CONFIG = {"beta_schedule": "scaled_linear", "timestep_spacing": "leading", "steps_offset": 1}


def _rtol(dtype: str) -> float:
    """Two roundoffs of the dtype per substep, on the trajectory's scale, over 2 * STEPS - 1 substeps.

    Each substep rounds about five times (model, scaling, the two combinations), mostly on values well below
    the trajectory's largest; every backend measured stays under 0.6 roundoff per substep (bfloat16 on JAX)."""
    return 2 * EPS[dtype] * (2 * STEPS - 1)


def _start(shape) -> np.ndarray:
    size = int(np.prod(shape))
    return (np.linspace(-2.0, 2.0, size) + 0.3 * np.cos(np.arange(size))).reshape(shape)


def _run(case, prediction_type, start, check_inputs: bool):
    """Sample STEPS steps from ``start`` on ``case``; returns the final sample and per-substep host copies."""
    scheduler = case.scheduler(**CONFIG, prediction_type=prediction_type)
    scheduler.set_timesteps(STEPS, device=case.device_name)
    x = case.array(start * scheduler.init_noise_sigma)
    host_t = case.to_numpy(scheduler.timesteps)
    given, results = [], []
    for k in range(len(host_t)):
        t = scheduler.timesteps[k]
        model_input = scheduler.scale_model_input(x, t)
        output = toy_model(model_input, float(host_t[k]), xp=case.xp)
        given.append((x, case.to_numpy(x), output, case.to_numpy(output)))
        x, pred = scheduler.step(output, t, x, return_dict=False)
        results.append((x, pred, case.to_numpy(x), case.to_numpy(pred)))
    if check_inputs:
        for k, (sample, sample_copy, output, output_copy) in enumerate(given):
            for name, array, copy in (("sample", sample, sample_copy), ("model_output", output, output_copy)):
                assert np.array_equal(case.to_numpy(array), copy, equal_nan=True), (
                    f"{case.label}: the {name} passed to step at substep {k} was modified in place"
                )
        for k, (prev, pred, prev_copy, pred_copy) in enumerate(results):
            assert np.array_equal(case.to_numpy(prev), prev_copy) and np.array_equal(case.to_numpy(pred), pred_copy), (
                f"{case.label}: the arrays step returned at substep {k} were overwritten by a later step"
            )
    return results


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "shape=" + ("x".join(map(str, s)) or "scalar"))
def test_sampling_dtype_shape_device_and_values(kdpm2_case, shape, prediction_type):
    what = f"shape={shape} prediction_type={prediction_type}"
    start = kdpm2_case.to_numpy(kdpm2_case.array(_start(shape)))  # representable in the dtype under test
    results = _run(kdpm2_case, prediction_type, start, check_inputs=True)
    device = kdpm2_case.backend.device_of(kdpm2_case.array(np.zeros(shape)))
    reference = _run(Case("numpy", "cpu", _numpy(), None, "float64"), prediction_type, start, check_inputs=False)
    scale = max(1.0, max(float(np.max(np.abs(r[2]))) for r in reference))
    rtol = _rtol(kdpm2_case.dtype_name)
    for k, ((prev, pred, *_), (_, _, want_prev, want_pred)) in enumerate(zip(results, reference)):
        assert_close(
            prev,
            want_prev,
            kdpm2_case,
            what=f"{what} substep {k} prev_sample",
            rtol=rtol,
            atol=rtol * scale,
            device=device,
        )
        assert_close(
            pred,
            want_pred,
            kdpm2_case,
            what=f"{what} substep {k} pred_original_sample",
            rtol=rtol,
            atol=rtol * scale,
            device=device,
        )


@pytest.mark.kdpm2_dtypes("float16", "float32", "float64")
def test_agrees_with_numpy_backend_same_dtype(kdpm2_case):
    """Same dtype on both sides: the backends may round differently, but only by a few units per substep."""
    if kdpm2_case.backend_name == "numpy":
        pytest.skip("the NumPy backend is the reference")
    shape = (2, 3, 4, 4)
    start = kdpm2_case.to_numpy(kdpm2_case.array(_start(shape)))
    numpy_case = Case("numpy", "cpu", _numpy(), None, kdpm2_case.dtype_name)
    for prediction_type in ("epsilon", "v_prediction"):
        results = _run(kdpm2_case, prediction_type, start, check_inputs=False)
        reference = _run(numpy_case, prediction_type, start, check_inputs=False)
        scale = max(1.0, max(float(np.max(np.abs(r[2]))) for r in reference))
        rtol = _rtol(kdpm2_case.dtype_name)
        for k, ((prev, *_), (_, _, want, _)) in enumerate(zip(results, reference)):
            assert_close(
                prev,
                want,
                kdpm2_case,
                what=f"numpy backend {kdpm2_case.dtype_name}, prediction_type={prediction_type}, substep {k}",
                rtol=rtol,
                atol=rtol * scale,
            )


def _numpy():
    from kdpm2core.plugins import get_backend

    return get_backend("numpy")
