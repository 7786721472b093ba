"""Toy data distributions whose denoiser is exact, to watch the sampler work and measure its error.

For data ``x0`` from a mixture of isotropic Gaussians ``sum_k w_k N(mu_k, s_k^2 I)``, the noisy data
``x = x0 + sigma * n`` is again such a mixture with variances ``v_k = s_k^2 + sigma^2``, and the ideal
denoiser ``D(x, sigma) = E[x0 | x]`` is the posterior-weighted mean of the per-component denoisers
``(s_k^2 x + sigma^2 mu_k) / v_k``. A model built on ``D`` is exact, so whatever error remains after sampling
is the sampler's. For a single Gaussian the probability-flow ODE is solved in closed form too:

    x(sigma) = mu + (x(sigma_max) - mu) * sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_max^2)

which :meth:`GaussianMixture.exact_flow` evaluates, so the sampler's discretisation error can be printed.

The same toys serve flow-matching (rectified-flow) samplers: noised as ``x_s = (1 - s) * x0 + s * n``, the
data is a mixture with means ``(1 - s) mu_k`` and variances ``v_k = (1 - s)^2 s_k^2 + s^2``, the denoiser is
the posterior mean of ``mu_k + (1 - s) s_k^2 / v_k * (x - (1 - s) mu_k)``, and the model predicts the velocity
``(x - D(x, s)) / s``. For one Gaussian the flow ODE ``dx/ds = v`` is solved in closed form too:

    x(s) = (1 - s) mu + (x(s_max) - (1 - s_max) mu) * r(s) / r(s_max),   r(s) = sqrt(s_k^2 (1 - s)^2 + s^2)
Everything here is written against the Array API through a backend object, so it runs on every backend.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["GaussianMixture", "TOYS", "model_sigmas", "sample", "run"]


@dataclass(frozen=True)
class GaussianMixture:
    """A mixture of isotropic Gaussians in ``d`` dimensions, with its exact denoiser.

    Args:
        means: Component means, shape ``(K, d)``.
        stds: Component standard deviations, shape ``(K,)``.
        weights: Mixture weights, shape ``(K,)``, summing to 1.
    """

    means: np.ndarray
    stds: np.ndarray
    weights: np.ndarray

    @property
    def dim(self) -> int:
        """Dimension ``d`` of a data point."""
        return self.means.shape[1]

    def _host_terms(self, sigma: float, alpha: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """Per component of ``alpha * x0 + sigma * n``: ``1 / v_k`` and ``log w_k - d/2 log v_k`` (float64)."""
        variances = alpha**2 * self.stds**2 + sigma**2
        return 1.0 / variances, np.log(self.weights) - 0.5 * self.dim * np.log(variances)

    def denoise(self, x, sigma: float, backend, alpha: float = 1.0):
        """The exact denoiser ``E[x0 | x]`` of ``x = alpha * x0 + sigma * n``, for ``x`` of shape ``(..., d)``.

        With ``alpha = 1`` it is written as Tweedie's formula, ``D = x - sigma^2 * sum_k r_k (x - mu_k) / v_k``
        with the posterior responsibilities ``r_k`` (a softmax over components), which needs no per-component
        copies of ``x``; otherwise (a flow sample, ``alpha = 1 - s``, which is 0 at ``s = 1``) as the mean of
        the per-component posteriors ``mu_k + alpha s_k^2 / v_k (x - alpha mu_k)``, without dividing by alpha.
        """
        xp = backend.xp
        device = backend.device_of(x)
        inverse_var, log_prior = self._host_terms(float(sigma), alpha)
        means = backend.asarray(self.means * alpha, dtype=x.dtype, device=device)
        inverse_var = backend.asarray(inverse_var, dtype=x.dtype, device=device)
        log_prior = backend.asarray(log_prior, dtype=x.dtype, device=device)
        offsets = x[..., None, :] - means  # (..., K, d)
        logits = log_prior - 0.5 * xp.sum(offsets * offsets, axis=-1) * inverse_var
        weights = xp.exp(logits - xp.max(logits, axis=-1, keepdims=True))
        weights = weights / xp.sum(weights, axis=-1, keepdims=True)
        if alpha != 1.0:
            gain = weights * (inverse_var * backend.asarray(alpha * self.stds**2, dtype=x.dtype, device=device))
            clean = backend.asarray(self.means, dtype=x.dtype, device=device)
            return xp.sum(weights[..., None] * clean, axis=-2) + xp.sum(gain[..., None] * offsets, axis=-2)
        score = xp.sum((weights * inverse_var)[..., None] * offsets, axis=-2)
        return x - (float(sigma) ** 2) * score

    def model_output(self, model_input, sigma: float, prediction_type: str, backend):
        """What a perfectly trained diffusers model returns at noise level ``sigma``.

        ``model_input`` is the scheduler's ``scale_model_input`` output, ``x / sqrt(sigma^2 + 1)``; the output
        is the noise (``epsilon``), the clean sample (``sample``) or ``v`` (``v_prediction``), whichever the
        scheduler's ``prediction_type`` expects. For ``flow_prediction`` ``sigma`` is ``s``, the input is the
        flow sample ``(1 - s) x0 + s n`` itself, and the output is the velocity ``(x - D) / s``.
        """
        sigma = float(sigma)  # a Python float: strict Array API libraries refuse NumPy scalars
        if prediction_type == "flow_prediction":
            return (model_input - self.denoise(model_input, sigma, backend, alpha=1.0 - sigma)) * (1.0 / sigma)
        root = math.sqrt(sigma * sigma + 1.0)
        x = model_input * root
        denoised = self.denoise(x, sigma, backend)
        if prediction_type == "epsilon":
            return (x - denoised) * (1.0 / sigma)
        if prediction_type == "sample":
            return denoised
        if prediction_type == "v_prediction":
            return (x * (1.0 / root**2) - denoised) * (root / sigma)
        raise ValueError(
            f"prediction_type must be one of epsilon, v_prediction, sample, flow_prediction; got {prediction_type!r}"
        )

    def log_density(self, points: np.ndarray, sigma: float = 0.0) -> np.ndarray:
        """Log-density of the data noised to ``sigma`` at host ``points`` of shape ``(..., d)`` (for plots)."""
        inverse_var, log_prior = self._host_terms(sigma)
        offsets = np.asarray(points, dtype=np.float64)[..., None, :] - self.means
        logits = log_prior - 0.5 * np.sum(offsets**2, axis=-1) * inverse_var - 0.5 * self.dim * math.log(2 * math.pi)
        top = logits.max(axis=-1, keepdims=True)
        return (top + np.log(np.exp(logits - top).sum(axis=-1, keepdims=True)))[..., 0]

    def nearest_mode(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For host ``points`` ``(n, d)``: the index of the nearest mode (in that mode's standard deviations)
        and the distance to it in those units."""
        offsets = np.asarray(points, dtype=np.float64)[:, None, :] - self.means
        scaled = np.sqrt(np.sum(offsets**2, axis=-1)) / self.stds
        index = np.argmin(scaled, axis=1)
        return index, scaled[np.arange(len(index)), index]

    def exact_flow(self, x_start: np.ndarray, sigma_start: float, sigma_end: float, *, flow: bool = False):
        """The exact probability-flow ODE solution from ``x_start`` at ``sigma_start`` to ``sigma_end``; with
        ``flow`` of the rectified flow, from ``s = sigma_start`` to ``s = sigma_end`` (see the module docstring).

        Only a single Gaussian has this closed form; for a mixture this raises ValueError.
        """
        if len(self.stds) != 1:
            raise ValueError("exact_flow needs a single Gaussian; this mixture has several components")
        s2, mean = float(self.stds[0]) ** 2, self.means[0]
        x_start = np.asarray(x_start, dtype=np.float64)
        if flow:
            ratio = math.sqrt(s2 * (1 - sigma_end) ** 2 + sigma_end**2) / math.sqrt(
                s2 * (1 - sigma_start) ** 2 + sigma_start**2
            )
            return (1 - sigma_end) * mean + (x_start - (1 - sigma_start) * mean) * ratio
        ratio = math.sqrt(s2 + sigma_end**2) / math.sqrt(s2 + sigma_start**2)
        return mean + (x_start - mean) * ratio


