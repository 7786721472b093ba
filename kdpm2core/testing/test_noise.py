"""Portable noise (:mod:`kdpm2core.noise`) on the backend's namespace and device: the same bits as NumPy, the same
values within the bound below, rows independent of the batch, and the moments of a standard normal.

Bound (``CROSS``): the integers are exact on every library. The values are ``sqrt(-2 log u1) * cos(angle)`` of
the same float32 ``u1`` and ``angle``. NumPy's float32 log is within 4 ulp and cos within 2 ulp of exact (its
accuracy tests, ``umath-validation-set-{log,cos}.csv``); other libraries are assumed no worse (SLEEF's and CUDA's
are within 1 and 2 ulp); sqrt and products are correctly rounded. An ulp is at most 2 eps of the value
(eps = 2**-24), so two libraries differ in ``-2 log u1`` by at most 16 eps relative, in its square root by 8 eps
plus two roundings, in the cosine by 8 eps, plus two roundings of the product: 20 eps relative to the value.
A float16 or bfloat16 result rounds that once more: plus half an ulp of the dtype (and 2**-24 absolute for
float16's subnormals).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from kdpm2core import noise
from kdpm2core.testing.support import EPS, assert_close

CROSS = 20 * EPS["float32"]
# Random123's kat_vectors for threefry2x32 with 20 rounds: counter, key -> output
KNOWN_ANSWERS = [
    ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
    ((0x243F6A88, 0x85A308D3), (0x13198A2E, 0x03707344), (0xC4923A9C, 0x483DF7A0)),
]


def _numpy_normal(seed, shape, **kw) -> np.ndarray:
    import array_api_compat.numpy

    return np.asarray(noise.normal(array_api_compat.numpy, seed, shape, **kw), dtype=np.float64)


def halves(target, words):
    """32-bit words (ints) as the ``(high, low)`` int32 halves :func:`kdpm2core.noise.threefry2x32` takes."""
    words = np.asarray(words, dtype=np.int64)
    return target.asarray(words >> 16, "int32"), target.asarray(words & 0xFFFF, "int32")


def joined(target, word) -> np.ndarray:
    """A word of :func:`kdpm2core.noise.threefry2x32` as host int64 values."""
    high, low = (np.asarray(target.backend.to_numpy(half), dtype=np.int64) for half in word)
    return (high << 16) | low


def test_noise_threefry_bits(kdpm2_target):
    """Random123's known answers, then random keys and counters against NumPy, bit for bit."""
    rng = np.random.default_rng(3)
    counters = np.concatenate([np.array([c for c, _, _ in KNOWN_ANSWERS]).T, rng.integers(0, 2**32, (2, 64))], 1)
    keys = np.concatenate([np.array([k for _, k, _ in KNOWN_ANSWERS]).T, rng.integers(0, 2**32, (2, 64))], 1)
    got = noise.threefry2x32(
        tuple(halves(kdpm2_target, k) for k in keys), tuple(halves(kdpm2_target, c) for c in counters)
    )
    import array_api_compat.numpy as xnp

    def numpy_halves(words):
        return xnp.asarray(words >> 16, dtype=xnp.int32), xnp.asarray(words & 0xFFFF, dtype=xnp.int32)

    want = noise.threefry2x32(tuple(numpy_halves(k) for k in keys), tuple(numpy_halves(c) for c in counters))
    for i in range(2):
        bits = joined(kdpm2_target, got[i])
        expected = (np.asarray(want[i][0], dtype=np.int64) << 16) | want[i][1]
        assert bits[:3].tolist() == [answer[i] for _, _, answer in KNOWN_ANSWERS], (
            f"{kdpm2_target.label}: Threefry word {i} misses Random123's known answers: {[hex(b) for b in bits[:3]]}"
        )
        mismatched = np.flatnonzero(bits != expected)
        assert mismatched.size == 0, f"{kdpm2_target.label}: Threefry word {i} differs from NumPy at {mismatched}"


@pytest.mark.kdpm2_dtypes("float32", "float16", "bfloat16", "widest")
def test_noise_matches_numpy(kdpm2_case):
    """The noise of a few seeds, items and substeps, on the case's device, against NumPy's float32 values."""
    case = kdpm2_case
    device = case.backend.device_of(case.array(0.0))
    rtol = CROSS + (EPS[case.dtype_name] if case.dtype_name in ("float16", "bfloat16") else 0.0)
    atol = 2.0**-24 if case.dtype_name == "float16" else 0.0
    if case.dtype_name == "float64":
        rtol = 20 * EPS["float64"]  # the same analysis in float64, against NumPy's float64
    for seed, items, substep, shape in (
        (0, None, 0, (2, 3, 5)),
        (2**64 - 1, [2**32 - 1, 7], 2**32 - 2, (2, 9)),
        (123456789, [4], 3, (1, 4, 4)),
    ):
        got = noise.normal(case.xp, seed, shape, items=items, substep=substep, dtype=case.dtype, device=case.device)
        work = "float64" if case.dtype_name == "float64" else "float32"
        want = _numpy_normal(seed, shape, items=items, substep=substep, dtype=np.dtype(work))
        assert_close(
            got,
            want,
            case,
            what=f"noise seed={seed} items={items} substep={substep}",
            rtol=rtol,
            atol=atol,
            device=device,
        )


def test_noise_rows_do_not_depend_on_the_batch(kdpm2_target):
    target = kdpm2_target
    xp = target.xp
    batch = target.to_numpy(noise.normal(xp, 11, (4, 6), substep=1, device=target.device))
    for i in (0, 3):
        alone = noise.normal(xp, 11, (1, 6), items=[i], substep=1, device=target.device)
        assert_close(
            alone,
            batch[i : i + 1],
            target,
            what=f"item {i} alone vs in a batch of 4",
            dtype="float32",
            rtol=CROSS,
            atol=0.0,
        )
    items = target.asarray([3, 1], "int64" if target.backend.float64 else "int32")
    picked = noise.normal(xp, 11, (2, 6), items=items, substep=1, device=target.device)
    assert_close(picked, batch[[3, 1]], target, what="items=[3, 1] vs rows 3, 1", dtype="float32", rtol=CROSS, atol=0.0)


def test_noise_seed_and_substep_as_arrays(kdpm2_target):
    """0-d integer arrays (as a jit traces them) give what Python ints give."""
    target = kdpm2_target
    want = target.to_numpy(noise.normal(target.xp, 5, (2, 7), substep=3, device=target.device))
    got = noise.normal(
        target.xp, target.asarray(5, "int32"), (2, 7), substep=target.asarray(3, "int32"), device=target.device
    )
    assert_close(got, want, target, what="seed=5, substep=3 as int32 arrays", dtype="float32", rtol=CROSS, atol=0.0)


def test_noise_statistics(kdpm2_target):
    """Mean, variance and cross-item correlation of 8 x 2**13 normals, within 5 standard errors."""
    target = kdpm2_target
    n = 2**13
    z = target.to_numpy(noise.normal(target.xp, 2026, (8, n), device=target.device))
    se = 1 / math.sqrt(z.size)
    assert abs(z.mean()) < 5 * se, f"{target.label}: mean {z.mean():.4g} (bound {5 * se:.3g})"
    assert abs(z.var() - 1) < 5 * math.sqrt(2) * se, f"{target.label}: variance {z.var():.4g}"
    c = np.corrcoef(z) - np.eye(8)
    assert np.max(np.abs(c)) < 5 / math.sqrt(n), f"{target.label}: items correlate: {np.max(np.abs(c)):.3g}"
