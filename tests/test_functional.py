"""The functional API (kdpm2core.functional) against the stateful scheduler, an independent k-diffusion-style
reference of ``sample_dpm_2`` with churn, and the memory promises of the backends' update."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest

import kdpm2core
from kdpm2core import functional as F
from kdpm2core import noise
from kdpm2core.backend import update
from kdpm2core.testing.reference import sample_dpm2

from conftest import BACKENDS, initial_noise, relative_error


def _model(backend):
    """A cheap diffusers-style model written against the backend's namespace (so it traces under jit)."""
    xp = backend.xp

    def model(scaled, timestep):
        return xp.tanh(0.7 * scaled) + 0.2 * scaled * xp.sin(timestep / 200.0)

    return model


def _stateful_run(scheduler, x, model):
    outputs = []
    for t in scheduler.timesteps:
        scaled = scheduler.scale_model_input(x, t)
        prev, pred = scheduler.step(model(scaled, t), t, x, return_dict=False)
        outputs.append((scaled, prev, pred))
        x = prev
    return outputs


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_functional_steps_equal_the_stateful_scheduler_bit_for_bit(backend_name, prediction_type):
    scheduler = kdpm2core.KDPM2DiscreteScheduler(
        backend=backend_name, prediction_type=prediction_type, use_karras_sigmas=True
    )
    scheduler.set_timesteps(6)
    backend = scheduler.backend
    model = _model(backend)
    x0 = backend.asarray(initial_noise((2, 3, 4, 4)) * scheduler.init_noise_sigma)
    expected = _stateful_run(scheduler, x0, model)

    plan = F.make_plan(scheduler)
    assert F.num_substeps(plan) == len(expected) == 11
    state, x = F.init(plan, x0), x0
    for k, (scaled_ref, prev_ref, pred_ref) in enumerate(expected):
        scaled, timestep = F.model_inputs(plan, state, x)
        (prev, pred), state = F.step(plan, state, model(scaled, timestep), x)
        for name, ours, ref in (
            ("scaled input", scaled, scaled_ref),
            ("prev", prev, prev_ref),
            ("pred", pred, pred_ref),
        ):
            assert np.array_equal(backend.to_numpy(ours), backend.to_numpy(ref)), f"substep {k}: {name} differs"
        assert int(backend.to_numpy(state.index)) == k + 1
        x = prev

    final = backend.to_numpy(F.sample(plan, model, x0))
    if backend.jit:  # one compiled loop: XLA may fuse a multiply and an add into one rounding
        assert relative_error(final, backend.to_numpy(x)) < 1e-6
    else:
        assert np.array_equal(final, backend.to_numpy(x))


def test_plan_from_options_equals_plan_from_scheduler():
    options = dict(
        beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1, prediction_type="v_prediction"
    )
    scheduler = kdpm2core.KDPM2DiscreteScheduler(**options)
    scheduler.set_timesteps(9)
    ours, theirs = F.make_plan(num_inference_steps=9, **options), F.make_plan(scheduler)
    for field in ("timesteps", "sigmas", "input_scale", "table", "noise"):
        assert np.array_equal(getattr(ours, field), getattr(theirs, field)), field
    assert np.array_equal(ours.timesteps, np.asarray(scheduler.timesteps))
    assert F.init_noise_sigma(ours) == scheduler.init_noise_sigma
    assert ours.table.dtype == np.float32 and ours.timesteps.dtype == np.float32


@pytest.mark.parametrize("churn", [dict(s_churn=1.0), dict(s_churn=0.6, s_tmin=0.5, s_tmax=5.0, s_noise=1.003)])
def test_churned_denoiser_sampling_matches_an_independent_sample_dpm_2(churn):
    # float32 values: custom sigmas are stored as float32, as diffusers stores them
    sigmas = [float(np.float32(s)) for s in (14.6, 6.0, 2.5, 0.9, 0.3, 0.0)]
    plan = F.make_plan(sigmas=sigmas, dtype="float64")
    assert plan.info.prediction_type == "epsilon"

    def denoiser(x, sigma):
        return x / (1.0 + sigma**2) + 0.1 * np.sin(x)

    x0 = initial_noise((3, 5)).astype(np.float64) * 14.6
    ours = F.sample(plan, denoiser, x0, denoiser=True, seed=123, **churn)
    substeps = iter(range(F.num_substeps(plan)))  # seed= draws kdpm2core.noise's normals of (seed, substep)
    xp = kdpm2core.get_backend("numpy").xp
    expected = sample_dpm2(
        denoiser,
        x0,
        sigmas,
        **churn,
        draw=lambda: noise.normal(xp, 123, x0.shape, substep=next(substeps), dtype=xp.float64),
    )
    assert relative_error(ours, expected) < 1e-12
    unchurned = F.sample(plan, denoiser, x0, denoiser=True)
    assert relative_error(ours, unchurned) > 1e-3  # the churn did something


