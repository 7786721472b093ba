"""DPM2 a: the ancestral table, and ``KDPM2AncestralDiscreteScheduler`` against diffusers' class of that name.

diffusers (0.42.1) draws the noise of a step in its second (midpoint) substep with ``randn_tensor(shape,
dtype, device, generator)`` and adds ``sigma_up * noise`` after the midpoint update; given the same
``torch.Generator`` we must produce the same numbers, within 1e-4 relative (the issue's bound), on the option grid
of tests/test_trajectory_parity.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_trajectory_parity import GRID, SHAPE, _id

from kdpm2core import KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler
from kdpm2core.config import validate_config
from kdpm2core.schedule import ancestral_step, build_schedule, substep_table

from conftest import diffusers_kdpm2, initial_noise, relative_error, synthetic_model

RTOL = 1e-4
STEPS = 20
EPS32 = float(np.finfo(np.float32).eps)


# ---- the table ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_eta_zero_is_the_deterministic_table(prediction_type):
    options = validate_config({"prediction_type": prediction_type, "use_karras_sigmas": True})
    plain, zero = build_schedule(options, 12), build_schedule(options, 12, eta=0.0)
    for got, expected in zip(zero, plain):
        np.testing.assert_array_equal(got, expected)
    assert not np.any(plain.table[:, 6])  # the deterministic sampler adds no noise


def test_ancestral_step_splits_sigma_next():
    """``sigma_down**2 + sigma_up**2 == sigma_next**2``, ``sigma_down = sigma_next**2 / sigma`` at eta = 1 (no
    cancellation: float64 within a few ulps even at sigma / sigma_next = 1e4), and eta > 1 clamps to k-diffusion's
    ``sigma_up = sigma_next``, ``sigma_down = 0``."""
    sigma = np.array([2.0e4, 14.6, 3.0, 1.0])
    nxt = np.array([12.8, 7.0, 0.5, 0.0])
    down, up = ancestral_step(sigma, nxt, 1.0)
    np.testing.assert_allclose(down, nxt**2 / sigma, rtol=4e-16, atol=0)
    np.testing.assert_allclose(down**2 + up**2, nxt**2, rtol=4e-16, atol=0)
    down, up = ancestral_step(sigma, nxt, 0.5)
    np.testing.assert_allclose(down**2 + up**2, nxt**2, rtol=4e-16, atol=0)
    down, up = ancestral_step(sigma, nxt, 3.0)
    np.testing.assert_array_equal(down, 0.0)
    np.testing.assert_array_equal(up, nxt)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ancestral_rows(prediction_type):
    """Each step is an Euler substep to ``mid = sqrt(sigma * sigma_down)`` and a midpoint substep to ``sigma_down``
    with the derivative at ``mid``, then ``+ sigma_up * noise``; the last step (to 0) is one Euler substep without
    noise. Checked on a linear model output, against the update rule written out."""
    options = validate_config({"prediction_type": prediction_type})
    schedule = build_schedule(options, 6, eta=1.0)
    table = schedule.table
    step_sigmas = schedule.sigma_in[table[:, 5] == 1]
    sigma_next = np.append(step_sigmas[1:], 0.0)
    down, up = ancestral_step(step_sigmas, sigma_next, 1.0)
    assert table.shape == (2 * 6 - 1, 7)
    rng = np.random.default_rng(0)
    x0, out, noise = rng.standard_normal((3, 5))

    def denoised(x, s):  # x0 of each prediction type's model output ``out``
        if prediction_type == "epsilon":
            return x - s * out
        if prediction_type == "v_prediction":
            return x / (s**2 + 1) - s * out / np.sqrt(s**2 + 1)
        return out

    x = x0
    for i, (s, d, u) in enumerate(zip(step_sigmas, down, up)):
        euler = table[2 * i]
        if d == 0:  # the last step
            assert i == len(step_sigmas) - 1 and euler[6] == 0
            expected = x + (d - s) * (x - denoised(x, s)) / s
            np.testing.assert_allclose(euler[1] * x + euler[2] * out, expected, rtol=1e-12, atol=1e-12)
            break
        mid = np.sqrt(s * d)
        midpoint = table[2 * i + 1]
        assert euler[6] == 0 and euler[5] == 1 and midpoint[5] == 0
        assert midpoint[6] == pytest.approx(u, rel=1e-15)
        x_mid = x + (mid - s) * (x - denoised(x, s)) / s
        np.testing.assert_allclose(euler[1] * x + euler[2] * out, x_mid, rtol=1e-12, atol=1e-12)
        expected = x + (d - s) * (x_mid - denoised(x_mid, mid)) / mid + u * noise
        got = midpoint[0] * x + midpoint[1] * x_mid + midpoint[2] * out + midpoint[6] * noise
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
        x = expected


# ---- diffusers parity --------------------------------------------------------------------------------------------
torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")


def _diffusers_layout(per_step: np.ndarray) -> torch.Tensor:
    """Per-step values (one per step, then one pad) in diffusers' substep layout ``[v0, v1, v1, ..., vN, vN]``."""
    t = torch.from_numpy(per_step.astype(np.float32))
    return torch.cat([t[:1], t[1:].repeat_interleave(2), t[-1:]])