def _ring(modes: int = 8, radius: float = 3.0, std: float = 0.2) -> GaussianMixture:
    angles = 2 * math.pi * np.arange(modes) / modes
    means = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return GaussianMixture(means, np.full(modes, std), np.full(modes, 1.0 / modes))


#: The built-in toys: a 2-D ring of 8 Gaussians, and one 2-D Gaussian whose flow is known exactly.
TOYS = {
    "mixture": _ring(),
    "gaussian": GaussianMixture(np.array([[1.0, -0.5]]), np.array([0.5]), np.array([1.0])),
}


def model_sigmas(scheduler) -> np.ndarray:
    """The noise level the model sees at each substep of ``scheduler``'s current schedule (host float64).

    An Euler substep starts at its step's sigma; a midpoint substep evaluates the model at the geometric mean of
    the step's sigma and where it ends (``sigma_next``, or DPM2 a's ``sigma_down``). This is what
    ``scale_model_input`` divides by, ``sqrt(sigma^2 + 1)``: the schedule's ``sigma_in``.
    """
    return np.array(scheduler.schedule.sigma_in, dtype=np.float64)


def sample(toy: GaussianMixture, scheduler, noise, callback: Callable[[int], None] | None = None):
    """Run ``scheduler``'s whole schedule on ``toy``'s exact model, the way a diffusers pipeline does.

    Args:
        toy: The data distribution.
        scheduler: A :class:`~kdpm2core.KDPM2DiscreteScheduler` after ``set_timesteps``.
        noise: Standard normal array of the scheduler's backend, shape ``(n, toy.dim)``.
        callback: Called with the substep index after each substep (a progress bar).

    Returns:
        The samples, an array of the scheduler's backend.
    """
    backend = scheduler.backend
    sigmas = model_sigmas(scheduler)
    prediction_type = scheduler.config.prediction_type
    x = noise * scheduler.init_noise_sigma
    for k in range(scheduler.timesteps.shape[0]):  # by index: the Array API does not promise iteration
        t = scheduler.timesteps[k]
        model_input = scheduler.scale_model_input(x, t)
        output = toy.model_output(model_input, float(sigmas[k]), prediction_type, backend)
        x = scheduler.step(output, t, x, return_dict=False)[0]
        if callback is not None:
            callback(k)
    return x