def test_churn_off_leaves_results_unchanged(backend_name):
    backend = kdpm2core.get_backend(backend_name)
    plan = F.make_plan(num_inference_steps=5, backend=backend_name, use_karras_sigmas=True)
    model = _model(backend)
    x0 = backend.asarray(initial_noise((2, 8)) * F.init_noise_sigma(plan))
    plain = backend.to_numpy(F.sample(plan, model, x0))
    for churn in (dict(s_churn=0.0), dict(s_churn=3.0, s_tmin=1e6)):  # no churn, or no sigma in [s_tmin, s_tmax]
        assert np.array_equal(backend.to_numpy(F.sample(plan, model, x0, seed=1, **churn)), plain)


def test_churn_is_reproducible_from_a_seed(backend_name):
    backend = kdpm2core.get_backend(backend_name)
    plan = F.make_plan(num_inference_steps=4, backend=backend_name, s_churn=2.0)
    assert plan.info.churned and float(np.max(backend.to_numpy(plan.noise))) > 0
    model = _model(backend)
    x0 = backend.asarray(initial_noise((4, 4)) * F.init_noise_sigma(plan))
    first, again, other = (backend.to_numpy(F.sample(plan, model, x0, seed=seed)) for seed in (7, 7, 8))
    assert np.array_equal(first, again)
    assert not np.allclose(first, other)
    assert np.all(np.isfinite(first))


def test_churned_plan_uses_raised_sigmas_and_their_timesteps():
    plain = F.make_plan(num_inference_steps=4)
    churned = F.make_plan(num_inference_steps=4, s_churn=4.0, s_tmax=10.0)
    gamma = min(4.0 / 4, math.sqrt(2) - 1)
    step_sigmas = np.asarray(plain.sigmas)[::2]
    raised = step_sigmas <= 10.0
    np.testing.assert_allclose(
        np.asarray(churned.sigmas)[::2], np.where(raised, step_sigmas * (1 + gamma), step_sigmas), rtol=1e-6
    )
    expected_noise = np.where(raised, step_sigmas * np.sqrt((1 + gamma) ** 2 - 1), 0.0)
    np.testing.assert_allclose(np.asarray(churned.noise)[::2], expected_noise, rtol=1e-6)
    assert np.all(np.asarray(churned.noise)[1::2] == 0)  # midpoint substeps add nothing
    # a raised sigma gets a larger timestep; an untouched step keeps the scheduler's
    timesteps, base = np.asarray(churned.timesteps)[::2], np.asarray(plain.timesteps)[::2]
    assert np.all(timesteps[raised] > base[raised]) and np.array_equal(timesteps[~raised], base[~raised])


def test_denoiser_convention_agrees_with_the_diffusers_convention():
    plan = F.make_plan(num_inference_steps=8, dtype="float64", use_karras_sigmas=True)
    xp = plan.info.backend.xp

    def epsilon_model(scaled, timestep):
        return xp.tanh(scaled) * 0.5

    def denoiser(x, sigma):  # the same model as a k-diffusion denoiser: D(x) = x - sigma * eps(x / sqrt(sigma^2 + 1))
        return x - sigma * epsilon_model(x / xp.sqrt(sigma**2 + 1.0), None)

    x0 = initial_noise((2, 6)).astype(np.float64) * F.init_noise_sigma(plan)
    assert relative_error(F.sample(plan, denoiser, x0, denoiser=True), F.sample(plan, epsilon_model, x0)) < 1e-12