def diffusers_schedule_is_accurate(ours) -> bool:
    """Whether diffusers' float32 ``sigma_down = sqrt(sigma_next**2 - sigma_up**2)`` keeps 1e-5 relative accuracy.

    The difference of squares loses ``eps32 * sigma_next**2 / sigma_down**2`` relative accuracy: at eta = 1
    that is ``eps32 * (sigma / sigma_next)**2``, 0.15 on a first step from sigma 2e4 to 12.8 (squaredcos_cap_v2
    with linspace or trailing spacing). Ours is computed without the cancellation (``ancestral_step``)."""
    steps = ours.schedule.sigma_in[ours.schedule.table[:, 5] == 1]
    ratio = steps[:-1] / steps[1:]
    return float(EPS32 * np.max(ratio**2)) < 1e-5


def use_accurate_sigmas(reference, ours) -> None:
    """Give diffusers' scheduler our (correctly computed) sigma_down, sigma_up and midpoint sigmas, rounded to
    float32, and the midpoint timesteps that follow from them; its step arithmetic and noise draws are its own."""
    schedule = ours.schedule
    steps = schedule.sigma_in[schedule.table[:, 5] == 1]
    down, up = ancestral_step(steps, np.append(steps[1:], 0.0), 1.0)
    interpol = np.where(down > 0, np.sqrt(steps) * np.sqrt(down), 0.0)
    reference.sigmas_down = _diffusers_layout(np.append(down, 0.0))
    reference.sigmas_up = _diffusers_layout(np.append(up, 0.0))
    reference.sigmas_interpol = _diffusers_layout(np.append(interpol, 0.0))
    reference.timesteps = torch.from_numpy(ours.backend.to_numpy(ours.timesteps)).to(reference.timesteps.dtype)


def run(scheduler, prediction_type, generator, dtype=torch.float32):
    """A pipeline's loop on torch; host copies of each step's (prev_sample, pred_original_sample)."""
    timesteps = np.asarray(scheduler.timesteps)
    if scheduler.begin_index is None and np.sum(timesteps == timesteps[0]) > 1:  # as test_trajectory_parity does
        scheduler.set_begin_index(0)
    x = (torch.from_numpy(initial_noise(SHAPE)) * scheduler.init_noise_sigma).to(dtype)
    out = []
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t).double().numpy()
        output = torch.from_numpy(synthetic_model(model_input, float(t), prediction_type)).to(dtype)
        x, pred = scheduler.step(output, t, x, generator=generator, return_dict=False)
        out.append((x.double().numpy().copy(), pred.double().numpy().copy()))
    return out


