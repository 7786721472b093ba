"""The functional API (:mod:`kdpm2core.functional`) on every backend: against the stateful scheduler, as one
loop (:func:`~kdpm2core.functional.sample`), from a start substep (img2img), with churn, into ``out=`` buffers.

Two paths of our own that run the same operations in the same order agree bit for bit:

- a functional step and a stateful step in float32 and float64. Both use the schedule's float64 coefficients
  rounded once to the working dtype (the plan's table holds them so; a library rounds a Python float so). In
  float16 and bfloat16 a library may multiply by a Python float in float32 (torch does) while the plan's table
  is rounded to the dtype, so there each path is checked against its own inputs instead;
- :func:`~kdpm2core.functional.sample` and a loop of :func:`~kdpm2core.functional.step`, unless the backend
  compiles the loop (``jit``): a compiler may fuse a multiply and an add into one rounding, so there the two
  are held to a bound instead.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from kdpm2core import functional as F
from kdpm2core import noise
from kdpm2core.testing.cases import array_toy_model
from kdpm2core.testing.reference import sample_dpm2
from kdpm2core.testing.support import assert_close

STEPS = 4  # 7 substeps: three Euler-midpoint pairs and the final Euler substep
CONFIG = {"beta_schedule": "scaled_linear", "use_karras_sigmas": True}
START = np.array([[-1.9, -0.6, 0.0, 0.45], [1.1, 2.3, -0.05, 0.8]])  # both signs, a zero, past 2 std
EXACT = ("float32", "float64")  # dtypes where a Python-float and an in-dtype coefficient round alike
# The smallest subnormal of each dtype: a product that underflows is off by up to half of it, whatever its scale.
TINY = {"float16": 2.0**-24, "bfloat16": 2.0**-133, "float32": 2.0**-149, "float64": 2.0**-1074}
# k-diffusion style sigmas for the churn tests, float32 values as custom sigmas are stored
SIGMAS = [float(np.float32(s)) for s in (14.6, 6.0, 2.5, 0.9, 0.3, 0.0)]


def _denoiser(xp):
    """A k-diffusion denoiser ``D(x, sigma)`` in the backend's namespace (``sigma``: a 0-d array)."""

    def denoiser(x, sigma):
        return x / (1.0 + sigma * sigma) + 0.1 * xp.sin(x)

    return denoiser


def _host_denoiser(x, sigma):
    return x / (1.0 + sigma * sigma) + 0.1 * np.sin(x)


def _setup(case, prediction_type="epsilon"):
    """A scheduler on the case's device after ``set_timesteps``, its plan in the case's dtype, and the start."""
    scheduler = case.scheduler(**CONFIG, prediction_type=prediction_type)
    scheduler.set_timesteps(STEPS, device=case.device_name)
    plan = F.make_plan(scheduler, dtype=case.dtype)
    return scheduler, plan, case.array(START * scheduler.init_noise_sigma)


def _identical(case, ours, theirs, what: str) -> None:
    assert case.backend.owns(ours) and ours.dtype == theirs.dtype and tuple(ours.shape) == tuple(theirs.shape), (
        f"{case.label} [{what}]: {type(ours).__name__} {ours.dtype}{tuple(ours.shape)}, expected "
        f"{type(theirs).__name__} {theirs.dtype}{tuple(theirs.shape)}"
    )
    a, b = case.to_numpy(ours), case.to_numpy(theirs)
    assert np.array_equal(a, b), (
        f"{case.label} [{what}]: not bit-identical, max abs difference {float(np.max(np.abs(a - b))):.3g} "
        "(same operations in the same order must round alike)"
    )