def test_step_never_modifies_its_inputs(backend_name):
    backend = kdpm2core.get_backend(backend_name)
    plan = F.make_plan(num_inference_steps=3, backend=backend_name, prediction_type="v_prediction")
    x, output = backend.asarray(initial_noise((3, 7), 1)), backend.asarray(initial_noise((3, 7), 2))
    state = F.init(plan, x)
    copies = [backend.to_numpy(v).copy() for v in (x, output)]
    for _ in range(3):
        (prev, pred), state = F.step(plan, state, output, x)
    for original, after in zip(copies, (x, output)):
        assert np.array_equal(original, backend.to_numpy(after))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(num_inference_steps=4, s_churn=-1.0), ValueError, "s_churn"),
        (dict(num_inference_steps=4, s_noise="big"), TypeError, "s_noise"),
        (dict(num_inference_steps=4, bogus_option=1), TypeError, "bogus_option"),
        (dict(num_inference_steps=0), ValueError, "num_inference_steps"),
        (dict(num_inference_steps=2.5), TypeError, "num_inference_steps"),
        (dict(), ValueError, "num_inference_steps"),
        (dict(num_inference_steps=4, prediction_type="noise"), ValueError, "prediction_type"),
    ],
)
def test_bad_plan_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        plan = F.make_plan(**kwargs)
        F.sample(plan, lambda x, t: x, np.zeros(2, dtype=np.float32))


def test_churn_without_a_seed_is_refused():
    plan = F.make_plan(num_inference_steps=3)
    with pytest.raises(ValueError, match="seed"):
        F.sample(plan, lambda x, t: x, np.zeros(2, dtype=np.float32), s_churn=1.0)
    with pytest.raises(TypeError, match="source"):
        F.make_plan(object())
    with pytest.raises(ValueError, match="index"):
        F.init(plan, np.zeros(2, dtype=np.float32), index=5)


def test_sample_of_another_dtype_than_the_plan_is_refused(backend_name):
    """A float32 plan with float64 (or bfloat16) latents would promote silently, or change a compiled loop's
    carry type; the error names the plan to make."""
    backend = kdpm2core.get_backend(backend_name)
    plan = F.make_plan(num_inference_steps=3, backend=backend_name)
    x = backend.asarray(np.ones(2), dtype=backend.dtype("float64" if backend.float64 else "float16"))
    name = "float64" if backend.float64 else "float16"
    for call in (lambda: F.step(plan, F.init(plan, x), x, x), lambda: F.sample(plan, lambda a, t: a, x)):
        with pytest.raises(TypeError, match=f"sample is {name} but the plan holds float32.*dtype='{name}'"):
            call()


def test_init_refuses_midpoint_and_non_integer_indices():
    """A midpoint substep continues from the sample its Euler substep stored; init has none to give it."""
    plan = F.make_plan(num_inference_steps=3)
    x = np.ones(2, dtype=np.float32)
    for index in (1, 3, np.int64(3)):
        with pytest.raises(
            ValueError, match=f"index {index} is a midpoint substep.*start at an Euler substep \\({index - 1}\\)"
        ):
            F.init(plan, x, index)
    for index in (-1, np.int64(-1), 5, np.int32(5)):
        with pytest.raises(ValueError, match=r"index must be in \[0, 4\]"):
            F.init(plan, x, index)
    for index in (2.0, True, "2", None):
        with pytest.raises(TypeError, match="index must be an integer"):
            F.init(plan, x, index)
    state = F.init(plan, x, np.int64(2))  # an Euler substep: continues as the loop would
    assert int(state.index) == 2
    (prev, _), _ = F.step(plan, state, np.zeros_like(x), x)
    np.testing.assert_array_equal(prev, x)  # a zero prediction leaves an Euler substep's sample unchanged


def test_out_buffers_receive_the_results(backend_name):
    backend = kdpm2core.get_backend(backend_name)
    plan = F.make_plan(num_inference_steps=3, backend=backend_name, prediction_type="v_prediction")
    x, output = backend.asarray(initial_noise((2, 9), 1)), backend.asarray(initial_noise((2, 9), 2))
    state = F.init(plan, x)
    (prev, pred), _ = F.step(plan, state, output, x)
    buffers = (backend.xp.zeros_like(x), backend.xp.zeros_like(x))
    (prev_out, pred_out), _ = F.step(plan, state, output, x, out=buffers)
    assert np.array_equal(backend.to_numpy(prev_out), backend.to_numpy(prev))
    assert np.array_equal(backend.to_numpy(pred_out), backend.to_numpy(pred))
    if backend.inplace:  # written into the caller's buffers (JAX arrays are immutable: fresh results)
        assert prev_out is buffers[0] and pred_out is buffers[1]


# -- memory: a step allocates its two outputs, and nothing when given buffers ----------------------------------
SHAPE = (4, 4, 64, 64)  # 256 KiB per float32 array: large enough to see a stray temporary


