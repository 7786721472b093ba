"""Bounds on how far diffusers' float32 schedule arithmetic can land from ours, derived operation by operation.

The tests compare our schedule (float64, rounded once to float32) with diffusers' (float32 torch and NumPy
kernels). Float32 library kernels differ in their last bits between CPUs and SIMD paths (torch picks one per
CPU, ``ATEN_CPU_CAPABILITY`` overrides it), so every bound here adds up the documented worst case of each
operation instead of what one machine produced:

- ``+ - * /`` and ``sqrt`` are correctly rounded (IEEE 754) on every path: within ``U = 2**-24`` relative, half
  an ulp.
- torch's float32 ``log``, ``exp`` and ``pow`` are within 1 ulp: its vectorised CPU paths call SLEEF's ``_u10``
  functions (documented maximum error 1.0 ulp), its scalar path (``ATEN_CPU_CAPABILITY=default``) the C
  library's (glibc: below 1 ulp).
- NumPy's float32 ``log`` runs NumPy's own SIMD code, whose accuracy tests allow it 4 ulp.
- An ulp is at most ``2 * U`` of the value it belongs to, so ``k`` ulps are at most ``2 * k * U`` relative.
- Two float32 numbers are a whole number of grid steps apart (the grid step at the smaller magnitude divides
  both), so a real-valued bound ``D`` on their distance tightens to ``floor(D / step)`` steps.
"""

from __future__ import annotations

import numpy as np

U = 2.0**-24  # float32 unit roundoff
TORCH_KERNEL_ULPS = 1.0  # torch's float32 log, exp, pow
NUMPY_LOG_ULPS = 4.0  # NumPy's float32 log


def ulp32(x) -> np.ndarray:
    """The spacing of float32 numbers at ``|x|`` (float64)."""
    return np.spacing(np.abs(np.asarray(x, dtype=np.float32))).astype(np.float64)


def whole_steps(bound, a, b, *, nearest: bool = False) -> np.ndarray:
    """A bound on ``|a - b|`` for float32 arrays a, b, in whole grid steps.

    ``bound`` bounds ``|a - b|`` itself: rounded down to whole steps. With ``nearest``, ``bound`` bounds the
    distance of the two exact values that a and b are the nearest float32 numbers to: rounding to nearest is
    monotone, so a and b are at most ``ceil(bound / step)`` steps apart (0 for equal exact values)."""
    step = ulp32(np.minimum(np.abs(np.asarray(a, dtype=np.float64)), np.abs(np.asarray(b, dtype=np.float64))))
    steps = np.asarray(bound, dtype=np.float64) / step
    return (np.ceil(steps) if nearest else np.floor(steps * (1 + 1e-9))) * step


def geometric_mean_error(sigma_a, sigma_b) -> np.ndarray:
    """Relative error of diffusers' float32 ``exp(lerp(log a, log b, 0.5))`` against the exact geometric mean
    of its float32 inputs a, b > 0: the two torch logs (1 ulp each, so 1 ulp of the larger |log| in their mean),
    torch's lerp ``b - (b - a) * 0.5`` (two roundings, at most 1 ulp of the larger |log|), both of which become
    relative errors through exp, and exp's own ulp."""
    a, b = np.asarray(sigma_a, dtype=np.float64), np.asarray(sigma_b, dtype=np.float64)
    larger_log = np.maximum(np.abs(np.log(a)), np.abs(np.log(b)))
    return (TORCH_KERNEL_ULPS + 1.0) * ulp32(larger_log) + TORCH_KERNEL_ULPS * 2 * U


def sigma_to_t_bound(t, log_sigma_error, our_log_sigmas, ref_log_sigmas, float32_map: bool) -> np.ndarray:
    """Bound on ``|t_ours - t_ref|`` for the piecewise linear map from log sigma to the training timestep.

    ``t = lo + (log_low - log_sigma) / (log_low - log_high)``: an error ``e`` in ``log_sigma`` moves t by
    ``e / width``, and errors ``e_lo``, ``e_hi`` of the two table entries by ``((1 - w) e_lo + w e_hi) / width``.
    The two sides may bracket t between neighbouring intervals, so the narrowest of the three intervals around
    t is the width used, and the largest table difference among their entries. ``float32_map``: diffusers
    evaluates the map in float32 (its log-sigma table is a torch tensor): ``w`` takes up to three roundings
    (``3 U``) and ``(1 - w) * lo + w * hi`` four more (at most 2 ulps of t); our float64 map rounds once to
    float32 (half an ulp, counted in either case).
    """
    t = np.asarray(t, dtype=np.float64)
    ours, ref = np.asarray(our_log_sigmas, dtype=np.float64), np.asarray(ref_log_sigmas, dtype=np.float64)
    rounding = 0.5 * ulp32(t) + (3 * U + 2 * ulp32(np.maximum(t, 1.0)) if float32_map else 0.0)
    if len(ours) < 2:  # one training timestep: every sigma maps to t = 0 on both sides
        return rounding
    lo = np.clip(np.floor(t).astype(int), 0, len(ours) - 2)
    intervals = np.clip(lo[..., None] + np.arange(-1, 2), 0, len(ours) - 2)  # the interval of t and its neighbours
    width = np.minimum(np.abs(ours[intervals] - ours[intervals + 1]), np.abs(ref[intervals] - ref[intervals + 1])).min(
        -1
    )
    table = np.maximum(np.abs(ours - ref)[intervals], np.abs(ours - ref)[intervals + 1]).max(-1)
    with np.errstate(divide="ignore"):  # equal neighbours (a repeated alphas_cumprod): no bound
        return (np.asarray(log_sigma_error) + table) / width + rounding


def midpoint_timestep_bound(t, our_steps, ref_steps, our_log_sigmas, ref_log_sigmas) -> np.ndarray:
    """Bound on ``|t_ours - t_ref|`` for the midpoint timesteps ``t`` (ours) between consecutive step sigmas.

    diffusers takes the float32 geometric mean of its step sigmas (:func:`geometric_mean_error`), NumPy's float32
    log of that, and maps it to t in float32; we take the float64 geometric mean of our step sigmas and map it in
    float64. So the log-sigma error is the geometric mean's, NumPy's log, and half the relative differences of
    the two step sigmas; :func:`sigma_to_t_bound` turns it into timesteps."""
    ours, ref = np.asarray(our_steps, dtype=np.float64), np.asarray(ref_steps, dtype=np.float64)
    relative = np.abs(ours - ref) / ref
    log_error = (
        geometric_mean_error(ref[:-1], ref[1:])
        + NUMPY_LOG_ULPS * ulp32(np.log(np.sqrt(ref[:-1] * ref[1:])))
        + (relative[:-1] + relative[1:]) / 2
    )
    return sigma_to_t_bound(t, log_error, our_log_sigmas, ref_log_sigmas, float32_map=True)


def assert_within(got, expected, tolerance, context: str = "") -> None:
    """``|got - expected| <= tolerance`` elementwise, reporting the worst entries."""
    got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    excess = np.abs(got - expected) - np.broadcast_to(tolerance, got.shape) * (1 + 1e-9)
    bad = np.flatnonzero(~(excess <= 0))
    assert bad.size == 0, (
        f"{context}: {bad.size} of {got.size} outside the bound; first at {bad[:5].tolist()}: "
        f"got {got.flat[bad[:5]].tolist()}, expected {expected.flat[bad[:5]].tolist()}, "
        f"bound {np.broadcast_to(tolerance, got.shape).flat[bad[:5]].tolist()}"
    )