def pair(kw, steps=STEPS):
    reference = diffusers_kdpm2(ancestral=True, **kw)
    ours = KDPM2AncestralDiscreteScheduler(**kw, backend="torch")
    reference.set_timesteps(steps)
    ours.set_timesteps(steps)
    if not diffusers_schedule_is_accurate(ours):
        use_accurate_sigmas(reference, ours)
    return reference, ours


def worst_error(ours, ref) -> float:
    assert len(ours) == len(ref)
    return max(max(relative_error(a, b), relative_error(c, d)) for (a, c), (b, d) in zip(ours, ref))


@pytest.mark.parametrize("kw", GRID, ids=_id)
def test_loop_matches_diffusers(kw):
    reference, ours = pair(kw)
    prediction = kw["prediction_type"]
    ref = run(reference, prediction, torch.Generator().manual_seed(7))
    got = run(ours, prediction, torch.Generator().manual_seed(7))
    assert len(got) == 2 * STEPS - 1
    assert worst_error(got, ref) <= RTOL


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=["float64", "float16"])
def test_loop_matches_diffusers_in_other_dtypes(dtype):
    """diffusers draws the noise in the model output's dtype (float64 is another stream than float32's); so do
    we. float64 keeps the 1e-4 bound; in float16 both sides round every value to 11 bits (u = 4.9e-4), over
    13 substeps of values up to 15: 0.05 relative, the bound derived as 13 substeps x 8 roundings x u."""
    kw = GRID[0]
    reference, ours = pair(kw, steps=7)
    ref = run(reference, kw["prediction_type"], torch.Generator().manual_seed(7), dtype=dtype)
    got = run(ours, kw["prediction_type"], torch.Generator().manual_seed(7), dtype=dtype)
    bound = RTOL if dtype == torch.float64 else 13 * 8 * 2.0**-11
    assert worst_error(got, ref) <= bound


def test_parity_depends_on_the_noise_order_and_placement():
    """The comparison above would catch noise drawn in another order or substep: a generator one draw ahead
    (as if the Euler substep had drawn too), or another seed, moves the trajectory far beyond the bound."""
    kw = GRID[0]
    reference, ours = pair(kw)
    ref = run(reference, kw["prediction_type"], torch.Generator().manual_seed(7))
    ahead = torch.Generator().manual_seed(7)
    torch.randn(SHAPE, generator=ahead)
    assert worst_error(run(ours, kw["prediction_type"], ahead), ref) > 100 * RTOL
    ours.set_timesteps(STEPS)
    assert worst_error(run(ours, kw["prediction_type"], torch.Generator().manual_seed(8)), ref) > 100 * RTOL


def test_generator_list_draws_per_item():
    """A list of generators, one per batch item, as diffusers' randn_tensor takes it."""
    kw = GRID[1]
    reference, ours = pair(kw)
    seeds = [torch.Generator().manual_seed(s) for s in (3, 4)]
    ref = run(reference, kw["prediction_type"], seeds)
    seeds = [torch.Generator().manual_seed(s) for s in (3, 4)]
    assert worst_error(run(ours, kw["prediction_type"], seeds), ref) <= RTOL
    with pytest.raises(ValueError, match="generator"):
        ours.set_timesteps(STEPS)
        run(ours, kw["prediction_type"], [torch.Generator()])


def test_schedule_matches_diffusers():
    """timesteps, sigmas and init_noise_sigma equal diffusers' to float32 rounding where diffusers' sigma_down
    is accurate (see diffusers_schedule_is_accurate), for every sigma family."""
    for kw in GRID:
        reference, ours = diffusers_kdpm2(ancestral=True, **kw), KDPM2AncestralDiscreteScheduler(**kw, backend="torch")
        reference.set_timesteps(STEPS)
        ours.set_timesteps(STEPS)
        if not diffusers_schedule_is_accurate(ours):
            continue
        np.testing.assert_allclose(ours.sigmas.numpy(), reference.sigmas.numpy(), rtol=4 * EPS32, atol=0)
        # timesteps are sigma_to_t of float32 sigmas: within a few float32 ulps of t (up to 999)
        np.testing.assert_allclose(ours.timesteps.numpy(), reference.timesteps.numpy(), rtol=0, atol=2e-3)
        assert float(ours.init_noise_sigma) == pytest.approx(float(reference.init_noise_sigma), rel=4 * EPS32)