def test_numpy_step_allocates_only_its_outputs():
    scheduler = kdpm2core.KDPM2DiscreteScheduler(prediction_type="v_prediction")  # v: every coefficient non-trivial
    scheduler.set_timesteps(5)
    plan = F.make_plan(scheduler)
    x, output = initial_noise(SHAPE, 1), initial_noise(SHAPE, 2)
    nbytes = x.nbytes
    from kdpm2_numpy.backend import CHUNK

    scratch = CHUNK * 4  # one float32 chunk of scratch at a time
    buffers = (np.empty_like(x), np.empty_like(x))
    state = F.init(plan, x)
    for label, call, budget in (
        ("stateful", lambda: scheduler.step(output, scheduler.timesteps[0], x), 2 * nbytes + scratch),
        ("functional", lambda: F.step(plan, state, output, x), 2 * nbytes + scratch),
        ("functional out=", lambda: F.step(plan, state, output, x, out=buffers), scratch),
    ):
        call()  # warm caches (dtype lookups, the row's 0-d arrays)
        tracemalloc.start()
        result = call()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        del result
        assert peak <= budget + 16384, f"{label}: peak {peak} bytes for arrays of {nbytes} bytes"
        scheduler.set_timesteps(5)


@pytest.mark.skipif("torch" not in BACKENDS, reason="torch is not installed")
def test_torch_step_allocates_only_its_outputs():
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Allocations(TorchDispatchMode):
        """Records the size of every tensor an op returns that does not share storage with an input."""

        def __init__(self):
            super().__init__()
            self.sizes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            inputs = {
                t.untyped_storage().data_ptr()
                for t in torch.utils._pytree.tree_leaves((args, kwargs))
                if isinstance(t, torch.Tensor)
            }
            for t in torch.utils._pytree.tree_leaves(result):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                    self.sizes.append(t.numel())
            return result

    scheduler = kdpm2core.KDPM2DiscreteScheduler(backend="torch", prediction_type="v_prediction")
    scheduler.set_timesteps(5)
    plan = F.make_plan(scheduler)
    x, output = torch.from_numpy(initial_noise(SHAPE, 1)), torch.from_numpy(initial_noise(SHAPE, 2))
    buffers = (torch.empty_like(x), torch.empty_like(x))
    state = F.init(plan, x)
    numel = x.numel()
    for label, call, expected in (
        ("stateful", lambda: scheduler.step(output, scheduler.timesteps[0], x), 2),
        ("functional", lambda: F.step(plan, state, output, x), 2),
        ("functional out=", lambda: F.step(plan, state, output, x, out=buffers), 0),
    ):
        with Allocations() as seen:
            call()
        large = [size for size in seen.sizes if size >= numel]
        assert len(large) == expected, f"{label}: allocated {large}"
        assert all(size < 64 for size in seen.sizes if size < numel), f"{label}: temporaries {seen.sizes}"


@pytest.mark.skipif("torch" not in BACKENDS, reason="torch is not installed")
def test_torch_step_stays_differentiable():
    import torch

    scheduler = kdpm2core.KDPM2DiscreteScheduler(backend="torch")
    scheduler.set_timesteps(3)
    x = torch.from_numpy(initial_noise((4, 4, 128, 128))).requires_grad_()
    output = torch.tanh(x)
    prev, pred = scheduler.step(output, scheduler.timesteps[0], x, return_dict=False)
    (prev.sum() + pred.sum()).backward()
    a, b, c, p, q, *_ = scheduler._rows[0]
    derivative = 1 - torch.tanh(x.detach()) ** 2  # d tanh
    expected = (b + p) + (c + q) * derivative
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-5)


def test_step_checks_its_arrays_against_the_sample():
    """Shapes never broadcast, dtypes never promote the carry, arrays of another library are refused by name,
    and out buffers that overlap an input (which the update would overwrite before reading) are refused."""
    plan = F.make_plan(num_inference_steps=5)
    x = np.ones((4, 8), np.float32)
    state = F.init(plan, x)
    with pytest.raises(ValueError, match=r"model_output has shape \(4, 1\) but sample has shape \(4, 8\)"):
        F.step(plan, state, np.ones((4, 1), np.float32), x)
    with pytest.raises(TypeError, match="model_output is float64 but sample is float32"):
        F.step(plan, state, np.ones((4, 8)), x)
    with pytest.raises(TypeError, match="model_output must be an array of backend 'numpy', got builtins.list"):
        F.step(plan, state, x.tolist(), x)
    with pytest.raises(ValueError, match=r"out\[0\] has shape \(32,\)"):
        F.step(plan, state, x, x, out=(np.empty(32, np.float32), np.empty_like(x)))
    with pytest.raises(TypeError, match=r"out\[1\] is float64"):
        F.step(plan, state, x, x, out=(np.empty_like(x), np.empty((4, 8))))
    (y, _), state = F.step(plan, state, x, x)  # state.stored is now x
    for out in ((x, np.empty_like(x)), (np.empty_like(x), y[:]), (np.empty_like(x), x.reshape(8, 4).T.T.reshape(4, 8))):
        with pytest.raises(ValueError, match="must not overlap"):
            F.step(plan, state, np.zeros_like(x), y, out=out)


