"""The backend object itself: the Protocol the scheduler relies on, checked through its own methods.

This is the suite's protocol section: it runs first, and once a backend fails here its other tests are skipped
(see :mod:`kdpm2core.testing.plugin`). A failure here says which method to override and why; the methods and
when to override them are listed in docs/plugins.md.
"""

import numpy as np
import pytest

from kdpm2core.backend import Backend, update
from kdpm2core.testing.support import assert_close


def test_protocol_attributes(kdpm2_target):
    backend = kdpm2_target.backend
    assert isinstance(backend, Backend), f"{kdpm2_target.label}: {backend!r} lacks part of kdpm2core.backend.Backend"
    assert backend.name == kdpm2_target.backend_name, f"{kdpm2_target.label}: .name is {backend.name!r}"
    for flag in ("float64", "inplace", "jit"):
        assert isinstance(getattr(backend, flag), bool), f"{kdpm2_target.label}: .{flag} must be a bool"
    assert kdpm2_target.device_name in backend.devices()


def test_owns_only_its_arrays(kdpm2_target):
    x = kdpm2_target.asarray([1.0, 2.0], "float32")
    assert kdpm2_target.backend.owns(x), (
        f"{kdpm2_target.label}: owns() is False for its own asarray(): {_why_not_owned(kdpm2_target, x)}"
    )
    assert not kdpm2_target.backend.owns([1.0, 2.0]), f"{kdpm2_target.label}: owns() accepts a list"
    if not isinstance(x, np.ndarray):  # a backend whose arrays are NumPy's (under any name) owns them
        assert not kdpm2_target.backend.owns(np.zeros(2)), (
            f"{kdpm2_target.label}: owns() accepts a NumPy array, but its own arrays are {type(x).__qualname__}"
        )


def _why_not_owned(target, x) -> str:
    """What to fix when ``owns(x)`` is False for the backend's own array ``x``."""
    import array_api_compat

    kind = f"{type(x).__module__}.{type(x).__qualname__}"
    try:
        namespace = array_api_compat.array_namespace(x)
    except TypeError:
        return (
            f"array_api_compat.array_namespace() knows no namespace for {kind}, so the default owns() cannot "
            "see it; override owns(x) with a type check (look the type up through sys.modules, so that "
            "nothing is imported)"
        )
    if namespace is not target.backend.xp:
        return (
            f"xp is {getattr(target.backend.xp, '__name__', target.backend.xp)!r} but "
            f"array_api_compat.array_namespace() of a {kind} is {getattr(namespace, '__name__', namespace)!r}; "
            "set xp to that namespace: the default owns() compares the two, and every step would refuse the "
            "sample as 'not an array of backend ...'"
        )
    return "override owns(x) so that it accepts the arrays asarray() returns"


def test_device_of_places_arrays_beside_their_input(kdpm2_target):
    """The scheduler puts new arrays (``add_noise``'s sigmas, a plan's tables) on ``device_of(x)`` of its input."""
    backend = kdpm2_target.backend
    x = kdpm2_target.asarray([1.0, 2.0], "float32")
    kind = f"{type(x).__module__}.{type(x).__qualname__}"
    try:
        device = backend.device_of(x)
    except Exception as exc:  # noqa: BLE001 -- whatever a broken backend raises, the message names the fix
        pytest.fail(
            f"{kdpm2_target.label}: device_of(x) raised {exc!r} for a {kind}. The default reads x.device (through "
            "array_api_compat.device); if your arrays have no .device attribute, override device_of(x) to return "
            "what asarray(device=) accepts (None for a library with a single device)",
            pytrace=False,
        )
    try:
        y = backend.asarray(np.zeros(2), dtype=backend.dtype("float32"), device=device)
    except Exception as exc:  # noqa: BLE001 -- as above
        pytest.fail(
            f"{kdpm2_target.label}: asarray(device=device_of(x)) raised {exc!r} for device_of(x) = {device!r}: "
            "device_of must return a device that asarray(device=) accepts",
            pytrace=False,
        )
    assert backend.device_of(y) == device, (
        f"{kdpm2_target.label}: asarray(device={device!r}) made an array on {backend.device_of(y)!r}; override "
        "asarray(obj, dtype=, device=) to place it there"
    )


def test_bad_device_and_dtype_are_clear_errors(kdpm2_target):
    with pytest.raises(ValueError, match="no-such-device"):
        kdpm2_target.backend.device("no-such-device:99")
    with pytest.raises(TypeError, match="float99"):
        kdpm2_target.backend.dtype("float99")


