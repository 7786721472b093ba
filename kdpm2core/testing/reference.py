"""An independent float64 reference of the sampler, and a data distribution with an exact solution.

Written from the paper, not from diffusers or :mod:`kdpm2core.schedule`: Algorithm 2 of Karras et al. (2022,
"Elucidating the Design Space of Diffusion-Based Generative Models") with churn 0, where the second-order
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


def sample_dpm2(denoiser: Callable[[np.ndarray, float], np.ndarray], x, sigmas) -> np.ndarray:
    """Integrate the probability-flow ODE from ``sigmas[0]`` to ``sigmas[-1]`` with DPM-Solver-2 steps.

    Args:
        denoiser: ``D(x, sigma)``, the estimate of the clean sample.
        x: the sample at ``sigmas[0]`` (any shape; float64 is used throughout).
        sigmas: decreasing noise levels, one step per consecutive pair; the last may be 0.

    Returns:
        The sample at ``sigmas[-1]``.
    """
    x = np.array(x, dtype=np.float64)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        d = (x - denoiser(x, sigma)) / sigma  # dx/dsigma at the start of the step
        if sigma_next == 0:
            x = x + (sigma_next - sigma) * d  # Euler: the midpoint of (sigma, 0) would be 0
            continue
        sigma_mid = math.sqrt(sigma * sigma_next)
        x_mid = x + (sigma_mid - sigma) * d
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
