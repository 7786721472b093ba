"""The linear combinations of a substep (kdpm2core.backend.recipe, applied by ArrayAPIBackend.combine) on every
installed backend: its 0/1 shortcuts keep Python-float rows (the stateful scheduler) and 0-d array rows (the functional
API) bit-identical, NumPy's chunked application of it gives the whole-array rule's bits, and no result is an
input. Bit-identity is asserted only between two paths of ours that run the same operations in the same order."""

from __future__ import annotations

import array_api_compat.numpy
import numpy as np
import pytest

import kdpm2core
from kdpm2core.backend import ArrayAPIBackend, substep_recipes, table_recipes, update

from conftest import initial_noise

# (a, b, c, p, q): Euler and midpoint rows of each prediction type, and every zero/one pattern the rule treats
# apart (dropped zero terms, a skipped leading multiply, a coefficient 1 after it, no terms at all)
ROWS = [
    (0.0, 1.0, -0.3, 1.0, -2.5),  # epsilon, Euler
    (1.0, 0.0, -0.3, 1.0, -0.7),  # epsilon, midpoint
    (0.0, 0.97, -0.31, 0.4, -0.6),  # v_prediction, Euler
    (1.0, 0.21, -0.33, 0.4, -0.6),  # v_prediction, midpoint: three terms after a leading 1
    (0.5, 0.21, -0.33, 0.4, -0.6),  # three terms, no leading 1
    (0.0, 0.3, 0.7, 0.0, 1.0),  # sample prediction, Euler: pred is model_output * 1
    (1.0, 0.3, 0.7, 0.0, 1.0),  # sample prediction, midpoint
    (0.0, 0.0, 1.0, 0.0, 1.0),  # sample prediction, the last substep: both outputs are model_output * 1
    (1.0, 0.21, 0.0, 0.0, 0.0),  # a zero last term; no pred terms at all (zeros)
    (0.0, 0.0, 0.0, 2.0, 0.0),  # no prev terms
    (1.0, 1.0, 1.0, 1.0, 1.0),  # leading 1 with ones after it
]


def test_rows_cover_what_schedulers_produce():
    """ROWS above include every zero/one pattern the shipped schedules produce."""
    seen = set()
    for prediction_type in ("epsilon", "v_prediction", "sample"):
        s = kdpm2core.KDPM2DiscreteScheduler(prediction_type=prediction_type)
        s.set_timesteps(10)
        for row in s.schedule.table.tolist():
            seen.add(tuple((v == 0.0, v == 1.0) for v in row[:5]))
    listed = {tuple((v == 0.0, v == 1.0) for v in row) for row in ROWS}
    assert seen <= listed, seen - listed


@pytest.mark.parametrize(
    "options",
    [
        {"prediction_type": "epsilon"},
        {"prediction_type": "v_prediction", "use_karras_sigmas": True},
        {"prediction_type": "sample", "timestep_spacing": "trailing"},
        {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 3.0},
    ],
)
@pytest.mark.parametrize("ancestral", [False, True])
def test_table_recipes_are_each_rows_recipes(options, ancestral):
    """The scheduler works out a recipe once per pattern of exact 0s and 1s (table_recipes); each row's must be
    the one the rule gives that row. The rows cover Euler, midpoint and last substeps, and DPM2 a's noise."""
    cls = kdpm2core.KDPM2AncestralDiscreteScheduler if ancestral else kdpm2core.KDPM2DiscreteScheduler
    scheduler = cls(**options)
    scheduler.set_timesteps(9)
    table = scheduler.schedule.table
    recipes = table_recipes(table)
    assert recipes == [substep_recipes(row) for row in table.tolist()]
    assert len({recipe for recipe in recipes}) > 1  # more than one pattern: Euler and midpoint rows differ


INSTALLED = [
    name for name in ("numpy", "torch", "jax", "array-api-strict", "dask") if name in kdpm2core.available_backends()
]


@pytest.mark.parametrize("name", INSTALLED)
def test_float_and_array_coefficients_give_the_same_bits(name):
    """Each row as Python floats, and as 0-d float32 arrays of the backend (nothing dropped, nothing skipped):
    the same bits for both outputs, inputs unchanged, and no output that is one of the inputs."""
    backend = kdpm2core.get_backend(name)
    host = [initial_noise((3, 5), seed) for seed in (1, 2, 3)]
    stored, sample, model_output = (backend.asarray(x) for x in host)
    for row in ROWS:
        floats = update(backend, *row, stored, sample, model_output)
        arrays = update(
            backend, *(backend.asarray(v, dtype=backend.dtype("float32")) for v in row), stored, sample, model_output
        )
        for name_, x, y in zip(("prev", "pred"), floats, arrays):
            assert np.array_equal(backend.to_numpy(x), backend.to_numpy(y)), (row, name_)
            assert all(x is not given for given in (stored, sample, model_output)), (row, name_)
    for x, values in zip((stored, sample, model_output), host):
        assert np.array_equal(backend.to_numpy(x), values), "update() modified an input"