def _combination(case, result, terms, what: str) -> None:
    """``result`` is ``sum(coef * x)`` of the float64 ``coef`` and the host copies ``x`` of its inputs.

    At most four roundings separate them, each at most u (the dtype's unit roundoff) relative to a magnitude
    no larger than ``sum |coef * x|``: the coefficient to the dtype, the product, two sums. So the error is at
    most gamma_4 = 4u / (1 - 4u) < 5u times that sum, elementwise, plus the underflow of a subnormal product."""
    expected = sum(coef * x for coef, x in terms)
    magnitude = sum(abs(coef) * np.abs(x) for coef, x in terms)
    got = case.to_numpy(result)
    allowed = 5 * case.eps * magnitude + 4 * TINY[case.dtype_name]
    bad = np.abs(got - expected) > allowed
    assert not np.any(bad), (
        f"{case.label} [{what}]: {int(bad.sum())} of {bad.size} values off by more than 5u of their terms' "
        f"magnitude; first at {tuple(int(i) for i in np.argwhere(bad)[0])}: got {got[bad][0]!r}, expected "
        f"{expected[bad][0]!r} (allowed {allowed[bad][0]:.3g})"
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_functional_steps_equal_the_scheduler(kdpm2_case, prediction_type):
    """``make_plan(scheduler)``, ``init``, ``model_inputs`` and ``step`` give what the scheduler's
    ``scale_model_input`` and ``step`` give: bit for bit in float32 and float64; in float16 and bfloat16 each
    path's model input and both results are the substep's combinations of that path's own inputs."""
    case = kdpm2_case
    scheduler, plan, x = _setup(case, prediction_type)
    model = array_toy_model(case.xp)
    rows = np.asarray(plan.info.base.table, dtype=np.float64)  # the float64 coefficients (a, b, c, p, q, first)
    scales = 1.0 / np.sqrt(np.asarray(plan.info.base.sigma_in, dtype=np.float64) ** 2 + 1.0)
    assert F.num_substeps(plan) == scheduler.timesteps.shape[0] == 2 * STEPS - 1
    state, y, before_x = F.init(plan, x), x, None
    for k in range(F.num_substeps(plan)):
        what = f"prediction_type={prediction_type} substep {k}"
        t = scheduler.timesteps[k]
        scaled = scheduler.scale_model_input(x, t)
        output = model(scaled, t)
        prev, pred = scheduler.step(output, t, x, return_dict=False)
        f_scaled, f_t = F.model_inputs(plan, state, y)
        f_output = model(f_scaled, f_t)
        (f_prev, f_pred), new_state = F.step(plan, state, f_output, y)
        _identical(case, f_t, t, f"{what}: timestep")
        if case.dtype_name in EXACT:
            for name, ours, theirs in (
                ("model input", f_scaled, scaled),
                ("prev_sample", f_prev, prev),
                ("pred_original_sample", f_pred, pred),
            ):
                _identical(case, ours, theirs, f"{what}: {name}")
        else:
            a, b, c, p, q, *_ = rows[k]
            for path, (sample, stored, out, results, model_input) in {
                "stateful": (x, before_x, output, (prev, pred), scaled),
                "functional": (y, state.stored, f_output, (f_prev, f_pred), f_scaled),
            }.items():
                s, m = case.to_numpy(sample), case.to_numpy(out)
                st = np.zeros_like(s) if stored is None else case.to_numpy(stored)
                _combination(case, model_input, [(scales[k], s)], f"{what}: {path} model input")
                _combination(case, results[0], [(b, s), (c, m), (a, st)], f"{what}: {path} prev_sample")
                _combination(case, results[1], [(p, s), (q, m)], f"{what}: {path} pred_original_sample")
        before_x, x, y, state = x, prev, f_prev, new_state
    assert int(case.to_numpy(state.index)) == F.num_substeps(plan)
    assert state.index.dtype == plan.info.index_dtype, f"{case.label}: State.index is {state.index.dtype}"


def _jit_rtol(case, substeps: int) -> float:
    """The bound between a compiled loop and the same loop run eagerly, relative to the trajectory's scale.

    test_sampling holds every backend's eagerly run loop to 2u (the dtype's unit roundoff) per substep of the
    trajectory's scale from a float64 run, and a compiler that fuses a multiply and an add, or keeps a fused
    chain in higher precision, rounds no more often; so the two are within 4u per substep of each other."""
    return 4 * case.eps * substeps


def _loop(plan, model, x, start=0):
    """The functional loop written out: ``init`` at ``start``, then ``model_inputs`` and ``step``."""
    state = F.init(plan, x, start)
    for _ in range(start, F.num_substeps(plan)):
        (x, _), state = F.step(plan, state, model(*F.model_inputs(plan, state, x)), x)
    return x


def _same_or_close(case, ours, theirs, start, what: str, substeps: int) -> None:
    """Bit-identical where the backend runs the loop eagerly, within :func:`_jit_rtol` of the scale of the
    trajectory from ``start`` where it compiles it."""
    if not case.backend.jit:
        _identical(case, ours, theirs, what)
        return
    reference = case.to_numpy(theirs)
    rtol = _jit_rtol(case, substeps)
    scale = max(1.0, float(np.max(np.abs(case.to_numpy(start)))), float(np.max(np.abs(reference))))
    assert_close(ours, reference, case, what=f"{what} (compiled loop, jit=True)", rtol=rtol, atol=rtol * scale)


def test_sample_equals_the_step_loop(kdpm2_case):
    """``sample`` (the backend's ``loop``) is the loop of ``step``, also when started at an Euler substep."""
    case = kdpm2_case
    _, plan, x = _setup(case, "v_prediction")
    model = array_toy_model(case.xp)
    n = F.num_substeps(plan)
    _same_or_close(case, F.sample(plan, model, x), _loop(plan, model, x), x, "sample() vs the step loop", n)
    _same_or_close(
        case,
        F.sample(plan, model, x, start=4),
        _loop(plan, model, x, start=4),
        x,
        "sample(start=4) vs the step loop from substep 4",
        n - 4,
    )
    with pytest.raises(ValueError, match="midpoint"):
        F.sample(plan, model, x, start=3)


@pytest.mark.kdpm2_dtypes("float32")
def test_init_takes_python_numpy_and_backend_integers(kdpm2_case):
    """``init``'s index may be a Python or NumPy integer, or a 0-d integer array of the backend (a traced value
    in a compiled loop); the state's index is then in the namespace's default index dtype, on the plan's
    device, and the loop continues from it."""
    case = kdpm2_case
    _, plan, x = _setup(case)
    model = array_toy_model(case.xp)
    expected = case.to_numpy(_loop(plan, model, x, start=4))
    for index in (4, np.int64(4), case.backend.asarray(4, dtype=case.backend.dtype("int32"), device=case.device)):
        state = F.init(plan, x, index)
        what = f"init(plan, x, {type(index).__module__}.{type(index).__name__} 4)"
        assert state.index.dtype == plan.info.index_dtype and int(case.to_numpy(state.index)) == 4, (
            f"{case.label}: {what} gave index {state.index!r}, expected 4 of {plan.info.index_dtype}"
        )
        y = x
        for _ in range(4, F.num_substeps(plan)):
            (y, _), state = F.step(plan, state, model(*F.model_inputs(plan, state, y)), y)
        assert np.array_equal(case.to_numpy(y), expected), f"{case.label}: the loop from {what} differs"


@pytest.mark.kdpm2_dtypes("float32", "float64")
def test_img2img_start_equals_the_scheduler(kdpm2_case):
    """img2img: the scheduler's ``set_begin_index(k)``, ``add_noise`` and loop, and ``sample(start=k)`` on the
    same noised latents, give the same image."""
    case = kdpm2_case
    scheduler, plan, _ = _setup(case)
    model = array_toy_model(case.xp)
    image, begin = case.array(START), 2
    noise = case.array(np.cos(np.arange(START.size)).reshape(START.shape))
    scheduler.set_begin_index(begin)
    latents = scheduler.add_noise(image, noise, scheduler.timesteps[begin : begin + 1])
    x = latents
    for k in range(begin, F.num_substeps(plan)):
        t = scheduler.timesteps[k]
        x = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    ours = F.sample(plan, model, latents, start=begin)
    _same_or_close(
        case,
        ours,
        x,
        latents,
        f"sample(start={begin}) vs set_begin_index({begin}) + add_noise",
        F.num_substeps(plan) - begin,
    )


def _churn_plan(case, **churn):
    return F.make_plan(sigmas=SIGMAS, backend=case.backend_name, dtype=case.dtype, device=case.device_name, **churn)


def _draws(case, plan, seed: int, shape):
    """The standard normals ``sample`` draws with ``seed`` on ``plan`` (:func:`kdpm2core.noise.normal` of the seed
    and the substep), one per substep, as host copies."""
    device = plan.info.device
    return [
        case.to_numpy(noise.normal(case.xp, seed, shape, substep=k, dtype=case.dtype, device=device))
        for k in range(F.num_substeps(plan))
    ]


CHURN = {"s_churn": 1.5, "s_tmin": 0.5, "s_tmax": 10.0, "s_noise": 1.003}


@pytest.mark.kdpm2_dtypes("float32", "float64")
def test_churn_equals_the_reference_sampler(kdpm2_case):
    """Churn with a fixed seed: ``sample(..., denoiser=True)`` follows k-diffusion's ``sample_dpm_2`` (an
    independent float64 reference) given the same standard normals, and churn set in ``make_plan`` or in
    ``sample`` is one computation (bit for bit)."""
    case = kdpm2_case
    plan = _churn_plan(case)
    x = case.array(START * SIGMAS[0])
    ours = F.sample(plan, _denoiser(case.xp), x, denoiser=True, seed=11, **CHURN)
    again = F.sample(
        _churn_plan(case, prediction_type="sample", **CHURN), _denoiser(case.xp), x, denoiser=True, seed=11
    )
    _identical(case, ours, again, "churn given to make_plan vs to sample")
    draws = iter(_draws(case, plan, 11, START.shape))
    expected = sample_dpm2(_host_denoiser, case.to_numpy(x), SIGMAS, **CHURN, draw=lambda: next(draws))
    # each of the 9 substeps rounds about eight times (noise, denoiser, coefficients, products and sums), each
    # at most u of the trajectory's scale; the denoiser's slope (< 1.1) grows earlier errors by < 2.4x in all
    rtol = 8 * case.eps * 9 * 2.4
    scale = max(1.0, float(np.max(np.abs(expected))), SIGMAS[0] * float(np.max(np.abs(START))))
    assert_close(ours, expected, case, what=f"churn {CHURN} seed=11 vs sample_dpm_2", rtol=rtol, atol=rtol * scale)
    unchurned = F.sample(plan, _denoiser(case.xp), x, denoiser=True)
    assert not np.array_equal(case.to_numpy(unchurned), case.to_numpy(ours)), f"{case.label}: churn changed nothing"


@pytest.mark.kdpm2_dtypes("float32")
def test_churn_noise_statistics(kdpm2_case):
    """The churn noise is standard normal and fresh at every substep: from ``x = 0`` with a linear denoiser the
    result is ``sum_i B_i eps_i``, a normal whose variance ``sum B_i^2`` the reference gives exactly (``B_i``: the
    result when only draw ``i`` is 1). A generator that repeats a draw gives ``(sum B_i)^2`` instead."""
    case = kdpm2_case
    churn = {"s_churn": 3.0, "s_noise": 1.0}
    plan = _churn_plan(case, **churn)
    n = 20000
    x = case.xp.zeros((n,), dtype=case.dtype, **({} if plan.info.device is None else {"device": plan.info.device}))

    def linear(x, sigma):
        return x * (1.0 / (1.0 + sigma * sigma))

    result = case.to_numpy(F.sample(plan, linear, x, denoiser=True, seed=5))
    substeps = F.num_substeps(plan)
    gains = [float(sample_dpm2(linear, 0.0, SIGMAS, **churn, draw=iter(unit).__next__)) for unit in np.eye(substeps)]
    variance = sum(g * g for g in gains)
    assert variance < 0.7 * sum(gains) ** 2, f"the test needs several churned steps, gains {gains}"
    # the sample variance of n normals has relative standard deviation sqrt(2 / n) (0.01); its mean sqrt(var / n)
    assert abs(result.var() / variance - 1) < 5 * math.sqrt(2 / n), (
        f"{case.label}: churned result variance {result.var():.4g}, expected {variance:.4g} from gains {gains}"
    )
    assert abs(result.mean()) < 5 * math.sqrt(variance / n), f"{case.label}: churned result mean {result.mean():.3g}"


def test_out_buffers_receive_the_results(kdpm2_case):
    """``step(..., out=(a, b))`` writes the results into the caller's buffers and returns them, with the same
    values as without ``out``; the inputs are untouched."""
    case = kdpm2_case
    if not case.backend.inplace:
        pytest.skip(
            f"backend {case.backend_name!r} declares inplace=False: its arrays are immutable, so out= buffers go unused"
        )
    _, plan, x = _setup(case)
    model = array_toy_model(case.xp)
    state = F.init(plan, x)
    for k in range(3):  # an Euler, a midpoint and an Euler substep
        output = model(*F.model_inputs(plan, state, x))
        keep = case.to_numpy(x), case.to_numpy(output)
        (prev, pred), new_state = F.step(plan, state, output, x)
        buffers = (case.xp.zeros_like(x), case.xp.zeros_like(x))
        (prev_out, pred_out), _ = F.step(plan, state, output, x, out=buffers)
        assert prev_out is buffers[0] and pred_out is buffers[1], f"{case.label}: step(out=) did not return the buffers"
        _identical(case, prev_out, prev, f"substep {k}: prev_sample into out[0]")
        _identical(case, pred_out, pred, f"substep {k}: pred_original_sample into out[1]")
        assert np.array_equal(case.to_numpy(x), keep[0]) and np.array_equal(case.to_numpy(output), keep[1]), (
            f"{case.label}: step(out=) modified its inputs at substep {k}"
        )
        x, state = prev, new_state
