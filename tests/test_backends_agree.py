"""NumPy, PyTorch and JAX give the same numbers, keep the caller's dtype, and never write into their inputs.

Bounds: 1e-5 relative in float32 and 1e-12 in float64 (the issue's). Every backend multiplies the same
float64 coefficients, rounded to the sample's dtype, into the same arrays, so only the order of the
roundings can differ: a few float32 ulps after a whole loop.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from kdpm2core import KDPM2DiscreteScheduler

from conftest import BACKENDS, initial_noise, relative_error, synthetic_model

SHAPES = [(), (7,), (2, 3, 4, 4), (1, 2, 3, 4, 4)]
CONFIGS = [
    {},
    {"prediction_type": "v_prediction", "use_karras_sigmas": True, "beta_schedule": "scaled_linear"},
    {"prediction_type": "sample", "timestep_spacing": "trailing"},
]


def run_loop(backend, shape, dtype_name="float32", steps=12, options=None, check_aliasing=False):
    """A full loop on ``backend``; returns host float64 copies of every (prev_sample, pred_original_sample)."""
    options = options or {}
    scheduler = KDPM2DiscreteScheduler(**options, backend=backend)
    scheduler.set_timesteps(steps)
    b = scheduler.backend
    dtype = b.dtype(dtype_name)
    sample = b.asarray(initial_noise(shape), dtype=dtype) * scheduler.init_noise_sigma
    out, returned = [], []
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(sample, t)
        model_output = b.asarray(
            synthetic_model(b.to_numpy(model_input), float(t), options.get("prediction_type", "epsilon")), dtype=dtype
        )
        sample, pred = scheduler.step(model_output, t, sample, return_dict=False)
        assert sample.dtype == dtype and pred.dtype == dtype and model_input.dtype == dtype
        assert tuple(sample.shape) == tuple(shape) and tuple(pred.shape) == tuple(shape)
        out.append((b.to_numpy(sample).astype(np.float64), b.to_numpy(pred).astype(np.float64)))
        if check_aliasing:
            returned.append((sample, pred))
    if check_aliasing:  # no returned array was a buffer that a later step wrote into
        for (prev, pred), (prev_copy, pred_copy) in zip(returned, out):
            np.testing.assert_array_equal(b.to_numpy(prev).astype(np.float64), prev_copy)
            np.testing.assert_array_equal(b.to_numpy(pred).astype(np.float64), pred_copy)
    return out


def max_relative(a, b) -> float:
    return max(max(relative_error(x, y), relative_error(p, q)) for (x, p), (y, q) in zip(a, b))


@pytest.fixture(scope="module")
def numpy_float32():
    return {(shape, i): run_loop("numpy", shape, options=kw) for shape in SHAPES for i, kw in enumerate(CONFIGS)}


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "numpy"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("config", range(len(CONFIGS)))
def test_float32_agrees_with_numpy(backend, shape, config, numpy_float32):
    ours = run_loop(backend, shape, options=CONFIGS[config])
    assert max_relative(ours, numpy_float32[(shape, config)]) <= 1e-5


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_float64_numpy_and_torch_agree(shape):
    if "torch" not in BACKENDS:
        pytest.skip("torch is not installed")
    for kw in CONFIGS:
        a = run_loop("numpy", shape, "float64", options=kw)
        b = run_loop("torch", shape, "float64", options=kw)
        assert max_relative(a, b) <= 1e-12


def test_float64_jax_with_x64_enabled():
    """JAX has float64 only with ``jax_enable_x64``, which must be set before jax starts: a fresh process."""
    if "jax" not in BACKENDS:
        pytest.skip("jax is not installed")
    code = textwrap.dedent(
        """
        import json, sys
        sys.path.insert(0, sys.argv[1])
        import numpy as np
        from test_backends_agree import CONFIGS, max_relative, run_loop
        worst = 0.0
        for kw in CONFIGS:
            for shape in [(), (2, 3, 4, 4)]:
                worst = max(worst, max_relative(run_loop("jax", shape, "float64", options=kw), run_loop("numpy", shape, "float64", options=kw)))
        import jax
        print(json.dumps({"x64": bool(jax.config.jax_enable_x64), "worst": worst}))
        """
    )
    env = dict(os.environ, JAX_ENABLE_X64="1", JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, "-c", code, os.path.dirname(__file__)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["x64"] is True
    assert result["worst"] <= 1e-12


# ---- dtypes ----------------------------------------------------------------------------------------------------
LOW_PRECISION = [
    ("numpy", "float16"),
    ("torch", "float16"),
    ("torch", "bfloat16"),
    ("jax", "float16"),
    ("jax", "bfloat16"),
]


@pytest.mark.parametrize("backend, dtype_name", [p for p in LOW_PRECISION if p[0] in BACKENDS])
def test_low_precision_keeps_dtype_and_tracks_float32(backend, dtype_name):
    """Half-precision loops stay in their dtype and follow the float32 loop within a few of their own ulps:
    each substep rounds its result once, and 2n - 1 = 19 substeps accumulate at most ~20 roundings."""
    shape = (2, 3, 4, 4)
    low = run_loop(backend, shape, dtype_name, steps=10)
    high = run_loop("numpy", shape, "float32", steps=10)
    eps = {"float16": 2.0**-10, "bfloat16": 2.0**-7}[dtype_name]
    assert relative_error(low[-1][0], high[-1][0]) <= 20 * eps
    assert all(np.all(np.isfinite(prev)) for prev, _ in low)


def test_output_dtype_equals_input_dtype_everywhere(backend_name):
    scheduler = KDPM2DiscreteScheduler(backend=backend_name)
    b = scheduler.backend
    names = (
        ["float32", "float16"] + (["float64"] if b.float64 else []) + (["bfloat16"] if backend_name != "numpy" else [])
    )
    for name in names:
        dtype = b.dtype(name)
        scheduler.set_timesteps(3)
        x = b.asarray(initial_noise((2, 2)), dtype=dtype)
        for t in scheduler.timesteps:
            assert scheduler.scale_model_input(x, t).dtype == dtype
            prev, pred = scheduler.step(x, t, x, return_dict=False)
            assert prev.dtype == pred.dtype == dtype, name
        assert scheduler.add_noise(x, x, scheduler.timesteps[:1]).dtype == dtype


# ---- inputs are never modified; outputs are never overwritten later ---------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_inputs_never_modified_and_outputs_never_reused(backend_name, shape):
    for kw in CONFIGS:
        run_loop(backend_name, shape, options=kw, check_aliasing=True)
    scheduler = KDPM2DiscreteScheduler(backend=backend_name)
    b = scheduler.backend
    scheduler.set_timesteps(4)
    x = b.asarray(initial_noise(shape))
    m = b.asarray(initial_noise(shape, seed=2))
    x_host, m_host = b.to_numpy(x).copy(), b.to_numpy(m).copy()
    stored = []
    for t in scheduler.timesteps:
        scheduler.scale_model_input(x, t)
        prev, pred = scheduler.step(m, t, x, return_dict=False)
        stored.append(prev)
        np.testing.assert_array_equal(b.to_numpy(x), x_host)
        np.testing.assert_array_equal(b.to_numpy(m), m_host)
    scheduler.add_noise(x, m, scheduler.timesteps[:1])
    np.testing.assert_array_equal(b.to_numpy(x), x_host)
    np.testing.assert_array_equal(b.to_numpy(m), m_host)
