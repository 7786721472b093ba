"""Schedules equal diffusers' ``KDPM2DiscreteScheduler``: timesteps, sigmas, init_noise_sigma, betas, alphas_cumprod.

Tolerances, and why (each comes from a named float32 effect on diffusers' side):

- ``betas`` and ``alphas_cumprod`` are bit-identical (same float32 arithmetic).
- ``sigmas`` are within 1 float32 ulp. Our training sigmas use a correctly rounded square root; diffusers takes
  ``** 0.5`` of a float32 torch tensor, which on the CPU is off by one ulp for about 0.5% of the entries
  (``test_training_sigmas_differ_only_where_torch_sqrt_is_not_correctly_rounded`` proves this). Every
  sampling sigma is either one of those values interpolated (np.interp, float64) or built from them by a
  sigma family, then rounded to float32, so the one-ulp difference can survive, never grow.
- ``timesteps`` at step positions (even indices) are bit-identical (spaced timesteps, and Karras' rounded
  ones), except with exponential and beta sigmas: there both map a float64 sigma to a timestep in float64,
  through the log of the training sigmas, and where a training sigma differs by the torch-sqrt ulp the
  timestep differs by a fraction of an ulp of the timestep; rounded to float32, within the midpoint bound.
- ``timesteps`` at midpoint positions (odd indices) are within ``2 * ulp32(num_train_timesteps)``
  (1.22e-4 for 1000). Three float32 effects on diffusers' side, of similar size, add up: its geometric-mean
  sigma is computed in float32 (log, lerp, exp: a few ulps of sigma); its sigma-to-t interpolation
  ``(1 - w) * low + w * high`` runs on float32 torch tensors at magnitudes up to ``num_train_timesteps``;
  and its log-sigma table carries the torch-sqrt ulp above. We evaluate the same map in float64 on a
  float64 geometric mean and round once. Both results are float32 numbers of that magnitude, so they differ
  by whole ulps; the maximum over every n swept is exactly 2. (Feeding diffusers' float32 geometric means
  to our float64 map only lowers the worst case to about 1.5 ulps: the float32 interpolation matters as
  much.) ``test_midpoint_timesteps_are_diffusers_map_evaluated_exactly`` proves that the map itself is the
  same: diffusers' own ``_sigma_to_t``, fed our float64 inputs, returns our timesteps bit for bit, and fed
  its own float32 inputs returns its timesteps bit for bit.
- ``init_noise_sigma`` is ``max(sigmas)`` (exact) or ``sqrt(max**2 + 1)`` ("leading"), which diffusers
  evaluates with three float32 roundings: relative error below ``2 * eps32``.

diffusers' ``set_timesteps`` is slow for many steps (a Python loop of ``_sigma_to_t`` calls), so the dense
sweeps use :func:`fast_reference`, which replaces that loop by one vectorised call of the same diffusers
function; ``test_fast_reference_is_diffusers`` checks that this changes nothing.
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
from conftest import diffusers_kdpm2, scheduler_options

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' numpy 2 interop noise

pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")
from diffusers import KDPM2DiscreteScheduler as Reference  # noqa: E402

from kdpm2core import KDPM2DiscreteScheduler  # noqa: E402
from kdpm2core.schedule import sigma_to_t  # noqa: E402

EPS32 = float(np.finfo(np.float32).eps)
# a trained-betas table that is none of the built-in schedules: geometric from 1e-4 to 2e-2, slightly wavy
TRAINED_BETAS = (np.geomspace(1e-4, 2e-2, 1000) * (1 + 0.1 * np.sin(np.arange(1000) / 37.0))).tolist()
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "trained_betas")
FAMILIES = (None, "karras", "exponential", "beta")
SPACINGS = (("linspace", 0), ("leading", 0), ("leading", 1), ("trailing", 0), ("trailing", 1))
SPREAD = (1, 2, 3, 7, 13, 31, 97)  # 1, 2, 3 are edge cases of spacing and interpolation; the rest are primes
# n for which diffusers' trailing spacing (a float-step np.arange) gives n + 1 steps, the last at t = -1
TRAILING_EXTRA = [n for n in range(1, 1001) if len(np.arange(1000, 0, -1000 / n)) != n]


def options(beta="linear", family=None, spacing="linspace", offset=0, **extra) -> dict:
    """Constructor keywords for one combination (``beta="trained_betas"`` passes :data:`TRAINED_BETAS`)."""
    return scheduler_options(beta, family, spacing, offset, trained_betas=TRAINED_BETAS, **extra)


reference = diffusers_kdpm2  # diffusers' scheduler without the constructor's 1000-step schedule


def fast_reference(ref: Reference, n: int) -> torch.Tensor:
    """``ref.set_timesteps(n)`` and its timesteps, with diffusers' per-element ``_sigma_to_t`` loop over the
    interpolated sigmas replaced by one vectorised call of the same function (no sigma family only)."""
    with mock.patch.object(ref, "_sigma_to_t", lambda sigma, log_sigmas: np.nan):
        ref.set_timesteps(n)
    timesteps = ref.timesteps.clone()
    assert torch.isnan(timesteps[1::2]).all() and not torch.isnan(timesteps[0::2]).any()
    midpoints = len(timesteps) // 2  # n - 1, or n where diffusers' trailing spacing adds a step
    interpolated = Reference._sigma_to_t(ref, ref.sigmas_interpol[1::2][:midpoints], ref.log_sigmas)
    timesteps[1::2] = torch.as_tensor(np.asarray(interpolated), dtype=timesteps.dtype)
    return timesteps


def ulp32(x) -> np.ndarray:
    return np.spacing(np.abs(np.asarray(x, dtype=np.float32)))


def assert_schedule_matches(ours: KDPM2DiscreteScheduler, ref: Reference, ref_timesteps=None, context=""):
    """The tolerances of the module docstring, for one installed schedule."""
    expected_t = (ref.timesteps if ref_timesteps is None else ref_timesteps).numpy()
    expected_s = ref.sigmas.numpy()
    got_t, got_s = np.asarray(ours.timesteps), np.asarray(ours.sigmas)
    n = ours.num_inference_steps
    assert got_t.dtype == got_s.dtype == np.float32
    assert got_t.shape == (2 * n - 1,) and got_s.shape == (2 * n + 2,), context
    if len(expected_t) == 2 * n + 1 and ours.config.timestep_spacing == "trailing":
        # diffusers' extra trailing step (see test_trailing_spacing_takes_exactly_n_steps): compare the n we share
        expected_t, expected_s, got_s = expected_t[: 2 * n - 1], expected_s[: 2 * n - 1], got_s[: 2 * n - 1]
    assert got_t.shape == expected_t.shape, f"{context}: {got_t.shape} timesteps, diffusers has {expected_t.shape}"
    atol = 2 * ulp32(ours.config.num_train_timesteps)
    if ours.config.use_exponential_sigmas or ours.config.use_beta_sigmas:  # mapped through log_sigmas, see above
        np.testing.assert_allclose(got_t[0::2], expected_t[0::2], rtol=0, atol=atol, err_msg=f"{context}: step timesteps")
    else:
        np.testing.assert_array_equal(got_t[0::2], expected_t[0::2].astype(np.float32), err_msg=f"{context}: step timesteps")
    np.testing.assert_allclose(got_t[1::2], expected_t[1::2], rtol=0, atol=atol, err_msg=f"{context}: midpoint timesteps")

    assert got_s.shape == expected_s.shape, context
    np.testing.assert_array_less(np.abs(got_s - expected_s), ulp32(expected_s) * 1.000001, err_msg=f"{context}: sigmas")
    np.testing.assert_allclose(ours.init_noise_sigma, float(ref.init_noise_sigma), rtol=2 * EPS32, err_msg=context)


# ---- training table ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta", BETA_SCHEDULES)
def test_betas_and_alphas_cumprod_are_bit_identical(beta):
    kw = options(beta)
    ours, ref = KDPM2DiscreteScheduler(**kw), reference(**kw)
    np.testing.assert_array_equal(np.asarray(ours.betas), ref.betas.numpy())
    np.testing.assert_array_equal(np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy())
    assert np.asarray(ours.betas).dtype == np.float32 and len(ours) == len(ref)


@pytest.mark.parametrize("beta", BETA_SCHEDULES[:3])
def test_training_sigmas_differ_only_where_torch_sqrt_is_not_correctly_rounded(beta):
    ours = KDPM2DiscreteScheduler(**options(beta))
    acp = reference(**options(beta)).alphas_cumprod
    ratio = ((1 - acp) / acp).numpy()
    ours_sigmas = ours._training_table().sigmas
    # ours is the correctly rounded square root (float64 sqrt of a float32 is exact enough to round once)
    np.testing.assert_array_equal(ours_sigmas, np.sqrt(ratio.astype(np.float64)).astype(np.float32))
    # diffusers' value is torch's float32 sqrt, and differs from ours by at most one ulp, rarely
    torch_sigmas = (torch.from_numpy(ratio) ** 0.5).numpy()
    ref = Reference(**options(beta))  # its log_sigmas are the logs of its training sigmas
    np.testing.assert_array_equal(ref.log_sigmas.numpy(), np.log(torch_sigmas))
    differ = ours_sigmas != torch_sigmas
    assert differ.mean() < 0.02
    np.testing.assert_array_less(np.abs(ours_sigmas - torch_sigmas), ulp32(ours_sigmas) * 1.000001)


# ---- the cause of the timestep differences -------------------------------------------------------------------
@pytest.mark.parametrize("n", (2, 13, 500, 999))
def test_midpoint_timesteps_are_diffusers_map_evaluated_exactly(n):
    ours = KDPM2DiscreteScheduler()
    ours.set_timesteps(n)
    ref = Reference()
    ref.set_timesteps(n)
    log_sigmas = ours._training_table().log_sigmas  # float32, as diffusers' (up to the sqrt rounding above)
    midpoints = ours._host.sigma_in[1::2]  # float64 geometric means
    got = np.asarray(ours.timesteps)[1::2]
    # 1. diffusers' own sigma->t function on float64 inputs returns exactly our midpoint timesteps
    exact = Reference._sigma_to_t(ref, midpoints, log_sigmas)
    np.testing.assert_array_equal(got, exact.astype(np.float32))
    np.testing.assert_allclose(sigma_to_t(midpoints, log_sigmas), exact, rtol=0, atol=1e-12)
    # 2. the same function on diffusers' float32 torch inputs returns exactly diffusers' midpoint timesteps
    fp32 = Reference._sigma_to_t(ref, ref.sigmas_interpol[1::2][: n - 1], ref.log_sigmas)
    np.testing.assert_array_equal(ref.timesteps.numpy()[1::2], np.asarray(fp32))
    # 3. so the remaining difference is diffusers' float32 evaluation: whole ulps, at most two
    np.testing.assert_allclose(got, ref.timesteps.numpy()[1::2], rtol=0, atol=2 * ulp32(1000))


def test_fast_reference_is_diffusers():
    ref, slow = Reference(), Reference()
    for n in (1, 2, 7, 100, 1000):
        slow.set_timesteps(n)
        torch.testing.assert_close(fast_reference(ref, n), slow.timesteps, rtol=0, atol=0)
        torch.testing.assert_close(ref.sigmas, slow.sigmas, rtol=0, atol=0)


# ---- dense sweeps ----------------------------------------------------------------------------------------------
def sweep(kw: dict, dense: int, every: int):
    """Every n in 1..1000: the count, step timesteps and sigmas; midpoint timesteps too for n <= ``dense``,
    every ``every``-th n above, and 999, 1000 (diffusers' midpoint timesteps cost O(n * 1000) each)."""
    ours, ref = KDPM2DiscreteScheduler(**kw), reference(**kw)
    for n in range(1, 1001):
        ours.set_timesteps(n)
        if n <= dense or n % every == 0 or n >= 999:
            assert_schedule_matches(ours, ref, fast_reference(ref, n), context=f"{kw} n={n}")
            continue
        with mock.patch.object(ref, "_sigma_to_t", lambda sigma, log_sigmas: np.nan):
            ref.set_timesteps(n)
        got_t, expected_t = np.asarray(ours.timesteps), ref.timesteps.numpy()
        got_s, expected_s = np.asarray(ours.sigmas), ref.sigmas.numpy()
        if n in TRAILING_EXTRA and kw.get("timestep_spacing") == "trailing":
            expected_t, expected_s, got_s = expected_t[: 2 * n - 1], expected_s[: 2 * n - 1], got_s[: 2 * n - 1]
        # plain comparisons here: np.testing's helpers would triple this loop's time
        assert got_t.shape == expected_t.shape == (2 * n - 1,), f"{kw} n={n}"
        assert np.array_equal(got_t[0::2], expected_t[0::2]), f"{kw} n={n}: step timesteps"
        assert np.all(np.abs(got_s - expected_s) <= ulp32(expected_s)), f"{kw} n={n}: sigmas"


def test_every_step_count_default_config():
    sweep({}, dense=100, every=7)


@pytest.mark.parametrize("spacing, offset", (("leading", 1), ("trailing", 0)))  # the offset acts on leading only
def test_every_step_count_other_spacings(spacing, offset):
    sweep(options(spacing=spacing, offset=offset), dense=30, every=97)


@pytest.mark.parametrize("beta", BETA_SCHEDULES)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("spacing, offset", SPACINGS)
def test_every_combination_spread_of_step_counts(beta, family, spacing, offset):
    kw = options(beta, family, spacing, offset)
    ours, ref = KDPM2DiscreteScheduler(**kw), reference(**kw)
    for n in SPREAD:
        ours.set_timesteps(n)
        ref.set_timesteps(n)
        assert_schedule_matches(ours, ref, context=f"{kw} n={n}")


@pytest.mark.parametrize("beta", BETA_SCHEDULES)
def test_largest_step_counts_each_beta_schedule(beta):
    kw = options(beta)
    ours, ref = KDPM2DiscreteScheduler(**kw), reference(**kw)
    for n in (999, 1000):
        ours.set_timesteps(n)
        assert_schedule_matches(ours, ref, fast_reference(ref, n), context=f"{beta} n={n}")


@pytest.mark.parametrize("family", FAMILIES[1:])
def test_largest_step_count_each_sigma_family(family):
    kw = options("scaled_linear", family)
    ours, ref = KDPM2DiscreteScheduler(**kw), reference(**kw)
    ours.set_timesteps(1000)
    ref.set_timesteps(1000)
    assert_schedule_matches(ours, ref, context=f"{family} n=1000")


@pytest.mark.parametrize("beta", BETA_SCHEDULES[:3])
@pytest.mark.parametrize("family", FAMILIES)
def test_ten_train_timesteps_every_step_count(beta, family):
    for spacing, offset in SPACINGS:
        kw = options(beta, family, spacing, offset, num_train_timesteps=10)
        ours, ref = KDPM2DiscreteScheduler(**kw), reference(**kw)
        for n in range(1, 11):
            ours.set_timesteps(n)
            ref.set_timesteps(n)
            assert_schedule_matches(ours, ref, context=f"{kw} n={n}")


@pytest.mark.parametrize("prediction_type", ("epsilon", "v_prediction", "sample"))
def test_prediction_type_does_not_change_the_schedule(prediction_type):
    kw = options("scaled_linear", "karras", "leading", 1, prediction_type=prediction_type)
    ours, ref = KDPM2DiscreteScheduler(**kw), reference(**kw)
    for n in (4, 25):
        ours.set_timesteps(n)
        ref.set_timesteps(n)
        assert_schedule_matches(ours, ref, context=f"{prediction_type} n={n}")


def test_num_train_timesteps_argument_of_set_timesteps():
    ours, ref = KDPM2DiscreteScheduler(), reference()
    ours.set_timesteps(10, num_train_timesteps=500)
    ref.set_timesteps(10, num_train_timesteps=500)
    assert_schedule_matches(ours, ref, context="num_train_timesteps=500")


# ---- trailing spacing: diffusers' float-step arange can give one step more --------------------------------------
def test_trailing_spacing_takes_exactly_n_steps():
    """For 62 values of n (61, 103, ...) ``np.arange(1000, 0, -1000 / n)`` has n + 1 entries, so diffusers
    samples n + 1 steps, the last one at timestep -1 (outside the model's range, sigma_min again). We take the
    n steps that were asked for: the first n of diffusers' (same timesteps and sigmas), then down to 0."""
    assert len(TRAILING_EXTRA) == 62 and TRAILING_EXTRA[:3] == [61, 103, 121]
    ours, ref = KDPM2DiscreteScheduler(timestep_spacing="trailing"), reference(timestep_spacing="trailing")
    for n in TRAILING_EXTRA[:6] + TRAILING_EXTRA[-2:]:
        ours.set_timesteps(n)
        timesteps = fast_reference(ref, n)
        if len(timesteps) == 2 * (n + 1) - 1:  # diffusers 0.42 (not asserted: a fix there must not fail us)
            assert float(timesteps[-1]) == -1.0
        assert len(ours.timesteps) == 2 * n - 1 and float(ours.timesteps[-1]) >= 0
        assert float(ours.sigmas[2 * n - 1]) == 0.0  # the n-th step ends at sigma 0
        assert_schedule_matches(ours, ref, timesteps, context=f"trailing n={n}")


# ---- degenerate training tables ---------------------------------------------------------------------------------
@pytest.mark.parametrize("num_train_timesteps", (1, 2))
def test_one_or_two_train_timesteps(num_train_timesteps):
    """With one training timestep there is nothing to interpolate (diffusers divides 0 by 0 and warns, then
    discards the value); we return t = 0 without a RuntimeWarning (pytest turns ours into errors)."""
    for family in FAMILIES:
        for spacing, offset in SPACINGS:
            kw = options("linear", family, spacing, offset, num_train_timesteps=num_train_timesteps)
            ours, ref = KDPM2DiscreteScheduler(**kw), reference(**kw)
            for n in range(1, num_train_timesteps + 1):
                ours.set_timesteps(n)
                with np.errstate(all="ignore"):
                    ref.set_timesteps(n)
                assert_schedule_matches(ours, ref, context=f"{kw} n={n}")


def test_repeated_alphas_cumprod_give_finite_timesteps():
    """Betas so small that float32 ``1 - beta`` is 1 repeat an alphas_cumprod entry: equal log-sigmas, whose
    interpolation weight would be 0 / 0. Timesteps stay finite, sigmas equal diffusers', and every midpoint
    timestep is one whose training sigma is the midpoint sigma. (Which t of the flat stretch 499..519 a sigma
    inside it maps to is arbitrary: diffusers takes the last, we the first or last depending on rounding.)"""
    betas = np.full(1000, 0.01)
    betas[500:520] = 1e-9
    ours, ref = KDPM2DiscreteScheduler(trained_betas=betas), reference(trained_betas=betas)
    assert np.sum(np.diff(np.asarray(ours.alphas_cumprod)) == 0) == 20
    log_sigmas = ours._training_table().log_sigmas.astype(np.float64)
    for n in (10, 333, 999):
        ours.set_timesteps(n)
        timesteps = fast_reference(ref, n).numpy()
        got = np.asarray(ours.timesteps)
        assert np.all(np.isfinite(got)) and got.shape == timesteps.shape
        np.testing.assert_array_equal(got[0::2], timesteps[0::2])
        np.testing.assert_array_less(np.abs(np.asarray(ours.sigmas) - ref.sigmas.numpy()), ulp32(ref.sigmas.numpy()) * 1.000001)
        sigma_at_t = np.exp(np.interp(got[1::2].astype(np.float64), np.arange(1000), log_sigmas))  # the inverse map
        np.testing.assert_allclose(sigma_at_t, ours._host.sigma_in[1::2], rtol=1e-5)
