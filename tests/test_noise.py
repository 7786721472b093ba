"""kdpm2core.noise: Threefry against an independent implementation and JAX's, the mapping against an independent
float64 reference, the same noise on every backend, statistics, jax.jit / torch.compile, and argument errors.
The conformance suite (kdpm2core/testing/test_noise.py) adds, per backend, device and dtype: Random123's known
answers, NumPy's bits and values, and batch invariance.

Tolerances: ``CROSS`` (20 eps relative between two libraries, eps = 2**-24) is derived in the conformance module.
Against the float64 truth, ``angle`` itself carries float32(2 pi) (0.47 eps relative) and one rounding: at most
1.47 eps * 2 pi = 9.3 eps absolute, times the radius ``r``; the kernels add at most 4 eps (log, halved by the
square root) + 4 eps (cos) + 2 roundings relative: 20 eps * r bounds it (``TRUTH``).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

import kdpm2core
from kdpm2core import noise
from kdpm2core.testing.support import Target
from kdpm2core.testing.test_noise import CROSS, KNOWN_ANSWERS, halves, joined

EPS32 = 2.0**-24
TRUTH = 20  # times eps * r: the bound against the float64 reference (module docstring)
ALL = kdpm2core.available_backends()
M32 = 0xFFFFFFFF


def _backend(name):
    return kdpm2core.get_backend(name)


# -- an independent reference: the mapping with plain 32-bit Python ints, then float64 -------------------------


def _threefry_reference(key, counter):
    """Threefry-2x32-20 on Python ints, written from Salmon et al. (2011) / Random123's threefry.h."""
    rotations = (13, 15, 26, 6, 17, 29, 16, 24)
    ks = [key[0], key[1], key[0] ^ key[1] ^ 0x1BD11BDA]
    x = [(counter[0] + ks[0]) & M32, (counter[1] + ks[1]) & M32]
    for r in range(20):
        x[0] = (x[0] + x[1]) & M32
        x[1] = ((x[1] << rotations[r % 8]) | (x[1] >> (32 - rotations[r % 8]))) & M32
        x[1] ^= x[0]
        if r % 4 == 3:
            s = r // 4 + 1
            x[0] = (x[0] + ks[s % 3]) & M32
            x[1] = (x[1] + ks[(s + 1) % 3] + s) & M32
    return tuple(x)


def _reference(seed, item, substep, element):
    """``(z, r)``: the float64 normal of the mapping and its Box-Muller radius."""
    row_key = _threefry_reference((seed & M32, seed >> 32), (item, substep))
    w0, w1 = _threefry_reference(row_key, (element, 0))
    r = math.sqrt(-2.0 * math.log(((w0 >> 8) + 1) * 2.0**-24))
    return r * math.cos(2 * math.pi * (w1 >> 8) * 2.0**-24), r


def test_reference_threefry_known_answers():
    for counter, key, want in KNOWN_ANSWERS:
        assert _threefry_reference(key, counter) == want


def test_threefry_equals_jax_primitive():
    """JAX's own Threefry-2x32 (jax.extend.random.threefry_2x32) on random keys and counters, bit for bit."""
    pytest.importorskip("jax")
    import jax.numpy as jnp
    from jax.extend.random import threefry_2x32

    rng = np.random.default_rng(7)
    key = rng.integers(0, 2**32, size=2, dtype=np.uint32)
    counts = rng.integers(0, 2**32, size=(2, 500), dtype=np.uint32)
    # jax takes the counter words as one array, first words then second words, and returns the outputs so
    want = np.asarray(threefry_2x32(jnp.asarray(key), jnp.asarray(counts.reshape(-1)))).reshape(2, 500)
    numpy = Target("numpy", "cpu", _backend("numpy"))
    out = noise.threefry2x32(tuple(halves(numpy, [k]) for k in key), tuple(halves(numpy, c) for c in counts))
    assert np.array_equal(joined(numpy, out[0]), want[0]) and np.array_equal(joined(numpy, out[1]), want[1])


@pytest.mark.parametrize("name", ALL)
def test_mapping_equals_the_reference(name):
    """Large seeds, items and substeps (all 32-bit words in use) against the pure-Python float64 reference."""
    backend = _backend(name)
    wide = [backend.dtype("float32")] + ([backend.dtype("float64")] if backend.float64 else [])
    cases = [(0, [0, 1], 0), (2**64 - 1, [2**32 - 1, 5], 2**32 - 2), (0x0123456789ABCDEF, [2**31 + 3, 77], 123456)]
    for (seed, items, substep), dtype in itertools.product(cases, wide):
        z = backend.to_numpy(noise.normal(backend.xp, seed, (2, 3, 5), items=items, substep=substep, dtype=dtype))
        z = np.asarray(z, dtype=np.float64).reshape(2, 15)
        eps = EPS32 if dtype == backend.dtype("float32") else 2.0**-53  # float64: the same analysis
        for i, item in enumerate(items):
            want = np.array([_reference(seed, item, substep, e) for e in range(15)])
            err = np.abs(z[i] - want[:, 0])
            assert np.all(err <= TRUTH * eps * want[:, 1]), (name, dtype, seed, item, substep, err.max())


