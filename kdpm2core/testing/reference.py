"""An independent float64 reference of the sampler, and a data distribution with an exact solution.

Written from the paper, not from diffusers or :mod:`kdpm2core.schedule`: Algorithm 2 of Karras et al. (2022,
"Elucidating the Design Space of Diffusion-Based Generative Models"), where the second-order
correction evaluates the derivative at the geometric mean of the two sigmas (the DPM-Solver-2 midpoint,
Lu et al. 2022) and the step into sigma = 0 is a plain Euler step. The ODE is the probability flow
``dx/dsigma = (x - D(x, sigma)) / sigma`` for a denoiser ``D``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

__all__ = ["sample_dpm2", "substep_sigmas", "Gaussian"]


def substep_sigmas(sigmas) -> list[float]:
    """The sigma at which the denoiser is evaluated, in call order, when sampling along ``sigmas``."""
    out = []
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        out.append(float(s))
        if s_next > 0:
            out.append(math.sqrt(float(s) * float(s_next)))
    return out


def sample_dpm2(
    denoiser: Callable[[np.ndarray, float], np.ndarray],
    x,
    sigmas,
    *,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    draw: Callable[[], np.ndarray] | None = None,
) -> np.ndarray:
    """Integrate the probability-flow ODE from ``sigmas[0]`` to ``sigmas[-1]`` with DPM-Solver-2 steps, with
    Algorithm 2's churn: before a step whose sigma lies in ``[s_tmin, s_tmax]``, noise raises it by the factor
    ``1 + gamma``, ``gamma = min(s_churn / steps, sqrt(2) - 1)``.

    Args:
        denoiser: ``D(x, sigma)``, the estimate of the clean sample.
        x: the sample at ``sigmas[0]`` (any shape; float64 is used throughout).
        sigmas: decreasing noise levels, one step per consecutive pair; the last may be 0.
        s_churn, s_tmin, s_tmax, s_noise: the churn (0: none), as k-diffusion's ``sample_dpm_2`` takes it.
        draw: ``draw()`` returns the next standard normal sample (x's shape); called once per denoiser call,
            in call order, whether or not that call adds noise (the churn noise of a step is the draw of its
            first call), so a sampler that draws once per substep can be given the same numbers.

    Returns:
        The sample at ``sigmas[-1]``.
    """
    if s_churn > 0 and draw is None:
        raise ValueError("s_churn > 0 adds noise: pass draw")
    x = np.array(x, dtype=np.float64)
    steps = len(sigmas) - 1
    for i in range(steps):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        gamma = min(s_churn / steps, math.sqrt(2.0) - 1.0) if s_tmin <= sigma <= s_tmax else 0.0
        eps = None if draw is None else np.asarray(draw(), dtype=np.float64)
        if gamma > 0:
            sigma_hat = sigma * (1.0 + gamma)
            x = x + eps * (s_noise * math.sqrt(sigma_hat**2 - sigma**2))  # now at noise level sigma_hat
            sigma = sigma_hat
        d = (x - denoiser(x, sigma)) / sigma  # dx/dsigma at the start of the step
        if sigma_next == 0:
            x = x + (sigma_next - sigma) * d  # Euler: the midpoint of (sigma, 0) would be 0
            continue
        sigma_mid = math.sqrt(sigma * sigma_next)
        x_mid = x + (sigma_mid - sigma) * d
        if draw is not None:
            draw()  # the midpoint call adds no noise, but a sampler drawing per substep draws here too
        d_mid = (x_mid - denoiser(x_mid, sigma_mid)) / sigma_mid
        x = x + (sigma_next - sigma) * d_mid  # the whole step with the midpoint derivative
    return x


class Gaussian:
    """Data ``x0 ~ N(mu, s0^2 I)``: the optimal denoiser and the probability-flow solution are closed-form.

    With ``x = x0 + sigma * n``, ``E[x0 | x] = (s0^2 x + sigma^2 mu) / (s0^2 + sigma^2)``, and the ODE keeps
    ``(x - mu) / sqrt(s0^2 + sigma^2)`` constant along a trajectory.
    """

    def __init__(self, mu: float, s0: float):
        self.mu, self.s0 = float(mu), float(s0)

    def denoiser(self, x, sigma: float):
        """``D(x, sigma)``; works on any array type with arithmetic operators."""
        v0, v = self.s0**2, float(sigma) ** 2
        return x * (v0 / (v0 + v)) + self.mu * (v / (v0 + v))

    def solution(self, x_start, sigma_start: float, sigma: float) -> np.ndarray:
        """The exact ODE solution at ``sigma`` through ``x_start`` at ``sigma_start`` (float64)."""
        ratio = math.sqrt(self.s0**2 + sigma**2) / math.sqrt(self.s0**2 + sigma_start**2)
        return self.mu + (np.asarray(x_start, dtype=np.float64) - self.mu) * ratio