def test_asarray_round_trip(kdpm2_case):
    values = np.array([[-1.5, 0.0, 0.25], [3.0, 0.125, 7.5]])  # exact in every float dtype
    backend = kdpm2_case.backend
    x = kdpm2_case.array(values)
    assert x.dtype == kdpm2_case.dtype, (
        f"{kdpm2_case.label}: asarray(values, dtype={kdpm2_case.dtype_name}) gave {x.dtype}; override "
        "asarray(obj, dtype=, device=) so that it casts to dtype (plans and schedules are made in the working "
        "dtype through it)"
    )
    host = backend.to_numpy(x)
    assert isinstance(host, np.ndarray) and host.dtype != object and host.shape == values.shape, (
        f"{kdpm2_case.label}: to_numpy(x) gave a {type(host).__qualname__} of dtype {getattr(host, 'dtype', '?')} "
        f"and shape {getattr(host, 'shape', '?')} for a {values.shape} array. The default, numpy.asarray(x), "
        f"wraps an array it does not understand in a 0-d object array; override to_numpy(x) to return a host "
        "copy (np.from_dlpack(x), x.compute(), x.cpu().numpy(), ...)"
    )
    device = backend.device_of(kdpm2_case.array(0.0))
    assert_close(x, values, kdpm2_case, what="asarray/to_numpy", rtol=0, atol=0, device=device)


def test_normal(kdpm2_case):
    backend = kdpm2_case.backend
    device = backend.device_of(kdpm2_case.array(0.0))
    draw = lambda seed: backend.normal(backend.rng(seed), (40, 50), dtype=kdpm2_case.dtype, device=kdpm2_case.device)[0]
    first, again, other = draw(7), draw(7), draw(8)
    values = kdpm2_case.to_numpy(first)
    assert_close(first, values, kdpm2_case, what="normal", device=device)  # namespace, dtype, shape, device
    assert np.array_equal(values, kdpm2_case.to_numpy(again)), f"{kdpm2_case.label}: same seed, different normals"
    assert not np.array_equal(values, kdpm2_case.to_numpy(other)), f"{kdpm2_case.label}: seeds 7 and 8 agree"
    # 2000 draws: the mean is within 5 standard errors of 0 and the std within 0.1 of 1
    assert abs(values.mean()) < 5 / np.sqrt(values.size) and abs(values.std() - 1) < 0.1, (
        f"{kdpm2_case.label}: normal() gave mean {values.mean():.3g}, std {values.std():.3g}"
    )


@pytest.mark.parametrize("row", [(0.0, 1.0, -0.3, 1.0, -2.0), (1.0, 0.25, 0.5, 0.2, 0.7)], ids=["euler", "midpoint"])
def test_update_is_the_two_combinations(kdpm2_case, row):
    a, b, c, p, q = row
    rng = np.random.default_rng(3)
    stored, sample, model_output = (rng.uniform(-2, 2, (3, 4)) for _ in range(3))
    arrays = [kdpm2_case.array(v) for v in (stored, sample, model_output)]
    # exact inputs in the dtype under test, so the expected values carry only the combination's rounding
    stored, sample, model_output = (kdpm2_case.to_numpy(v) for v in arrays)
    prev, pred = update(kdpm2_case.backend, a, b, c, p, q, arrays[0] if a else None, arrays[1], arrays[2])
    what = f"update a={a} b={b} c={c} p={p} q={q}"
    assert_close(prev, a * stored + b * sample + c * model_output, kdpm2_case, what=what + " prev")
    assert_close(pred, p * sample + q * model_output, kdpm2_case, what=what + " pred")
    for name, array, values in zip(("stored", "sample", "model_output"), arrays, (stored, sample, model_output)):
        assert np.array_equal(kdpm2_case.to_numpy(array), values), f"{kdpm2_case.label}: update() modified {name}"


def test_factors_multiply_as_python_floats(kdpm2_target):
    """``factors()`` (the stateful scheduler's model-input scales, made once per schedule) is None, or one 0-d
    array per value whose product with a float32 array on the device has the bits and dtype of the product with
    the Python float: the scheduler multiplies float32 samples by whichever it has."""
    backend = kdpm2_target.backend
    values = 1 / np.sqrt(np.geomspace(0.03, 150.0, 9) ** 2 + 1)  # model-input scales, none exact in float32
    x = kdpm2_target.asarray(np.random.default_rng(5).uniform(-3, 3, (3, 4)), "float32")
    factors = backend.factors(values, backend.device_of(x))
    if factors is None:
        pytest.skip(f"{kdpm2_target.label}: factors() is None: the scheduler multiplies by Python floats")
    assert len(factors) == len(values), f"{kdpm2_target.label}: factors() gave {len(factors)} for {len(values)} values"
    for value, factor in zip(values, factors):
        got, want = x * factor, x * float(value)
        assert got.dtype == want.dtype and np.array_equal(kdpm2_target.to_numpy(got), kdpm2_target.to_numpy(want)), (
            f"{kdpm2_target.label}: x * factor differs from x * {float(value)!r}; factors() must give float32 0-d "
            "arrays of the values, or None"
        )


def test_loop(kdpm2_target):
    carry = kdpm2_target.asarray([0.0, 1.0], "float32")
    result = kdpm2_target.backend.loop(5, lambda i, c: c * 2.0 + 1.0, carry)
    assert_close(result, [31.0, 63.0], kdpm2_target, what="loop(5, c -> 2c + 1)", dtype="float32", rtol=0, atol=0)