def run(
    toy_name: str,
    scheduler,
    *,
    num_samples: int = 2000,
    seed: int = 0,
    dtype: str = "float32",
    device=None,
    callback: Callable[[int], None] | None = None,
) -> dict:
    """Sample ``num_samples`` points of a built-in toy and measure how close they are to the truth.

    The starting noise is drawn on the host with NumPy from ``seed``, so every backend starts from the same
    points and their results can be compared number for number.

    Returns:
        A dict with ``samples`` (host float64 array), ``wall_time_s`` and the toy's accuracy figures:
        for the mixture ``within_3_std`` (fraction of points within 3 standard deviations of a mode; 0.989
        for exact samples), ``mean_distance_to_mode``, ``modes_hit``; for the Gaussian ``max_error`` and
        ``mean_error`` against the exact probability-flow solution from the same noise.
    """
    if toy_name not in TOYS:
        raise ValueError(f"toy must be one of {', '.join(TOYS)}; got {toy_name!r}")
    toy = TOYS[toy_name]
    backend = scheduler.backend
    host_noise = np.random.default_rng(seed).standard_normal((num_samples, toy.dim))
    noise = backend.asarray(host_noise, dtype=backend.dtype(dtype), device=backend.device(device))
    backend.synchronize(noise)
    start = time.perf_counter()
    result = sample(toy, scheduler, noise, callback)
    backend.synchronize(result)
    wall = time.perf_counter() - start
    samples = np.asarray(backend.to_numpy(result), dtype=np.float64)
    out = {"toy": toy_name, "samples": samples, "wall_time_s": wall, "model_calls": scheduler.timesteps.shape[0]}
    if not np.all(np.isfinite(samples)):
        out["finite"] = False
        return out
    out["finite"] = True
    modes, distances = toy.nearest_mode(samples)
    out["within_3_std"] = float(np.mean(distances <= 3.0))
    out["mean_distance_to_mode"] = float(np.mean(distances * toy.stds[modes]))
    out["modes_hit"] = int(np.unique(modes).size)
    out["modes"] = len(toy.stds)
    if len(toy.stds) == 1:
        sigmas = np.asarray(backend.to_numpy(scheduler.sigmas), dtype=np.float64)
        start = (
            np.asarray(backend.to_numpy(noise), dtype=np.float64) * scheduler.init_noise_sigma
        )  # as rounded to dtype
        flow = scheduler.config.prediction_type == "flow_prediction"
        exact = toy.exact_flow(start, float(sigmas[0]), float(sigmas[-1]), flow=flow)
        error = np.abs(samples - exact)
        out["max_error"] = float(error.max())
        out["mean_error"] = float(error.mean())
    return out