@pytest.mark.parametrize("name", [name for name in ("numpy", "torch") if name in kdpm2core.available_backends()])
def test_out_buffers_that_are_inputs_or_each_other_are_refused(name):
    """On every backend (not only NumPy, which also refuses views that overlap an input): an out buffer that is
    the sample, the model output or the stored sample would be overwritten before the other result reads it, and
    one buffer for both results would hold pred_original_sample twice. Refused by name before anything is
    written; and an absent buffer is a type error, not a match with the absent noise."""
    backend = kdpm2core.get_backend(name)
    plan = F.make_plan(num_inference_steps=5, backend=name)
    x = backend.asarray(np.ones((4, 8), np.float32))
    (y, _), state = F.step(plan, F.init(plan, x), x * 0.5, x)  # state.stored is now x
    model_output, free = x * 0.25, backend.asarray(np.full((4, 8), 7.0, np.float32))
    for out, what in (
        ((y, free), r"out\[0\] is sample"),
        ((free, model_output), r"out\[1\] is model_output"),
        ((x, free), r"out\[0\] is state.stored"),
        ((free, free), r"out\[1\] is out\[0\]"),
    ):
        with pytest.raises(ValueError, match=what + ": out buffers must not overlap"):
            F.step(plan, state, model_output, y, out=out)
        assert np.all(backend.to_numpy(free) == 7.0)
    with pytest.raises(TypeError, match="out\\[0\\] must be an array of backend"):
        F.step(plan, state, model_output, y, out=(None, None))
    assert np.all(backend.to_numpy(y) == backend.to_numpy(F.step(plan, F.init(plan, x), x * 0.5, x)[0][0]))


@pytest.mark.parametrize("layout", ["fortran", "transposed", "strided"])
def test_numpy_samples_of_any_memory_layout(layout):
    """An NHWC view transposed to NCHW, a Fortran-ordered or a strided sample: the same numbers as its
    contiguous copy, in C-contiguous outputs (both APIs)."""
    base = np.random.default_rng(0).standard_normal((2, 6, 8, 4)).astype(np.float32)
    sample = {
        "fortran": np.asfortranarray(base),
        "transposed": base.transpose(0, 3, 1, 2),
        "strided": base[:, ::2],
    }[layout]
    contiguous = np.ascontiguousarray(sample)
    results = []
    for x in (sample, contiguous):
        scheduler = kdpm2core.KDPM2DiscreteScheduler()
        scheduler.set_timesteps(4)
        for t in scheduler.timesteps[:3]:  # Euler, midpoint, Euler
            x = scheduler.step(0.5 * scheduler.scale_model_input(x, t), t, x).prev_sample
        results.append(x)
    np.testing.assert_array_equal(results[0], results[1])
    assert results[0].flags.c_contiguous
    plan = F.make_plan(num_inference_steps=4)
    (prev, pred), _ = F.step(plan, F.init(plan, sample), sample, sample)
    (prev_c, pred_c), _ = F.step(plan, F.init(plan, contiguous), contiguous, contiguous)
    np.testing.assert_array_equal(prev, prev_c)
    np.testing.assert_array_equal(pred, pred_c)


