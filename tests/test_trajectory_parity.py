"""Whole sampling loops match diffusers' ``KDPM2DiscreteScheduler`` (torch CPU, float32) on every backend.

The "model" is :func:`conftest.synthetic_model`, a smooth nonlinear function of the scaled input and the
timestep evaluated on the host in float64, so both schedulers see the same function. Every substep's
``prev_sample`` and ``pred_original_sample`` must agree within 1e-4 relative (max abs difference over max
abs value) -- the issue's bound. Measured worst case: 5e-7 for epsilon, 7e-6 for v_prediction (squaredcos_cap_v2,
last substeps), where diffusers' float32 evaluation is the less accurate side: against a float64 run of the
same loop it is 6e-6 off, ours 4e-7.
"""

from __future__ import annotations

import numpy as np
import pytest
from float32_bounds import U, assert_within, midpoint_timestep_bound, sigma_to_t_bound

from conftest import BACKENDS, diffusers_kdpm2, initial_noise, relative_error, scheduler_options, synthetic_model

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' numpy 2 interop noise
pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

from kdpm2core import KDPM2DiscreteScheduler  # noqa: E402

RTOL = 1e-4
STEPS = 50
SHAPE = (2, 4, 8, 8)
TRAINED_BETAS = np.linspace(0.0001, 0.02, 1000).tolist()

FAMILIES = (None, "karras", "exponential", "beta")
BETAS = ("linear", "scaled_linear", "squaredcos_cap_v2", "trained_betas")
SPACINGS = (("linspace", 0), ("leading", 1), ("trailing", 0))
PREDICTIONS = ("epsilon", "v_prediction")  # diffusers raises NotImplementedError for "sample"


def _options(family, beta, spacing, prediction) -> dict:
    return scheduler_options(beta, family, *spacing, trained_betas=TRAINED_BETAS, prediction_type=prediction)