@pytest.mark.parametrize("name", ALL)
def test_same_noise_on_every_backend(name):
    """Each backend against NumPy's float32 result: at most CROSS relative (module docstring)."""
    backend = _backend(name)
    shape = (3, 5, 7, 9)  # 315 elements per item
    got = np.asarray(backend.to_numpy(noise.normal(backend.xp, 2024, shape, substep=11)), dtype=np.float64)
    numpy = _backend("numpy")
    want = np.asarray(numpy.to_numpy(noise.normal(numpy.xp, 2024, shape, substep=11)), dtype=np.float64)
    assert got.shape == shape
    err = np.abs(got - want)
    assert np.all(err <= CROSS * np.abs(want)), f"{name}: max difference {err.max():.3g}"


def test_shape_only_sets_the_element_count():
    """Element e of an item is the same whatever the shape around it (C order)."""
    xp = _backend("numpy").xp
    a = np.asarray(noise.normal(xp, 1, (2, 4, 6)))
    assert np.array_equal(a.reshape(2, 24), np.asarray(noise.normal(xp, 1, (2, 24))))
    assert np.array_equal(a.reshape(2, 24)[:, :10], np.asarray(noise.normal(xp, 1, (2, 10))))
    for empty in ((0, 3), (2, 0)):
        assert noise.normal(xp, 1, empty).shape == empty


def test_array_arguments_equal_python_ints():
    """A 0-d array seed or substep (any integer dtype) gives what the Python int gives: the same operations."""
    xp = _backend("numpy").xp
    want = np.asarray(noise.normal(xp, 5, (2, 8), substep=3))
    for dtype in (np.int32, np.int64, np.uint64):
        got = noise.normal(xp, np.asarray(5, dtype=dtype), (2, 8), substep=np.asarray(3, dtype=dtype))
        assert np.array_equal(np.asarray(got), want), dtype
    # negative array values wrap as two's complement, as their bits say
    big = np.asarray(noise.normal(xp, 2**64 - 1, (1, 8)))
    assert np.array_equal(np.asarray(noise.normal(xp, np.asarray(-1, dtype=np.int32), (1, 8))), big)
    assert np.array_equal(np.asarray(noise.normal(xp, np.asarray(-1, dtype=np.int64), (1, 8))), big)


def test_initial_latent():
    xp = _backend("numpy").xp
    latent = np.asarray(noise.initial_latent(xp, 4, (2, 8), sigma=14.6))
    base = np.asarray(noise.initial_latent(xp, 4, (2, 8)))
    assert np.array_equal(latent, base * np.float32(14.6))  # one float32 multiplication, as in the function
    want = np.array([[_reference(4, i, noise.INITIAL_SUBSTEP, e) for e in range(8)] for i in range(2)])
    assert np.all(np.abs(base - want[..., 0]) <= TRUTH * EPS32 * want[..., 1])


# -- statistics ---------------------------------------------------------------------------------------------------
# One backend suffices: every backend has the same integers (tests above). Bounds are multiples of the standard
# error for n independent standard normals, wide enough that a correct generator fails with negligible
# probability (5 sigma: 6e-7), and the seeds are fixed, so each test is deterministic.

N = 2**20


def _numpy_normal(seed, shape, **kw):
    return np.asarray(noise.normal(_backend("numpy").xp, seed, shape, **kw), dtype=np.float64)