@pytest.mark.parametrize("shape", [(), (3,)])
@pytest.mark.parametrize("name", INSTALLED)
def test_mixed_dtypes_promote_over_all_live_terms(name, shape):
    """DPM2 a's midpoint row with a float32 sample and stored sample but a float16 model output and noise: prev
    is float32 whatever the order the library folds the dtypes in (torch's 0-d promotion is not associative),
    and close to the float64 value. The float16 values are exact in float32. A product of a float16 term rounds
    in its library's dtype: in NumPy and JAX a float16 array times a Python float is float16, the coefficient
    and the product each rounding at 2**-11 (torch multiplies in float32). Each of the two sums rounds in
    float32 (2**-24 of the running sum), and a coefficient in float32 arithmetic rounds at 2**-24 of its term."""
    backend = kdpm2core.get_backend(name)
    if "float16" not in dir(backend.xp):
        pytest.skip(f"backend {name!r} has no float16")
    f32, f16 = backend.dtype("float32"), backend.dtype("float16")
    host = [np.asarray(initial_noise(shape, seed), dtype=np.float32) for seed in (1, 2, 3, 4)]
    host[2:] = [x.astype(np.float16) for x in host[2:]]
    stored, sample, model_output, noise = (backend.asarray(x, dtype=d) for x, d in zip(host, (f32, f32, f16, f16)))
    a, b, c, p, q, n = 1.0, 0.0, -0.3, 1.0, -0.7, 0.2
    prev, pred = update(backend, a, b, c, p, q, stored, sample, model_output, n=n, noise=noise)
    assert prev.dtype == f32 and pred.dtype == f32, (prev.dtype, pred.dtype)
    stored64, output64, noise64 = (host[k].astype(np.float64) for k in (0, 2, 3))
    exact = stored64 + c * output64 + n * noise64
    scale = np.abs(stored64) + abs(c) * np.abs(output64) + n * np.abs(noise64)
    products = abs(c) * np.abs(output64) + n * np.abs(noise64)
    bound = 3 * 2.0**-24 * scale + 2 * 2.0**-11 * products
    assert np.all(np.abs(backend.to_numpy(prev) - exact) <= bound * 1.001)


@pytest.mark.parametrize("n", [7, 32_768, 100_003])  # one chunk, exactly one, several with a tail
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_chunks_give_the_whole_array_rule(n, dtype):
    """The NumPy backend applies the core's rule slice by slice with ufuncs writing into the result; the
    generic rule on whole arrays (same operations, same order) gives the same bits, for every row and into
    an out= buffer too."""
    numpy_backend = kdpm2core.get_backend("numpy")
    generic = ArrayAPIBackend("generic-numpy", array_api_compat.numpy)
    stored, sample, model_output = (initial_noise((n,), seed).astype(dtype) for seed in (4, 5, 6))
    for row in ROWS:
        expected = update(generic, *row, stored, sample, model_output)
        fresh = update(numpy_backend, *row, stored, sample, model_output)
        buffers = (np.empty_like(sample), np.empty_like(sample))
        into = update(numpy_backend, *row, stored, sample, model_output, out=buffers)
        assert into[0] is buffers[0] and into[1] is buffers[1]
        for k in range(2):
            assert fresh[k].dtype == dtype and np.array_equal(fresh[k], expected[k]), (row, k)
            assert np.array_equal(into[k], expected[k]), (row, k)


@pytest.mark.parametrize("shape", [(), (1,), (3, 2)])
def test_generic_rule_on_numpy_arrays_of_any_rank(shape):
    """The generic rule accumulates in place into its own first result; NumPy's arithmetic on 0-d arrays
    returns immutable scalars, which cannot be accumulated into: a 0-d substep must still combine. Compared
    with NumPy evaluating the same terms in the same order."""
    generic = ArrayAPIBackend("generic-numpy", array_api_compat.numpy)
    stored, sample, model_output = (np.asarray(initial_noise(shape, seed), dtype=np.float32) for seed in (7, 8, 9))
    a, b, c, p, q = ROWS[4]  # three terms, no shortcut: two in-place accumulations
    prev, pred = update(generic, a, b, c, p, q, stored, sample, model_output)
    assert np.array_equal(prev, (stored * a + sample * b) + model_output * c)
    assert np.array_equal(pred, sample * p + model_output * q)
    assert prev.shape == shape and pred.shape == shape