# A pairwise covering grid: every pair of values of any two of the four options appears in some row
# (16 rows instead of the 96 of the full product).
GRID = [
    _options(FAMILIES[f], BETAS[b], SPACINGS[(f + b) % 3], PREDICTIONS[(f // 2 + b) % 2])
    for f in range(4)
    for b in range(4)
]


def _id(kw) -> str:
    return "-".join(str(v) for k, v in kw.items() if k != "trained_betas" and v not in (0, True)) + (
        "-trained" if "trained_betas" in kw else ""
    )


def test_grid_covers_every_pair():
    keys = ("family", "beta", "spacing", "prediction")

    def value(kw, key):
        if key == "family":
            return next((f for f in FAMILIES[1:] if kw.get(f"use_{f}_sigmas")), None)
        if key == "beta":
            return "trained_betas" if "trained_betas" in kw else kw["beta_schedule"]
        return (kw["timestep_spacing"], kw["steps_offset"]) if key == "spacing" else kw["prediction_type"]

    sizes = {"family": 4, "beta": 4, "spacing": 3, "prediction": 2}
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            assert len({(value(kw, a), value(kw, b)) for kw in GRID}) == sizes[a] * sizes[b], (a, b)


# ---- the two loops ---------------------------------------------------------------------------------------------
def first_timestep_repeats(kw, steps=STEPS) -> bool:
    """True when the schedule's first timestep occurs again (see test_repeated_first_timestep)."""
    scheduler = KDPM2DiscreteScheduler(**kw)
    scheduler.set_timesteps(steps)
    timesteps = np.asarray(scheduler.timesteps)
    return bool(np.sum(timesteps == timesteps[0]) > 1)


def reference_loop(kw, steps=STEPS, start=0, x0=None):
    """diffusers' loop as a pipeline runs it; returns the list of (prev_sample, pred_original_sample)."""
    scheduler = diffusers_kdpm2(**kw)
    scheduler.set_timesteps(steps)
    if first_timestep_repeats(kw, steps):
        scheduler.set_begin_index(0)
    timesteps = scheduler.timesteps[start:]
    noise = torch.from_numpy(initial_noise(SHAPE))
    if x0 is None:
        sample = noise * scheduler.init_noise_sigma
    else:  # img2img: noise the image to the first timestep
        scheduler.set_begin_index(start)
        sample = scheduler.add_noise(torch.from_numpy(x0), noise, timesteps[:1].repeat(SHAPE[0]))
    out = []
    for t in timesteps:
        model_input = scheduler.scale_model_input(sample, t).numpy()
        eps = torch.from_numpy(synthetic_model(model_input, float(t), kw["prediction_type"]).astype(np.float32))
        sample, pred = scheduler.step(eps, t, sample, return_dict=False)
        out.append((sample.numpy().copy(), pred.numpy().copy()))
    return out


def our_loop(kw, backend, steps=STEPS, start=0, x0=None):
    """The same loop with our scheduler on ``backend``; host copies of what each step returned."""
    scheduler = KDPM2DiscreteScheduler(**kw, backend=backend)
    scheduler.set_timesteps(steps)
    if first_timestep_repeats(kw, steps):
        scheduler.set_begin_index(0)
    b = scheduler.backend
    timesteps = scheduler.timesteps[start:]
    noise = b.asarray(initial_noise(SHAPE))
    if x0 is None:
        sample = noise * scheduler.init_noise_sigma
    else:
        scheduler.set_begin_index(start)
        first = b.xp.stack([timesteps[0]] * SHAPE[0])
        sample = scheduler.add_noise(b.asarray(x0), noise, first)
    out = []
    for t in timesteps:
        model_input = b.to_numpy(scheduler.scale_model_input(sample, t))
        eps = b.asarray(synthetic_model(model_input, float(t), kw["prediction_type"]).astype(np.float32))
        sample, pred = scheduler.step(eps, t, sample, return_dict=False)
        assert sample.dtype == eps.dtype and tuple(sample.shape) == SHAPE
        out.append((b.to_numpy(sample).copy(), b.to_numpy(pred).copy()))
    return out


def assert_trajectories_match(ours, ref):
    assert len(ours) == len(ref)
    worst = 0.0
    for k, ((prev, pred), (ref_prev, ref_pred)) in enumerate(zip(ours, ref)):
        errors = relative_error(prev, ref_prev), relative_error(pred, ref_pred)
        assert max(errors) <= RTOL, f"substep {k}: relative errors (prev, pred) = {errors}"
        worst = max(worst, *errors)
    return worst


_reference_cache: dict = {}


def cached_reference(kw, **loop_kw):
    key = (repr(sorted(kw.items())), repr(sorted(loop_kw.items(), key=lambda item: item[0])))
    if key not in _reference_cache:
        _reference_cache[key] = reference_loop(kw, **loop_kw)
    return _reference_cache[key]


# ---- txt2img ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", GRID, ids=_id)
def test_full_loop_matches_diffusers(kw, backend_name):
    ref = cached_reference(kw)
    assert len(ref) == 2 * STEPS - 1
    assert_trajectories_match(our_loop(kw, backend_name), ref)


def test_repeated_first_timestep(backend_name):
    """squaredcos_cap_v2 with Karras sigmas: the first three step timesteps all round to 999. A loop that
    never calls set_begin_index (as StableDiffusionPipeline) then starts, by the duplicate rule, at the
    second 999: diffusers (0.42) runs two substeps past its schedule and returns NaN; we agree on every substep
    both compute, then raise a ValueError naming step_index instead of returning NaN."""
    kw = _options("karras", "squaredcos_cap_v2", ("linspace", 0), "epsilon")
    assert first_timestep_repeats(kw, 50)
    ref, ours = diffusers_kdpm2(**kw), KDPM2DiscreteScheduler(**kw, backend=backend_name)
    b = ours.backend
    for scheduler in (ref, ours):
        scheduler.set_timesteps(50)
    x_ref = torch.from_numpy(initial_noise(SHAPE)) * ref.init_noise_sigma
    x_ours = b.asarray(initial_noise(SHAPE)) * ours.init_noise_sigma
    for k, (t_ref, t_ours) in enumerate(zip(ref.timesteps, ours.timesteps)):
        eps = synthetic_model(ref.scale_model_input(x_ref, t_ref).numpy(), float(t_ref)).astype(np.float32)
        x_ref = ref.step(torch.from_numpy(eps), t_ref, x_ref).prev_sample
        if k >= len(ours.timesteps) - 2:  # our schedule has ended: an error, not NaN
            with pytest.raises(ValueError, match="step_index"):
                ours.step(b.asarray(eps), t_ours, x_ours)
            continue
        eps = synthetic_model(b.to_numpy(ours.scale_model_input(x_ours, t_ours)), float(t_ours)).astype(np.float32)
        x_ours = ours.step(b.asarray(eps), t_ours, x_ours).prev_sample
        assert ours.step_index == ref.step_index == k + 3
        assert relative_error(b.to_numpy(x_ours), x_ref.numpy()) <= RTOL
    # (diffusers 0.42's final x_ref is all NaN; not asserted, so that a diffusers fix does not fail us)


def assert_add_noise_matches(got, expected, noise, ours: KDPM2DiscreteScheduler, ref, sigma_dtype=None) -> None:
    """diffusers' ``add_noise`` is ``x + noise * sigma``, the float32 sigma rounded to the samples' dtype
    (``sigma_dtype``, default float32): one multiply and one add, as ours, so the same sigma gives the same bits.
    The two schedules' sigmas may differ by the ulps test_schedule_parity bounds (torch's float32 pow against our
    correctly rounded square root); that moves each product by at most ``|noise|`` times the difference, and
    each side rounds product and sum to nearest (at most ``eps / 2`` of each value, eps of the result dtype)."""
    sigma_dtype = sigma_dtype or torch.float32
    ours_sigmas = torch.tensor(ours.backend.to_numpy(ours.sigmas)).to(sigma_dtype).double()
    ref_sigmas = ref.sigmas.to(sigma_dtype).double()
    gap = float((ours_sigmas - ref_sigmas).abs().max())
    got, expected, noise = (
        v if isinstance(v, torch.Tensor) else torch.tensor(np.asarray(v)) for v in (got, expected, noise)
    )
    if gap == 0:
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        return
    eps = torch.finfo(expected.dtype).eps
    noise, product_scale = noise.double().abs(), float(ref_sigmas.max())
    bound = noise * gap + eps * (noise * product_scale + expected.double().abs())
    assert_within(got.double().numpy(), expected.double().numpy(), bound.numpy(), "add_noise")


# ---- img2img: set_begin_index + add_noise ---------------------------------------------------------------------
@pytest.mark.parametrize("kw", [GRID[0], GRID[5]], ids=_id)
def test_img2img_start_matches_diffusers(kw, backend_name):
    x0 = initial_noise(SHAPE, seed=1) * 0.5
    start = 2 * int(STEPS * (1 - 0.6))  # strength 0.6, as StableDiffusionImg2ImgPipeline computes t_start * order
    ref = cached_reference(kw, start=start, x0=x0)
    assert len(ref) == 2 * STEPS - 1 - start
    assert_trajectories_match(our_loop(kw, backend_name, start=start, x0=x0), ref)


def test_add_noise_mid_loop_uses_the_current_substep(backend_name):
    """Inpainting pipelines call add_noise after a step, with the next timestep: sigma of step_index."""
    kw = _options("karras", "scaled_linear", ("leading", 1), "epsilon")
    ref, ours = diffusers_kdpm2(**kw), KDPM2DiscreteScheduler(**kw, backend=backend_name)
    b = ours.backend
    x = initial_noise(SHAPE)
    noise = initial_noise(SHAPE, seed=3)
    for scheduler in (ref, ours):
        scheduler.set_timesteps(10)
        scheduler.set_begin_index(4)
    t_ref, t_ours = ref.timesteps[4], ours.timesteps[4]
    ref.step(torch.from_numpy(noise), t_ref, torch.from_numpy(x))
    ours.step(b.asarray(noise), t_ours, b.asarray(x))
    assert ours.step_index == ref.step_index == 5
    expected = ref.add_noise(torch.from_numpy(x), torch.from_numpy(noise), ref.timesteps[5:6]).numpy()
    got = b.to_numpy(ours.add_noise(b.asarray(x), b.asarray(noise), ours.timesteps[5:6]))
    assert_add_noise_matches(got, expected, noise, ours, ref)


# ---- training: add_noise with a different timestep per sample -------------------------------------------------
@pytest.mark.parametrize("backend_kind", ["numpy", "torch"])
def test_add_noise_per_sample_timesteps(backend_kind):
    kw = _options(None, "scaled_linear", ("leading", 1), "epsilon")
    ref, ours = diffusers_kdpm2(**kw), KDPM2DiscreteScheduler(**kw, backend=backend_kind)
    b = ours.backend
    ref.set_timesteps(20)
    ours.set_timesteps(20)
    x, noise = initial_noise((5, 3, 4, 4)), initial_noise((5, 3, 4, 4), seed=4)
    picks = [0, 7, 8, 20, 38]
    # integer step timesteps (leading spacing) are the same numbers in both schedules
    integer_t = torch.tensor([901, 651, 601, 1, 401])
    expected = ref.add_noise(torch.from_numpy(x), torch.from_numpy(noise), integer_t).numpy()
    got = b.to_numpy(ours.add_noise(b.asarray(x), b.asarray(noise), b.asarray(integer_t.numpy())))
    assert_add_noise_matches(got, expected, noise, ours, ref)
    # each scheduler's own timesteps, fractional midpoints included
    expected = ref.add_noise(torch.from_numpy(x), torch.from_numpy(noise), ref.timesteps[picks]).numpy()
    got = b.to_numpy(ours.add_noise(b.asarray(x), b.asarray(noise), ours.timesteps[picks]))
    assert_add_noise_matches(got, expected, noise, ours, ref)


@pytest.mark.parametrize("dtypes", [("float16", "float16"), ("bfloat16", "bfloat16"), ("float32", "float16")])
def test_add_noise_in_low_precision_matches_diffusers(dtypes):
    """diffusers rounds the float32 sigma to the samples' dtype before multiplying, and a float32 sample with
    float16 noise gets a float32 product; one sigma for the whole batch or one each, the same rule."""
    kw = _options("karras", "scaled_linear", ("leading", 1), "epsilon")
    ref, ours = diffusers_kdpm2(**kw), KDPM2DiscreteScheduler(**kw, backend="torch")
    ref.set_timesteps(10)
    ours.set_timesteps(10)
    x = torch.from_numpy(initial_noise(SHAPE)).to(getattr(torch, dtypes[0]))
    noise = torch.from_numpy(initial_noise(SHAPE, seed=3)).to(getattr(torch, dtypes[1]))
    for picks in ([2, 2], [2, 4], [6, 6]):
        expected = ref.add_noise(x, noise, ref.timesteps[picks])
        got = ours.add_noise(x, noise, ours.timesteps[picks])
        assert got.dtype == expected.dtype == x.dtype
        assert_add_noise_matches(got, expected, noise, ours, ref, sigma_dtype=x.dtype)


# ---- the duplicate-timestep rule for the first step ------------------------------------------------------------
def test_duplicate_timesteps_first_step_rule(backend_name):
    """Karras sigmas with many steps round several timesteps to the same integer. Starting a loop at such a
    timestep (no set_begin_index), diffusers takes its second occurrence; so must we, and then agree."""
    kw = _options("karras", "linear", ("linspace", 0), "epsilon")
    ref_t = diffusers_kdpm2(**kw)
    ref_t.set_timesteps(100)
    values, counts = np.unique(ref_t.timesteps.numpy(), return_counts=True)
    duplicated = values[counts > 1]
    assert duplicated.size >= 2  # 0, 1 and 4 repeat for this config
    ours_probe = KDPM2DiscreteScheduler(**kw, backend=backend_name)
    ours_probe.set_timesteps(100)
    np.testing.assert_array_equal(
        np.unique(ours_probe.backend.to_numpy(ours_probe.timesteps)[0::2]), np.unique(ref_t.timesteps.numpy()[0::2])
    )
    for value in duplicated:
        index = ref_t.index_for_timestep(torch.tensor(value))
        assert ours_probe.index_for_timestep(float(value)) == index
        ref_loop, our_loop_ = [], []
        for scheduler, out, to_array, to_host in (
            (diffusers_kdpm2(**kw), ref_loop, torch.from_numpy, lambda a: a.numpy()),
            (KDPM2DiscreteScheduler(**kw, backend=backend_name), our_loop_, None, None),
        ):
            scheduler.set_timesteps(100)
            if to_array is None:
                to_array, to_host = scheduler.backend.asarray, scheduler.backend.to_numpy
            sample = to_array(initial_noise(SHAPE))
            t = scheduler.timesteps[index]  # the same number in both schedules (a step timestep)
            assert float(t) == float(value)
            for t in scheduler.timesteps[index:]:
                eps = synthetic_model(to_host(scheduler.scale_model_input(sample, t)), float(t)).astype(np.float32)
                sample, pred = scheduler.step(to_array(eps), t, sample, return_dict=False)
                out.append((to_host(sample).copy(), to_host(pred).copy()))
            assert scheduler.step_index == len(scheduler.timesteps)
        assert_trajectories_match(our_loop_, ref_loop)


# ---- torch specifics -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
def test_torch_half_precision_matches_diffusers(dtype_name):
    """In float16 / bfloat16 both schedulers keep the dtype; each substep rounds to it, so after the 19
    substeps of 10 steps they agree within 20 units of the dtype's epsilon (measured: about 2.5)."""
    if "torch" not in BACKENDS:
        pytest.skip("torch backend not installed")
    dtype = getattr(torch, dtype_name)
    eps = float(torch.finfo(dtype).eps)
    ref, ours = diffusers_kdpm2(), KDPM2DiscreteScheduler(backend="torch")
    ref.set_timesteps(10)
    ours.set_timesteps(10)
    noise = torch.from_numpy(initial_noise(SHAPE))
    x_ref, x_ours = (noise * ref.init_noise_sigma).to(dtype), (noise * ours.init_noise_sigma).to(dtype)
    for t_ref, t_ours in zip(ref.timesteps, ours.timesteps):
        out = []
        for scheduler, x, t in ((ref, x_ref, t_ref), (ours, x_ours, t_ours)):
            model_input = scheduler.scale_model_input(x, t)
            eps_out = torch.from_numpy(synthetic_model(model_input.float().numpy(), float(t))).to(dtype)
            out.append(scheduler.step(eps_out, t, x))
        x_ref, x_ours = out[0].prev_sample, out[1].prev_sample
        assert x_ours.dtype == x_ref.dtype == out[1].pred_original_sample.dtype == dtype
        assert relative_error(x_ours.float().numpy(), x_ref.float().numpy()) <= 20 * eps
        pred_ours, pred_ref = out[1].pred_original_sample.float().numpy(), out[0].pred_original_sample.float().numpy()
        assert relative_error(pred_ours, pred_ref) <= 20 * eps


def test_index_for_timestep_with_torch_tensors():
    """Pipelines pass torch tensors: 0-d or 1-element, float32 (ours), float64 or integer."""
    if "torch" not in BACKENDS:
        pytest.skip("torch backend not installed")
    kw = _options(None, "scaled_linear", ("leading", 1), "epsilon")
    ref, ours = diffusers_kdpm2(**kw), KDPM2DiscreteScheduler(**kw, backend="torch")
    ref.set_timesteps(10)
    ours.set_timesteps(10)
    for index in (0, 4, 17, 18):
        t = ours.timesteps[index]
        expected = ref.index_for_timestep(ref.timesteps[index])
        assert ours.index_for_timestep(t) == expected == index
        assert ours.index_for_timestep(t.reshape(1)) == index
        assert ours.index_for_timestep(t.double()) == index
        assert ours.index_for_timestep(float(t)) == index
    assert ours.index_for_timestep(torch.tensor(901)) == ref.index_for_timestep(torch.tensor(901)) == 0
    assert ours.index_for_timestep(torch.tensor(1, dtype=torch.int32)) == ref.index_for_timestep(torch.tensor(1)) == 18
    assert ours.index_for_timestep(ours.timesteps[4], schedule_timesteps=ours.timesteps[2:]) == 2
    with pytest.raises(ValueError, match="single"):
        ours.index_for_timestep(ours.timesteps[:2])


@pytest.mark.parametrize(
    "schedule", [{"num_inference_steps": 10}, {"num_inference_steps": 1}, {"sigmas": [200.0, 150.0, 100.0, 1.0, 0.0]}]
)
def test_first_step_look_up(schedule, monkeypatch):
    """The first step recognises the schedule's first timestep with one comparison and starts where the
    general rule starts; every other value and form of timestep takes the general rule. The custom sigmas here
    clamp the first five timesteps to 999, where the rule (the second of duplicates) lands on a midpoint
    substep and the loop starts at its Euler half. Without custom sigmas, diffusers starts at each position
    as we do."""
    if "torch" not in BACKENDS:
        pytest.skip("torch backend not installed")
    ours = KDPM2DiscreteScheduler(backend="torch")
    ours.set_timesteps(**schedule)
    values = list(dict.fromkeys(ours._host_timesteps.tolist()))
    duplicated = len(values) < len(ours._host_timesteps)
    assert duplicated == ("sigmas" in schedule)
    starts = {}
    for value in values:
        index = ours.index_for_timestep(value)
        while ours._rows[index][0] and ours._host_timesteps[index - 1] == value:
            index -= 1
        starts[value] = index
        t = torch.tensor(value, dtype=torch.float32)
        for form in [t, t.double(), value, t.reshape(1), np.float32(value)] + (
            [int(value)] if value.is_integer() else []
        ):
            ours._step_index = None
            ours._init_step_index(form)
            assert ours.step_index == index, (value, form)
    assert starts[values[0]] == 0
    # the first timestep never reaches the general rule (no host conversion, no search)
    monkeypatch.setattr(ours, "index_for_timestep", None)
    for form in (ours.timesteps[0], values[0]):
        ours._step_index = None
        ours._init_step_index(form)
        assert ours.step_index == 0
    monkeypatch.undo()
    # what float() refuses goes to the general rule, with its result or its error
    ours._step_index = None
    ours._init_step_index(torch.tensor(complex(values[0], 0.0)))
    assert ours.step_index == 0
    ours._step_index = None
    with pytest.raises(NotImplementedError, match="meta"):
        ours._init_step_index(torch.empty((), device="meta"))
    if not duplicated:
        ref = diffusers_kdpm2()
        ref.set_timesteps(**schedule)
        for position, t in enumerate(ours.timesteps):
            ours._step_index = ref._step_index = None
            ours._init_step_index(t)
            ref._init_step_index(ref.timesteps[position])
            assert ours.step_index == ref.step_index == position
    ours._step_index = None
    with pytest.raises(ValueError, match="not in the schedule"):
        ours._init_step_index(torch.tensor(values[0] + 0.5))


# ---- prediction_type="sample" (diffusers raises NotImplementedError for it) ------------------------------------
@pytest.mark.parametrize("kw", [GRID[0], GRID[5], GRID[11]], ids=_id)
def test_sample_prediction_equals_epsilon_prediction_of_the_same_denoiser(kw, backend_name):
    """A model predicting x0 = x - sigma * eps(x) must give the trajectory of the epsilon model eps: the
    "sample" coefficients are checked against the epsilon ones, which match diffusers above. The sigma the
    model sees is read back from scale_model_input (1 / sqrt(sigma**2 + 1))."""
    loops = []
    for prediction in ("epsilon", "sample"):
        scheduler = KDPM2DiscreteScheduler(**{**kw, "prediction_type": prediction}, backend=backend_name)
        scheduler.set_timesteps(20)
        b = scheduler.backend
        sample = b.asarray(initial_noise(SHAPE)) * scheduler.init_noise_sigma
        out = []
        for t in scheduler.timesteps:
            scale = float(b.to_numpy(scheduler.scale_model_input(b.asarray(np.ones((), np.float32)), t)))
            sigma = np.sqrt(1.0 / np.float64(scale) ** 2 - 1.0)
            x = b.to_numpy(sample).astype(np.float64)
            eps = synthetic_model(x * scale, float(t))
            output = eps if prediction == "epsilon" else x - sigma * eps
            sample, pred = scheduler.step(b.asarray(output.astype(np.float32)), t, sample, return_dict=False)
            out.append((b.to_numpy(sample), b.to_numpy(pred)))
        loops.append(out)
    for (prev, pred), (prev_s, pred_s) in zip(*loops):
        assert relative_error(prev_s, prev) <= 1e-5 and relative_error(pred_s, pred) <= 1e-5


# ---- custom sigmas= (k-diffusion style) --------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["exponential", "beta"])
def test_custom_sigmas_reproduce_diffusers_sigma_family(family, backend_name):
    """diffusers' exponential / beta sigmas (not rounded to integer timesteps, unlike Karras'), passed to us
    as custom ``sigmas=`` with a final 0, give diffusers' schedule and trajectory."""
    kw = _options(family, "scaled_linear", ("linspace", 0), "epsilon")
    ref = diffusers_kdpm2(**kw)
    ref.set_timesteps(20)
    step_sigmas = np.append(ref.sigmas.numpy()[0:-2:2], 0.0)  # [s0, s1, ..., s19, 0]
    ours = KDPM2DiscreteScheduler(beta_schedule="scaled_linear", backend=backend_name)
    ours.set_timesteps(sigmas=step_sigmas)
    b = ours.backend
    assert ours.num_inference_steps == 20 and len(ours.timesteps) == len(ref.timesteps) == 39
    sigmas, timesteps, expected_t = b.to_numpy(ours.sigmas), b.to_numpy(ours.timesteps), ref.timesteps.numpy()
    np.testing.assert_array_equal(sigmas, ref.sigmas.numpy())  # the float32 values we were given
    # step timesteps: the same float64 map through the training log-sigma table, of diffusers' float64 sigma on
    # its side and of that sigma rounded to float32 (U more in log sigma) on ours; midpoints: see float32_bounds
    our_log, ref_log = ours._training_table().log_sigmas, ref.log_sigmas.numpy()
    steps = sigma_to_t_bound(timesteps[0::2], U, our_log, ref_log, float32_map=False)
    assert_within(timesteps[0::2], expected_t[0::2], steps, "step timesteps")
    midpoints = midpoint_timestep_bound(timesteps[1::2], sigmas[0:-2:2], ref.sigmas.numpy()[0:-2:2], our_log, ref_log)
    assert_within(timesteps[1::2], expected_t[1::2], midpoints, "midpoint timesteps")
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-7)
    x_ref = torch.from_numpy(initial_noise(SHAPE)) * ref.init_noise_sigma
    x_ours = b.asarray(initial_noise(SHAPE)) * ours.init_noise_sigma
    for t_ref, t_ours in zip(ref.timesteps, ours.timesteps):
        eps = synthetic_model(ref.scale_model_input(x_ref, t_ref).numpy(), float(t_ref)).astype(np.float32)
        x_ref, pred_ref = ref.step(torch.from_numpy(eps), t_ref, x_ref, return_dict=False)
        eps = synthetic_model(b.to_numpy(ours.scale_model_input(x_ours, t_ours)), float(t_ours)).astype(np.float32)
        x_ours, pred_ours = ours.step(b.asarray(eps), t_ours, x_ours, return_dict=False)
        assert relative_error(b.to_numpy(x_ours), x_ref.numpy()) <= RTOL
        assert relative_error(b.to_numpy(pred_ours), pred_ref.numpy()) <= RTOL