@pytest.mark.parametrize("backend_name", ["numpy", "dask"])
def test_mixed_dtypes_follow_numpys_promotion(backend_name):
    """A float32 sample with a float64 model output gives float64, as the arithmetic does (torch and diffusers
    too); on Dask the lazy array's dtype says so too. An integer sample is refused by name."""
    if backend_name not in kdpm2core.available_backends():
        pytest.skip(f"backend {backend_name!r} is not installed")
    backend = kdpm2core.get_backend(backend_name)
    x32 = np.random.default_rng(1).standard_normal((2, 3, 4)).astype(np.float32)
    results = {}
    for name, (sample, output) in {
        "mixed": (x32, 0.5 * x32.astype(np.float64)),
        "wide": (x32.astype(np.float64), 0.5 * x32.astype(np.float64)),
    }.items():
        scheduler = kdpm2core.KDPM2DiscreteScheduler(backend=backend_name)
        scheduler.set_timesteps(4)
        scheduler.set_begin_index(0)
        prev = scheduler.step(backend.asarray(output), scheduler.timesteps[0], backend.asarray(sample)).prev_sample
        assert prev.dtype == np.float64, name
        results[name] = backend.to_numpy(prev)
        assert results[name].dtype == np.float64
    np.testing.assert_array_equal(results["mixed"], results["wide"])  # float32 values are exact in float64
    if backend_name == "numpy":
        scheduler = kdpm2core.KDPM2DiscreteScheduler()
        scheduler.set_timesteps(4)
        with pytest.raises(TypeError, match="sample and model_output must be floating-point arrays.*int64"):
            scheduler.step(np.ones((2, 2), np.int64), scheduler.timesteps[0], np.ones((2, 2), np.int64))
        # a row whose coefficients are all zero (the protocol allows it) is zeros of the sample's dtype
        zeros = update(backend, 0.0, 0.0, 0.0, 0.0, 0.0, None, x32, x32.astype(np.float64))
        assert all(z.dtype == np.float32 and not z.any() for z in zeros)


def test_sample_from_a_later_substep_is_img2img(backend_name):
    """``sample(..., start=k)`` runs substeps k.. on latents noised to substep k: the stateful scheduler's
    img2img loop (set_begin_index(k), add_noise, step) bit for bit, or within the rounding a compiled loop may
    save."""
    backend = kdpm2core.get_backend(backend_name)
    scheduler = kdpm2core.KDPM2DiscreteScheduler(use_karras_sigmas=True, backend=backend_name)
    scheduler.set_timesteps(10)
    scheduler.set_begin_index(6)  # img2img: the loop starts at substep 6 of 19
    image = backend.asarray(np.linspace(-1.0, 1.0, 12, dtype=np.float32).reshape(3, 4))
    noise = backend.asarray(np.cos(np.arange(12, dtype=np.float32)).reshape(3, 4))
    x = scheduler.add_noise(image, noise, scheduler.timesteps[6:7])
    plan = F.make_plan(scheduler)

    def model(scaled, t):
        return 0.5 * scaled + 0.0 * t

    expected = x
    for t in scheduler.timesteps[6:]:
        expected = scheduler.step(model(scheduler.scale_model_input(expected, t), t), t, expected).prev_sample
    eager, state = x, F.init(plan, x, 6)  # the functional steps, run one by one: the same ops, the same bits
    for _ in range(6, F.num_substeps(plan)):
        (eager, _), state = F.step(plan, state, model(*F.model_inputs(plan, state, eager)), eager)
    np.testing.assert_array_equal(backend.to_numpy(eager), backend.to_numpy(expected))
    got, expected = backend.to_numpy(F.sample(plan, model, x, start=6)), backend.to_numpy(expected)
    if backend.jit:
        # a compiled loop (XLA) may fuse a multiply-add, rounding once where the eager ops round twice: at most
        # half an ulp of a term per substep, 13 substeps of values below 2, through updates that do not grow
        # them (|b| <= 1, the model halves): 13 * 2**-23 * 2 < 4e-6
        np.testing.assert_allclose(got, expected, rtol=0, atol=4e-6)
    else:
        np.testing.assert_array_equal(got, expected)
    with pytest.raises(ValueError, match="start 5 is a midpoint substep.*Euler substep \\(4\\)"):
        F.sample(plan, model, x, start=5)
    with pytest.raises(ValueError, match=r"start must be in \[0, 18\], got 19"):
        F.sample(plan, model, x, start=19)
    with pytest.raises(TypeError, match="start must be an integer"):
        F.sample(plan, model, x, start=2.0)


def test_index_dtype_is_the_namespaces_default():
    """The substep index is made in ``default_dtypes()["indexing"]`` of the namespace's inspection object, or,
    for a namespace without one, in the dtype the namespace gives a Python integer (the standard's default)."""
    import array_api_compat.numpy as xp

    assert F._index_dtype(xp) == xp.__array_namespace_info__().default_dtypes()["indexing"] == np.int64

    class Older:  # a namespace from before the inspection API
        asarray = staticmethod(lambda obj: np.asarray(obj, dtype=np.int32))

    assert F._index_dtype(Older) == np.int32
    plan = F.make_plan(num_inference_steps=3)
    assert plan.info.index_dtype == np.int64 and F.init(plan, np.zeros(2, np.float32)).index.dtype == np.int64