# ---- the stateful class ------------------------------------------------------------------------------------------
def test_class_interface(tmp_path):
    scheduler = KDPM2AncestralDiscreteScheduler(use_karras_sigmas=True, backend="numpy", noise_seed=5)
    assert repr(scheduler) == "KDPM2AncestralDiscreteScheduler(use_karras_sigmas=True, backend='numpy')"
    path = scheduler.save_config(tmp_path)
    assert '"_class_name": "KDPM2AncestralDiscreteScheduler"' in path.read_text()
    loaded = KDPM2AncestralDiscreteScheduler.from_pretrained(tmp_path)
    assert loaded.config["use_karras_sigmas"] is True
    plain = KDPM2DiscreteScheduler.from_config(scheduler.config)
    assert type(plain) is KDPM2DiscreteScheduler and plain.config["_class_name"] == "KDPM2DiscreteScheduler"
    assert "generator" not in __import__("inspect").signature(plain.step).parameters
    with pytest.raises(ValueError, match="noise_seed"):
        KDPM2AncestralDiscreteScheduler(noise_seed=-1)
    with pytest.raises(TypeError, match="noise_seed"):
        KDPM2AncestralDiscreteScheduler(noise_seed=1.5)
    state = scheduler.state_dict()
    state["noise_seed"] = "7"
    with pytest.raises(TypeError, match="noise_seed"):
        scheduler.load_state_dict(state)
    # a deterministic scheduler refuses an ancestral state, by its keys and by its format
    state["noise_seed"] = 5
    with pytest.raises(ValueError, match="noise_seed"):
        KDPM2DiscreteScheduler().load_state_dict(state)
    del state["noise_seed"]
    with pytest.raises(ValueError, match="KDPM2AncestralDiscreteScheduler.state/1"):
        KDPM2DiscreteScheduler().load_state_dict(state)


def test_seeded_noise_is_a_function_of_seed_and_substep():
    """Without a generator, the noise of substep k depends on (noise_seed, k) only: two schedulers with one seed
    agree bit for bit, another seed differs, and state_dict carries the seed."""

    def final(seed):
        scheduler = KDPM2AncestralDiscreteScheduler(backend="numpy", noise_seed=seed)
        scheduler.set_timesteps(6)
        x = initial_noise((1, 4, 4, 4)) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x = scheduler.step(synthetic_model(scheduler.scale_model_input(x, t), float(t)), t, x).prev_sample
        return x, scheduler.state_dict()

    (a, state), (b, _), (c, _) = final(11), final(11), final(12)
    np.testing.assert_array_equal(a, b)
    assert relative_error(a, c) > 1e-2
    assert state["noise_seed"] == 11 and state["format"] == "kdpm2.KDPM2AncestralDiscreteScheduler.state/1"


