"""The torch backend's one-pass C kernel (backends/kdpm2_torch/_fused.c) and its CPU fast paths.

The kernel must give exactly the bits of torch's own kernels (``_combine``), for every coefficient pattern a
row can have, both dtypes, any length (vector tails), any thread count, and non-finite values and signed zeros;
it must only run where it applies (the torch kernels take the rest, to the same bits); and where a C compiler
was present at install time it must have been built, so a broken build cannot go unnoticed as a slowdown.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

import kdpm2core

torch = pytest.importorskip("torch")
from conftest import diffusers_kdpm2, initial_noise, relative_error
from kdpm2_torch import backend as torch_backend

kernel = torch_backend._kernel
needs_kernel = pytest.mark.skipif(kernel is None, reason="the C kernel is not built here (no C compiler at install)")

# (a, b, c, p, q): Euler and midpoint rows of each prediction type, and every zero/one pattern the C side
# must treat as backend._combine does (dropped zero terms, a skipped leading multiply, no terms at all)
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


def _inputs(n, dtype, seed=0):
    stored, sample, model_output = (torch.from_numpy(initial_noise((n,), seed + i)).to(dtype) for i in range(3))
    if n >= 8:  # the values where fused and unfused arithmetic, or a dropped term, would show
        sample[:4] = torch.tensor([float("inf"), float("nan"), -0.0, 0.0])
        model_output[4:8] = torch.tensor([-0.0, float("-inf"), 1e-40, -0.0])
        stored[1:3] = torch.tensor([-0.0, float("nan")])
    return stored, sample, model_output


def _torch_kernels(row, stored, sample, model_output):
    a, b, c, p, q = row
    prev = torch_backend._combine(None, ((a, stored), (b, sample), (c, model_output)))
    pred = torch_backend._combine(None, ((p, sample), (q, model_output)))
    return prev, pred


def _same_bits(x, y):
    return x.dtype == y.dtype and x.shape == y.shape and bytes(x.numpy().tobytes()) == bytes(y.numpy().tobytes())


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 7, 1023, 1024, 1025, 40_961])  # around the 1024-element block and vector tails
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_kernel_gives_the_bits_of_torchs_kernels(dtype, n, threads):
    stored, sample, model_output = _inputs(n, dtype)
    for row in ROWS:
        prev, pred = torch.empty_like(sample), torch.empty_like(sample)
        a, b, c, p, q = row
        kernel.update(
            dtype is torch.float64, n, threads, prev.data_ptr(), pred.data_ptr(), stored.data_ptr() if a else None,
            sample.data_ptr(), model_output.data_ptr(), a, b, c, p, q,
        )
        expected = _torch_kernels(row, stored, sample, model_output)
        assert _same_bits(prev, expected[0]), (row, "prev")
        assert _same_bits(pred, expected[1]), (row, "pred")


@needs_kernel
@pytest.mark.parametrize("offset", [1, 3])
def test_kernel_reads_and_writes_at_any_alignment(offset):
    """Views that start a few elements into their storage: the kernel may not assume aligned pointers."""
    n = 5000
    stored, sample, model_output = (x[offset:] for x in _inputs(n + offset, torch.float32, seed=7))
    buffers = torch.empty(2, n + offset)
    prev, pred = buffers[0, offset:], buffers[1, :n]
    for row in ROWS:
        a, b, c, p, q = row
        kernel.update(
            False, n, 2, prev.data_ptr(), pred.data_ptr(), stored.data_ptr() if a else None,
            sample.data_ptr(), model_output.data_ptr(), a, b, c, p, q,
        )
        expected = _torch_kernels(row, stored, sample, model_output)
        assert _same_bits(prev, expected[0]) and _same_bits(pred, expected[1]), row


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_arrays_take_the_kernel_and_give_the_same_bits(dtype, monkeypatch):
    backend = kdpm2core.get_backend("torch")
    n = (2 * torch_backend.LARGE_BYTES) // torch.empty((), dtype=dtype).element_size() + 5
    stored, sample, model_output = _inputs(n, dtype, seed=3)
    calls = []
    real = torch_backend._kernel

    class Counting:
        def update(self, *args):
            calls.append(args[2])  # the thread count
            return real.update(*args)

    monkeypatch.setattr(torch_backend, "_kernel", Counting())
    torch.set_num_threads(2)  # the autouse fixture restores one thread for the next test
    for row in ROWS:
        prev, pred = backend.update(*row, stored, sample, model_output)
        expected = _torch_kernels(row, stored, sample, model_output)
        assert _same_bits(prev, expected[0]) and _same_bits(pred, expected[1]), row
    assert len(calls) == len(ROWS)
    assert set(calls) == {min(2, max(1, n // torch_backend.PARALLEL_MIN))}


@needs_kernel
def test_the_kernel_is_skipped_where_it_does_not_apply(monkeypatch):
    backend = kdpm2core.get_backend("torch")
    monkeypatch.setattr(torch_backend, "_kernel", None)  # any call would now fail with AttributeError
    shape = (8, 4, 96, 96)  # 1.1 MiB of float32: large
    x, m = (torch.from_numpy(initial_noise(shape, seed)) for seed in (1, 2))
    cases = {
        "non-contiguous": (x.transpose(2, 3), m.transpose(2, 3)),
        "bfloat16": (x.bfloat16(), m.bfloat16()),
        "mixed dtypes": (x, m.double()),
    }
    for label, (sample, model_output) in cases.items():
        prev, pred = backend.update(0.0, 1.0, -0.3, 1.0, -2.5, None, sample, model_output)
        assert torch.equal(prev, torch.add(sample, model_output, alpha=-0.3)), label
        assert torch.equal(pred, torch.add(sample, model_output, alpha=-2.5)), label
    # 0-d tensor coefficients (the functional API, torch.compile) never take the kernel either
    coefficients = [torch.tensor(v) for v in ROWS[1]]
    prev, pred = backend.update(*coefficients, x, x, m)
    assert torch.equal(prev, torch.add(x, m, alpha=-0.3)) and torch.equal(pred, torch.add(x, m, alpha=-0.7))


@needs_kernel
def test_differentiated_inputs_stay_on_torch_and_keep_their_graph():
    backend = kdpm2core.get_backend("torch")
    x = torch.from_numpy(initial_noise((8, 4, 96, 96))).requires_grad_()
    prev, pred = backend.update(0.0, 1.0, -0.3, 1.0, -2.5, None, x, torch.tanh(x))
    assert prev.grad_fn is not None and pred.grad_fn is not None
    with torch.no_grad():  # without grad mode the kernel may run: same values
        fast = backend.update(0.0, 1.0, -0.3, 1.0, -2.5, None, x, torch.tanh(x))
    assert torch.equal(fast[0], prev.detach()) and torch.equal(fast[1], pred.detach())


@needs_kernel
def test_kernel_rejects_bad_arguments_with_a_clear_error():
    x = torch.zeros(4)
    good = [False, 4, 1, x.data_ptr(), x.data_ptr(), None, x.data_ptr(), x.data_ptr(), 0.0, 1.0, 0.5, 1.0, 0.5]
    with pytest.raises(TypeError, match="13 arguments"):
        kernel.update(*good[:-1])
    with pytest.raises(ValueError, match="null pointer"):
        kernel.update(*good[:5], None, *good[6:8], 1.0, *good[9:])  # a != 0 without stored
    with pytest.raises(TypeError):
        kernel.update(*good[:8], "0.5", *good[9:])


def _have_compiler():
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    return shutil.which(compiler) is not None


@pytest.mark.skipif(not _have_compiler(), reason="no C compiler here: the kernel is optional")
def test_kernel_was_built_where_a_compiler_exists():
    """A silent build failure would only show as a slower step: where a compiler exists, insist on it."""
    assert kernel is not None or os.environ.get("KDPM2_NO_KERNEL"), "kdpm2_torch._fused was not built"


def test_no_kernel_switch_leaves_every_substep_to_torch():
    code = "from kdpm2_torch import backend; print(backend._kernel is None)"
    env = dict(os.environ, KDPM2_NO_KERNEL="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1000, 300_000])  # allocated, and from the buffer pool
def test_scale_gives_the_bits_of_a_python_float_multiply(dtype, n):
    backend = kdpm2core.get_backend("torch")
    x = torch.from_numpy(initial_noise((n,), 5)).to(dtype)
    for factor in (0.0677, 1 / 3, 0.999999, 1e-3, 1.0):
        scaled = backend.scale(x, factor)
        expected = x * factor
        assert scaled.dtype == expected.dtype and torch.equal(scaled, expected), factor
        assert scaled.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()


def test_scale_keeps_autograd():
    backend = kdpm2core.get_backend("torch")
    x = torch.from_numpy(initial_noise((300_000,))).requires_grad_()
    backend.scale(x, 0.25).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 0.25))


def test_kernel_results_do_not_depend_on_the_thread_count_in_a_loop():
    """A whole large loop with 1 and 2 torch threads: the same bits (the kernel's split is by blocks)."""
    runs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        scheduler = kdpm2core.KDPM2DiscreteScheduler(backend="torch", use_karras_sigmas=True)
        scheduler.set_timesteps(3)
        x = torch.from_numpy(initial_noise((8, 4, 128, 128), 9)) * scheduler.init_noise_sigma  # 2 MiB: 2 kernel threads
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(x, t)
            x = scheduler.step(torch.tanh(model_input), t, x).prev_sample
        runs.append(x)
    assert torch.equal(runs[0], runs[1])


def test_rows_cover_what_schedulers_produce():
    """ROWS above include every zero/one pattern the shipped schedules produce."""
    seen = set()
    for prediction_type in ("epsilon", "v_prediction", "sample"):
        s = kdpm2core.KDPM2DiscreteScheduler(prediction_type=prediction_type)
        s.set_timesteps(10)
        for row in s._rows:
            seen.add(tuple((v == 0.0, v == 1.0) for v in row[:5]))
    listed = {tuple((v == 0.0, v == 1.0) for v in row) for row in ROWS}
    assert seen <= listed, seen - listed


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_large_latent_loop_matches_diffusers(prediction_type):
    """End to end through the kernel and the pool: a 25-step loop on a 1 MiB latent against diffusers'
    scheduler on the same inputs (the same tolerance as tests/test_trajectory_parity.py)."""
    pytest.importorskip("diffusers")
    options = {"beta_schedule": "scaled_linear", "use_karras_sigmas": True, "prediction_type": prediction_type}
    ours, theirs = kdpm2core.KDPM2DiscreteScheduler(**options, backend="torch"), diffusers_kdpm2(**options)
    noise = torch.from_numpy(initial_noise((4, 4, 128, 128), 11))
    results = []
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(25)
        x = noise * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(x, t)
            x = scheduler.step(torch.tanh(0.7 * model_input) - 0.1 * model_input, t, x, return_dict=False)[0]
        results.append(x.numpy())
    assert relative_error(*results) <= 1e-4


def test_sparse_tensors_take_torchs_kernels():
    """Sparse COO latents have no ``nbytes`` and no data pointer: the fast paths' size checks must not touch
    them, and the loop must give the dense loop's numbers."""
    sparse, dense = (kdpm2core.KDPM2DiscreteScheduler(backend="torch") for _ in range(2))
    for scheduler in (sparse, dense):
        scheduler.set_timesteps(3)
        scheduler.set_begin_index(0)
    x = torch.from_numpy(initial_noise((6, 6))) * torch.eye(6)
    y = x.to_sparse()
    for t in sparse.timesteps:
        model_output = torch.tanh(x) * torch.eye(6)
        scaled = sparse.scale_model_input(y, t)
        assert scaled.is_sparse and torch.equal(scaled.to_dense(), dense.scale_model_input(x, t))
        (y, pred_sparse), (x, pred) = sparse.step(model_output.to_sparse(), t, y, return_dict=False), dense.step(model_output, t, x, return_dict=False)
        assert y.is_sparse and torch.equal(y.to_dense(), x) and torch.equal(pred_sparse.to_dense(), pred)


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")  # storage() is what older user code keeps
def test_pool_never_reuses_a_buffer_the_caller_still_reaches():
    """The pool reuses a large output's buffer once nothing references it. A storage handle the caller kept
    (``untyped_storage()`` or ``storage()``) counts as a reference, and a buffer moved to shared memory (sent
    to another process by torch.multiprocessing) is never reused; a buffer nobody holds still is."""
    backend = kdpm2core.get_backend("torch")
    x = torch.randn(1, 4, 256, 256)  # 1 MiB: a pooled size
    for keep in (lambda t: t.untyped_storage(), lambda t: t.storage()):
        out = backend.scale(x, 0.5)
        handle, expected, address = keep(out), out.clone(), out.data_ptr()
        del out
        others = [backend.scale(torch.full_like(x, 7.0), 1.0) for _ in range(3)]
        assert all(o.data_ptr() != address for o in others)
        assert torch.equal(torch.empty(0).set_(handle.untyped() if hasattr(handle, "untyped") else handle, 0, x.shape), expected)
        del handle, others
    out = backend.scale(x, 0.5)
    address = out.data_ptr()
    del out
    assert backend.scale(x, 0.25).data_ptr() == address  # free: reused
    shared = backend.scale(x, 0.5)
    address = shared.data_ptr()
    shared.share_memory_()
    del shared
    assert all(backend.scale(x, 0.25).data_ptr() != address for _ in range(3))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
@pytest.mark.parametrize("dtypes", [(torch.float16, torch.float32), (torch.float32, torch.float64)])
def test_mixed_dtypes_give_the_promoted_dtype_as_diffusers(prediction_type, dtypes):
    """A float16 sample with a float32 model output: torch's operators, and diffusers, give float32."""
    sample_dtype, output_dtype = dtypes
    ours = kdpm2core.KDPM2DiscreteScheduler(backend="torch", prediction_type=prediction_type)
    ours.set_timesteps(10)
    x = torch.linspace(-3, 3, 4096).reshape(1, 4, 32, 32).to(sample_dtype)
    output = torch.linspace(1, -1, 4096).reshape(1, 4, 32, 32).to(output_dtype)
    first = ours.step(output, ours.timesteps[0], x)
    second = ours.step(output, ours.timesteps[1], first.prev_sample)  # a midpoint: stored is the float16 sample
    for result in (*first, *second):
        assert result.dtype == output_dtype
    if prediction_type == "v_prediction":  # diffusers has no "sample" prediction
        reference = diffusers_kdpm2(prediction_type=prediction_type)
        reference.set_timesteps(10)
        expected = reference.step(output, reference.timesteps[0], x).prev_sample
        assert expected.dtype == output_dtype
        assert relative_error(first.prev_sample.double().numpy(), expected.double().numpy()) < 1e-6


def test_cached_scalars_do_not_take_the_callers_context():
    """The scale factors are cached for the process: one made under inference_mode or a meta default device
    must not break later calls outside it."""
    x = torch.randn(1, 4, 8, 8)
    with torch.inference_mode():
        first = kdpm2core.KDPM2DiscreteScheduler(backend="torch")
        first.set_timesteps(13)
        first.scale_model_input(x, first.timesteps[0])
    with torch.device("meta"):
        other = kdpm2core.KDPM2DiscreteScheduler(backend="torch")
        other.set_timesteps(17, device="cpu")
        other.scale_model_input(x, other.timesteps[0])
    for steps in (13, 17):
        scheduler = kdpm2core.KDPM2DiscreteScheduler(backend="torch")
        scheduler.set_timesteps(steps)
        leaf = x.clone().requires_grad_(True)
        scaled = scheduler.scale_model_input(leaf, scheduler.timesteps[0])
        scaled.sum().backward()
        assert scaled.device.type == "cpu" and leaf.grad is not None