def test_moments_and_normality():
    from scipy import stats

    z = _numpy_normal(12345, (4, N // 4)).reshape(-1)
    se = 1 / math.sqrt(N)
    assert abs(z.mean()) < 5 * se, z.mean()
    assert abs(z.var() - 1) < 5 * math.sqrt(2) * se, z.var()  # var of the sample variance: 2 / n
    assert abs(stats.skew(z)) < 5 * math.sqrt(6) * se, stats.skew(z)
    assert abs(stats.kurtosis(z)) < 5 * math.sqrt(24) * se, stats.kurtosis(z)
    # Kolmogorov-Smirnov against N(0, 1): with 2**20 samples it sees CDF errors above ~2e-3; a correct generator
    # gives p >= 1e-3 with probability 0.999, and for this fixed seed the p-value is what it is, every run
    p = stats.kstest(z, "norm").pvalue
    assert p > 1e-3, p


def _max_correlation(rows: np.ndarray) -> float:
    c = np.corrcoef(rows)
    return float(np.max(np.abs(c - np.eye(len(rows)))))


def test_independence_between_items_substeps_seeds_and_the_initial_latent():
    n = 2**16
    bound = 5 / math.sqrt(n)  # sample correlation of independent normals: standard error 1 / sqrt(n)
    items = _numpy_normal(1, (16, n))
    assert _max_correlation(items) < bound
    substeps = np.stack([_numpy_normal(1, (1, n), substep=k)[0] for k in range(16)])
    assert _max_correlation(substeps) < bound
    seeds = np.stack([_numpy_normal(s, (1, n))[0] for s in range(16)])
    assert _max_correlation(seeds) < bound
    initial = np.asarray(noise.initial_latent(_backend("numpy").xp, 1, (1, n)), dtype=np.float64)
    assert _max_correlation(np.stack([initial[0], substeps[0], substeps[1]])) < bound
    # neighbouring elements, and dependence beyond linear (squares) between neighbours
    z = items[0]
    assert abs(np.corrcoef(z[:-1], z[1:])[0, 1]) < bound
    assert abs(np.corrcoef(z[:-1] ** 2, z[1:] ** 2)[0, 1]) < bound


# -- compilers ----------------------------------------------------------------------------------------------------


def test_jax_jit_and_vmap_with_traced_seed_and_substep():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    shape = (2, 3, 8)
    compiled = jax.jit(lambda seed, k: noise.normal(jnp, seed, shape, substep=k))
    got = np.asarray(compiled(jnp.asarray(5), jnp.asarray(3)))
    want = np.asarray(noise.normal(jnp, 5, shape, substep=3))
    assert np.all(np.abs(got - want) <= CROSS * np.abs(want))  # XLA may fuse the kernels differently
    mapped = np.asarray(jax.vmap(lambda seed: noise.normal(jnp, seed, (1, 8)))(jnp.arange(3)))
    for s in range(3):
        alone = np.asarray(noise.normal(jnp, s, (1, 8)))
        assert np.all(np.abs(mapped[s] - alone) <= CROSS * np.abs(alone)), s


def test_torch_compile_fullgraph_one_graph():
    """fullgraph=True fails on any graph break, and a host sync (``.item()``) is one; one graph for any seed.

    Dynamo decides the graphs before a compiler backend runs, so they are counted with a recording backend
    that runs each graph as traced (Inductor spends minutes of C++ compilation on this graph on 2 CPU cores;
    test_cuda_and_inductor runs it where CUDA is available)."""
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as xp

    graphs = []

    def record(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    shape = (2, 3, 8)
    compiled = torch.compile(lambda seed, k: noise.normal(xp, seed, shape, substep=k), fullgraph=True, backend=record)
    for seed, k in ((5, 3), (6, 4)):
        got = compiled(torch.tensor(seed), torch.tensor(k)).numpy()
        want = noise.normal(xp, seed, shape, substep=k).numpy()
        assert np.array_equal(got, want)  # the traced graph runs the eager operations in the same order
    assert len(graphs) == 1, f"{len(graphs)} graphs"


def test_cuda_and_inductor():
    """On a CUDA device: the same noise as NumPy (CUDA's float32 logf is within 1 ulp and cosf within 2 ulp, inside
    CROSS's assumptions), and Inductor's fused kernel within CROSS of eager."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    import array_api_compat.torch as xp

    shape = (3, 4, 32, 32)
    want = _numpy_normal(77, shape, substep=5)
    got = noise.normal(xp, 77, shape, substep=5, device=torch.device("cuda"))
    assert got.device.type == "cuda"
    assert np.all(np.abs(got.cpu().double().numpy() - want) <= CROSS * np.abs(want))
    compiled = torch.compile(
        lambda seed, k: noise.normal(xp, seed, shape, substep=k, device=torch.device("cuda")), fullgraph=True
    )
    fused = compiled(torch.tensor(77, device="cuda"), torch.tensor(5, device="cuda")).cpu().double().numpy()
    assert np.all(np.abs(fused - want) <= CROSS * np.abs(want))


# -- bad input ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"seed": -1}, ValueError, "seed"),
        ({"seed": 2**64}, ValueError, "seed"),
        ({"seed": 1.5}, TypeError, "seed"),
        ({"seed": np.arange(2)}, TypeError, "seed"),
        ({"seed": np.asarray(1.0)}, TypeError, "seed"),
        ({"shape": ()}, ValueError, "shape"),
        ({"shape": (2, -1)}, ValueError, "shape"),
        ({"shape": 4}, ValueError, "shape"),
        ({"items": [0]}, ValueError, "items"),
        ({"items": [0, -1]}, ValueError, "items"),
        ({"items": np.zeros((2, 1), dtype=np.int64)}, ValueError, "items"),
        ({"items": np.zeros(2)}, TypeError, "items"),
        ({"substep": 2**32}, ValueError, "substep"),
        ({"substep": noise.INITIAL_SUBSTEP}, ValueError, "initial_latent"),
        ({"dtype": np.int32}, TypeError, "dtype"),
    ],
)
def test_bad_arguments_name_the_parameter(kwargs, error, match):
    args = {"seed": 0, "shape": (2, 3), **kwargs}
    xp = _backend("numpy").xp
    with pytest.raises(error, match=match):
        noise.normal(xp, args.pop("seed"), args.pop("shape"), **args)