# ---- checkpoints -------------------------------------------------------------------------------------------------
def _ancestral_run(scheduler, x, start, generator=None, stop=None):
    """Substeps ``start`` to ``stop`` of a loop; the model is a smooth function evaluated on the host."""
    b = scheduler.backend
    timesteps = b.to_numpy(scheduler.timesteps)
    for k in range(start, len(timesteps) if stop is None else stop):
        t = scheduler.timesteps[k]
        output = b.asarray(synthetic_model(b.to_numpy(scheduler.scale_model_input(x, t)), float(timesteps[k])))
        output = b.xp.astype(output, x.dtype)
        x = scheduler.step(output, t, x, generator=generator, return_dict=False)[0]
    return x


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
def test_checkpoint_resumes_bit_for_bit_at_every_substep(backend, tmp_path):
    """Saved before any substep, after an Euler substep (mid-step) or after a midpoint substep, reloaded from disk
    (load_checkpoint picks the ancestral class from the saved state), and finished: the same bits as an
    uninterrupted run; the noise comes from noise_seed and the substep, so the checkpoint holds all of it."""
    if backend == "jax":
        pytest.importorskip("jax")
    from kdpm2core.checkpoint import load_checkpoint, save_checkpoint

    def fresh():
        scheduler = KDPM2AncestralDiscreteScheduler(backend=backend, use_karras_sigmas=True, noise_seed=21)
        scheduler.set_timesteps(4)
        x = scheduler.backend.asarray(initial_noise((1, 4, 4, 4)).astype(np.float32)) * scheduler.init_noise_sigma
        return scheduler, x

    scheduler, x0 = fresh()
    b = scheduler.backend
    whole = b.to_numpy(_ancestral_run(scheduler, x0, 0))
    for k in range(len(scheduler.timesteps)):
        scheduler, x = fresh()
        x = _ancestral_run(scheduler, x, 0, stop=k)
        save_checkpoint(tmp_path / str(k), scheduler, x=x)
        resumed, arrays = load_checkpoint(tmp_path / str(k))
        assert type(resumed) is KDPM2AncestralDiscreteScheduler and resumed.noise_seed == 21
        np.testing.assert_array_equal(b.to_numpy(_ancestral_run(resumed, arrays["x"], k)), whole)


def test_checkpoint_with_a_caller_generator(tmp_path):
    """With the caller's torch.Generator, its get_state() saved beside the checkpoint resumes the same noise."""
    from kdpm2core.checkpoint import load_checkpoint, save_checkpoint

    def fresh():
        scheduler = KDPM2AncestralDiscreteScheduler(backend="torch")
        scheduler.set_timesteps(4)
        return scheduler, torch.from_numpy(initial_noise((1, 4, 4, 4)).astype(np.float32)) * 14.6

    scheduler, x = fresh()
    whole = _ancestral_run(scheduler, x, 0, generator=torch.Generator().manual_seed(4))
    scheduler, x = fresh()
    generator = torch.Generator().manual_seed(4)
    x = _ancestral_run(scheduler, x, 0, generator=generator, stop=3)  # after an Euler substep
    save_checkpoint(tmp_path, scheduler, x=x, generator_state=generator.get_state())
    resumed, arrays = load_checkpoint(tmp_path)
    generator = torch.Generator()
    generator.set_state(arrays["generator_state"])
    assert torch.equal(_ancestral_run(resumed, arrays["x"], 3, generator=generator), whole)


# ---- convergence of the exact moments ------------------------------------------------------------------------------
def test_gaussian_variance_converges_at_order_two():
    """From the data's noised marginal ``N(mu, s0^2 + sigma0^2)``, DPM2 a's exact final distribution (closed form
    from the table, kdpm2core.testing.test_ancestral.exact_moments) tends to the data's noised marginal at the
    last sigma: the mean is exact (``mu`` is a fixed point of every substep) and the variance error shrinks as
    h^2 (observed order in [1.85, 2.2] from 16 to 128 geometric steps, 10 to 0.02). The conformance suite checks
    the backends' samples against the same closed form."""
    from kdpm2core.testing.test_ancestral import GAUSSIAN, exact_moments

    errors = []
    for steps in (16, 32, 64, 128):
        sigmas = np.geomspace(10.0, 0.02, steps + 1)
        sigma_in, _, table, _ = substep_table(sigmas[:-1], sigmas[1:], "sample", eta=1.0)
        assert np.all(table[1::2, 6] > 0)  # every midpoint substep adds noise
        mean, var = exact_moments(table, sigma_in, (GAUSSIAN.mu, GAUSSIAN.s0**2 + sigmas[0] ** 2))[-1]
        assert mean == pytest.approx(GAUSSIAN.mu, abs=1e-14)
        errors.append(abs(var - (GAUSSIAN.s0**2 + sigmas[-1] ** 2)))
    orders = [math.log2(e1 / e2) for e1, e2 in zip(errors, errors[1:])]
    assert all(1.85 <= p <= 2.2 for p in orders), (orders, errors)
