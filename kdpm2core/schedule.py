"""The noise schedule and the KDPM2 coefficient table, computed once on the host with NumPy.

The training table (betas, alphas_cumprod and the sigmas they imply) is float32, built with the same
arithmetic as diffusers, because it is part of how a model was trained: the betas equal diffusers' bit for
bit and the sigmas to the last float32 ulp. Everything derived from it for sampling (spacing, sigma
families, interpolated sigmas, timesteps, coefficients) is float64.

A KDPM2 step from sigma ``s`` to ``s_next`` takes two substeps (one model call each): an Euler substep to
the geometric mean ``mid = sqrt(s * s_next)``, then a midpoint substep from ``s`` to ``s_next`` using the
derivative at ``mid`` (Algorithm 2 of Karras et al. 2022 with the DPM-Solver-2 midpoint). A step to 0 is a
single Euler substep. Each substep is two linear combinations whose coefficients depend only on the sigmas,

    prev_sample          = a * stored + b * sample + c * model_output
    pred_original_sample = p * sample + q * model_output

so they form a table with one row ``(a, b, c, p, q, first, n)`` per substep; ``first`` is 1 on the Euler
substeps, whose ``sample`` the following midpoint substep needs as ``stored``.

Flow-matching (rectified-flow) models, ``x_s = (1 - s) * x0 + s * noise`` with ``s`` in [0, 1] and a model that
predicts the velocity ``v = noise - x0``, use the same table on a schedule of ``s``: their denoiser is
``x0 = x - s * v`` and the probability-flow ODE ``dx/ds = v = (x - x0) / s``, which is the epsilon
parameterisation with ``sigma -> s`` and ``epsilon -> v``, and the model input needs no scaling.

The ancestral sampler (DPM2 a) is the same table for other sigmas. Each step from ``s`` to ``s_next`` splits
``s_next`` into ``s_down`` and ``s_up`` (k-diffusion's ``get_ancestral_step``; ``s_down**2 + s_up**2 ==
s_next**2``), steps deterministically to ``s_down`` through ``sqrt(s * s_down)``, and the midpoint substep adds
one more term, ``n * noise`` with ``n = s_noise * s_up`` and fresh standard normal noise. ``n`` is 0 on every
other row: with ``eta = 0`` the table is the deterministic one, and a step whose ``s_down`` is 0 is one Euler
substep without noise. On a flow-matching schedule the noise is not additive: the step to ``s_down`` (lower than
k-diffusion's) is followed by the rescale ``alpha_ratio = (1 - s_next) / (1 - s_down)`` of the signal and the
noise ``s_up`` that brings the variance back to ``s_next**2`` (:func:`flow_ancestral_step`), so the midpoint
row's ``a, b, c`` are multiplied by ``alpha_ratio``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from kdpm2core.config import is_flow, positive_int

__all__ = [
    "Schedule",
    "build_schedule",
    "schedule_request",
    "substep_table",
    "ancestral_step",
    "flow_ancestral_step",
    "training_table",
    "training_table_for",
    "sigma_to_t",
    "input_scale",
    "shift_sigmas",
    "flow_shift",
    "flow_sigmas",
    "NO_SHIFT_MU",
    "COLUMNS",
    "TRAINING_OPTIONS",
]

COLUMNS = ("a", "b", "c", "p", "q", "first", "n")
#: the options the training table depends on, in :func:`training_table`'s argument order
TRAINING_OPTIONS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")


class TrainingTable(NamedTuple):
    betas: np.ndarray  # float32, as the model was trained
    alphas_cumprod: np.ndarray  # float32
    sigmas: np.ndarray  # float32, sqrt((1 - alphas_cumprod) / alphas_cumprod), increasing in t
    log_sigmas: np.ndarray  # float32


class Schedule(NamedTuple):
    """Everything ``set_timesteps`` computes, on the host."""

    timesteps: np.ndarray  # float64, one model timestep per substep
    sigmas: np.ndarray  # float64 holding float32 values, diffusers' layout [s0, s1, s1, ..., sn, sn, sn]
    sigma_in: np.ndarray  # float64, the sigma the model sees at each substep
    table: np.ndarray  # float64, shape (substeps, 7), columns COLUMNS
    init_noise_sigma: float


def _linspace_float32(start: float, stop: float, num: int) -> np.ndarray:
    """``torch.linspace(start, stop, num, dtype=float32)``, bit for bit: a float32 step, each half of the
    range counted from its own end, and a fused multiply-add (exact in float64, rounded once)."""
    start32, stop32 = np.float32(start), np.float32(stop)
    if num == 1:
        return np.array([start32])
    step = np.float32((stop32 - start32) / np.float32(num - 1))
    i = np.arange(num, dtype=np.float64)
    from_start = np.float64(start32) + np.float64(step) * i
    from_stop = np.float64(stop32) - np.float64(step) * (num - 1 - i)
    return np.where(i < num // 2, from_start, from_stop).astype(np.float32)


def _squaredcos_cap_v2(num: int, max_beta: float = 0.999) -> np.ndarray:
    """The cosine schedule of Nichol & Dhariwal (2021), computed in float64 and stored as float32."""

    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num) / alpha_bar(i / num), max_beta) for i in range(num)]
    return np.array(betas, dtype=np.float32)


def training_table(
    num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str, trained_betas=None
) -> TrainingTable:
    """The training noise table; raises ValueError naming the parameter when the betas are unusable."""
    if trained_betas is not None:
        betas = np.asarray(trained_betas, dtype=np.float32)
        name = "trained_betas"
        if betas.ndim != 1 or betas.size < 1:
            raise ValueError(f"trained_betas must be a non-empty 1-D sequence, got shape {betas.shape}")
    elif beta_schedule == "linear":
        betas, name = _linspace_float32(beta_start, beta_end, num_train_timesteps), "beta_start/beta_end"
    elif beta_schedule == "scaled_linear":
        betas = _linspace_float32(beta_start**0.5, beta_end**0.5, num_train_timesteps) ** 2
        name = "beta_start/beta_end"
    elif beta_schedule == "squaredcos_cap_v2":
        betas, name = _squaredcos_cap_v2(num_train_timesteps), "beta_schedule"
    else:
        raise ValueError(
            f"beta_schedule must be one of linear, scaled_linear, squaredcos_cap_v2; got {beta_schedule!r}"
        )
    if not (np.all(np.isfinite(betas)) and np.all(betas > 0) and np.all(betas < 1)):
        raise ValueError(f"{name} give betas outside (0, 1) or not finite (min {betas.min()}, max {betas.max()})")
    # float32 products accumulated in float64, as torch.cumprod does on the CPU
    alphas_cumprod = np.cumprod((np.float32(1) - betas).astype(np.float64)).astype(np.float32)
    with np.errstate(
        divide="ignore", over="ignore", invalid="ignore"
    ):  # an underflowed alphas_cumprod is reported just below
        sigmas = np.sqrt((np.float32(1) - alphas_cumprod) / alphas_cumprod)
    if not np.all(np.isfinite(sigmas)) or np.any(sigmas <= 0):
        raise ValueError(f"{name} give a noise table that is not finite and positive (alphas_cumprod underflows)")
    return TrainingTable(betas, alphas_cumprod, sigmas, np.log(sigmas))


def training_table_for(options: Mapping) -> TrainingTable:
    """The training table of validated scheduler options (their :data:`TRAINING_OPTIONS`)."""
    return training_table(*(options[key] for key in TRAINING_OPTIONS))


def sigma_to_t(sigma, log_sigmas: np.ndarray) -> np.ndarray:
    """The fractional training timestep whose sigma is ``sigma``: linear interpolation in log-sigma,
    clamped to [0, len(log_sigmas) - 1]; sigma 0 maps to t 0."""
    log_sigma = np.log(np.maximum(np.asarray(sigma, dtype=np.float64), 1e-10))
    if len(log_sigmas) < 2:  # one training timestep: there is nothing to interpolate, every sigma is t = 0
        return np.zeros_like(log_sigma)
    low = np.clip(np.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0, len(log_sigmas) - 2)
    log_low, log_high = log_sigmas[low], log_sigmas[low + 1]
    width = np.asarray(log_low - log_high, dtype=np.float64)
    # equal neighbours (betas so small that float32 alphas_cumprod repeats) would give 0/0: take the lower t
    w = np.divide(log_low - log_sigma, width, out=np.zeros_like(log_sigma), where=width != 0)
    w = np.clip(w, 0.0, 1.0)
    return (1.0 - w) * low + w * (low + 1)


def _spaced_timesteps(spacing: str, num_steps: int, num_train: int, steps_offset: int) -> np.ndarray:
    """Decreasing float32 timesteps for ``num_steps`` steps (Table 2 of Lin et al. 2023)."""
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, num_steps, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        ratio = num_train // num_steps
        return (np.arange(0, num_steps) * ratio).round()[::-1].astype(np.float32) + np.float32(steps_offset)
    if spacing == "trailing":
        # the first num_steps values of diffusers' float arange, which can yield one more, ending at t = -1
        # (e.g. 61 of 1000 steps); NumPy's arange computes start + i * ((start + step) - start)
        delta = (num_train - num_train / num_steps) - num_train
        trailing = num_train + np.arange(num_steps) * delta
        return trailing.round().astype(np.float32) - np.float32(1)
    raise ValueError(f"timestep_spacing must be one of linspace, leading, trailing; got {spacing!r}")


def _sigma_family(config: Mapping, sigmas: np.ndarray, num_steps: int) -> np.ndarray:
    """Replace interpolated sigmas by the Karras, exponential or beta family over the same range."""
    sigma_min, sigma_max = float(sigmas[-1]), float(sigmas[0])
    if config["use_karras_sigmas"]:
        rho = 7.0
        ramp = np.linspace(0, 1, num_steps)
        return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    if config["use_exponential_sigmas"]:
        return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), num_steps))
    if config["use_beta_sigmas"]:  # Lee et al. 2024, "Beta Sampling is All You Need", alpha = beta = 0.6
        import scipy.stats

        quantiles = scipy.stats.beta.ppf(1 - np.linspace(0, 1, num_steps), 0.6, 0.6)
        return sigma_min + quantiles * (sigma_max - sigma_min)
    return sigmas


def ancestral_step(sigma: np.ndarray, sigma_next: np.ndarray, eta: float) -> tuple[np.ndarray, np.ndarray]:
    """``(sigma_down, sigma_up)`` of steps from ``sigma`` to ``sigma_next``: ``sigma_up = min(sigma_next, eta *
    sqrt(sigma_next**2 (sigma**2 - sigma_next**2) / sigma**2))``, ``sigma_down = sqrt(sigma_next**2 -
    sigma_up**2)``; ``eta = 0`` gives ``(sigma_next, 0)`` exactly.

    ``sigma_down`` is computed as ``sigma_next * sqrt((1 - eta**2) + eta**2 (sigma_next / sigma)**2)``, its
    algebraic equal: the difference of squares cancels catastrophically when ``sigma >> sigma_next`` (float32
    loses every digit of ``sigma_down = sigma_next**2 / sigma`` at ``eta = 1`` on a first step from sigma 2e4)."""
    if eta == 0:
        return sigma_next, np.zeros_like(sigma_next)
    ratio = np.divide(sigma_next, sigma, out=np.zeros_like(sigma_next), where=sigma > 0)
    up = np.minimum(sigma_next, eta * sigma_next * np.sqrt(np.maximum(1.0 - ratio**2, 0.0)))
    down = sigma_next * np.sqrt(np.maximum((1.0 - eta**2) + eta**2 * ratio**2, 0.0))
    return np.where(up < sigma_next, down, 0.0), up


def flow_ancestral_step(s: np.ndarray, s_next: np.ndarray, eta: float) -> tuple[np.ndarray, ...]:
    """``(s_down, s_up, alpha_ratio)`` of flow-matching steps from ``s`` to ``s_next`` (ComfyUI's RF ancestral
    step): ``s_down = s_next (1 + (s_next / s - 1) eta)``, ``alpha_ratio = (1 - s_next) / (1 - s_down)``, ``s_up
    = sqrt(s_next**2 - s_down**2 alpha_ratio**2)``, so that ``alpha_ratio x_down + s_up noise`` has the signal
    ``(1 - s_next) x0`` and the noise variance ``s_next**2`` of the flow at ``s_next``; ``eta = 0`` gives
    ``(s_next, 0, 1)`` exactly.

    ``s_up**2`` is computed as its algebraic equal ``eta s_next (1 - s_next / s) (s_next + s_down alpha_ratio) /
    (1 - s_down)`` (``s_next - s_down alpha_ratio = (s_next - s_down) / (1 - s_down)``), free of the difference of
    squares. ``1 - s_down >= 1 - s_next > 0`` on every step of a decreasing schedule in [0, 1]; a step that does
    not move (``s_next == s``) keeps ``alpha_ratio = 1``. ValueError where ``eta`` would take ``s_down`` below 0
    (``eta > s / (s - s_next)``: the step would overshoot past the data)."""
    if eta == 0:
        return s_next, np.zeros_like(s_next), np.ones_like(s_next)
    ratio = s_next / s  # s > 0: every step starts above 0
    down = s_next * ((1.0 - eta) + eta * ratio)
    if np.any(down < 0):
        worst = int(np.argmin(down))
        raise ValueError(
            f"eta={eta} takes s_down below 0 on the step from s={s[worst]:.6g} to {s_next[worst]:.6g} of a "
            f"flow-matching schedule (eta must be <= s / (s - s_next) = {s[worst] / (s[worst] - s_next[worst]):.6g})"
        )
    moves = down < s_next
    alpha_ratio = np.where(moves, (1.0 - s_next) / np.where(moves, 1.0 - down, 1.0), 1.0)
    up_squared = eta * s_next * (1.0 - ratio) * (s_next + down * alpha_ratio) / np.where(moves, 1.0 - down, 1.0)
    return down, np.sqrt(np.maximum(up_squared, 0.0)), alpha_ratio


def substep_table(
    sigma_hat: np.ndarray,
    sigma_next: np.ndarray,
    prediction_type: str,
    *,
    eta: float = 0.0,
    s_noise: float = 1.0,
    flow: bool | None = None,
):
    """Rows of the coefficient table for steps from ``sigma_hat[i]`` to ``sigma_next[i]`` (float64).

    ``eta > 0`` makes the ancestral rows (see the module docstring): ``eta`` scales the noise each step adds
    (1: as much as the forward process removed), ``s_noise`` the noise itself. On a flow-matching schedule
    (``flow``; ``None``: whether ``prediction_type`` is ``flow_prediction``) they are :func:`flow_ancestral_step`'s:
    the midpoint substep's ``a, b, c`` are scaled by ``alpha_ratio``.

    Returns ``(sigma_in, mid_or_none, table, step_of_row)``: the sigma the model sees at each substep, whether
    the row is a midpoint substep, the ``(substeps, 7)`` table, and the step each row belongs to.
    """
    sigma_hat = np.asarray(sigma_hat, dtype=np.float64)
    sigma_next = np.asarray(sigma_next, dtype=np.float64)
    if prediction_type == "flow_prediction" if flow is None else flow:
        down, up, alpha_ratio = flow_ancestral_step(sigma_hat, sigma_next, eta)
    else:
        (down, up), alpha_ratio = ancestral_step(sigma_hat, sigma_next, eta), np.ones_like(sigma_hat)
    two = down > 0  # a step to 0 is a single Euler substep
    step = np.repeat(np.arange(sigma_hat.size), np.where(two, 2, 1))
    midpoint = np.zeros(step.size, dtype=bool)
    midpoint[1:] = step[1:] == step[:-1]
    hat, nxt = sigma_hat[step], down[step]
    mid = np.sqrt(hat) * np.sqrt(nxt)  # geometric mean without log(0): 0 when the step ends at 0
    sigma_in = np.where(midpoint, mid, hat)
    dt = np.where(midpoint, nxt - hat, mid - hat)
    a = midpoint.astype(np.float64)
    base = 1.0 - a  # the Euler substep starts from ``sample``, the midpoint substep from ``stored``
    if prediction_type in ("epsilon", "flow_prediction"):  # x0 = x - s * eps; for flow x0 = x - s * v
        p, q = np.ones_like(sigma_in), -sigma_in
        b, c = base, dt
    elif prediction_type == "v_prediction":  # x0 = x / (s^2 + 1) - s * v / sqrt(s^2 + 1)
        p, q = 1.0 / (sigma_in**2 + 1.0), -sigma_in / np.sqrt(sigma_in**2 + 1.0)
        b, c = base + dt * sigma_in / (sigma_in**2 + 1.0), dt / np.sqrt(sigma_in**2 + 1.0)
    elif prediction_type == "sample":  # x0 = model_output
        p, q = np.zeros_like(sigma_in), np.ones_like(sigma_in)
        b, c = base + dt / sigma_in, -dt / sigma_in
    else:
        raise ValueError(
            f"prediction_type must be one of epsilon, v_prediction, sample, flow_prediction; got {prediction_type!r}"
        )
    rescale = np.where(midpoint, alpha_ratio[step], 1.0)  # flow: the step's signal back to 1 - s_next
    a, b, c = a * rescale, b * rescale, c * rescale
    first = (~midpoint).astype(np.float64)
    n = np.where(midpoint, s_noise * up[step], 0.0)  # noise only after a midpoint substep (k-diffusion's rule)
    table = np.stack([a, b, c, p, q, first, n], axis=1)
    return sigma_in, midpoint, table, step


def input_scale(sigma_in: np.ndarray, flow: bool) -> np.ndarray:
    """The factor ``scale_model_input`` applies at each substep: ``1 / sqrt(sigma^2 + 1)``, which turns the
    sampler's ``x0 + sigma * noise`` into the model's unit-variance input; 1 on a flow schedule, whose sample
    ``(1 - s) * x0 + s * noise`` is the model's input as it is."""
    if flow:
        return np.ones_like(sigma_in)
    return 1.0 / np.sqrt(sigma_in**2 + 1.0)


def _check_custom_sigmas(sigmas, at_least: int = 2) -> np.ndarray:
    try:
        values = np.asarray(sigmas, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"sigmas must be a 1-D sequence of numbers, got {type(sigmas).__name__}") from None
    if values.ndim != 1 or values.size < at_least:
        raise ValueError(f"sigmas must be 1-D with at least {at_least} values, got shape {values.shape}")
    if not np.all(np.isfinite(values)) or np.any(values < 0) or np.any(values > np.finfo(np.float32).max):
        raise ValueError("sigmas must be finite, non-negative and within float32 range (they are stored as float32)")
    if np.any(np.diff(values) >= 0):
        raise ValueError("sigmas must be strictly decreasing")
    return values


def shift_sigmas(s: np.ndarray, shift: float) -> np.ndarray:
    """The shifted flow schedule ``shift * s / (1 + (shift - 1) * s)`` (Esser et al. 2024, eq. 23): ``shift > 1``
    spends more steps at high noise; 0 and 1 stay where they are."""
    return shift * s / (1.0 + (shift - 1.0) * s)


#: the ``mu`` of no dynamic shift, per ``time_shift_type`` (shift ``e^0 = 1``, shift ``1``)
NO_SHIFT_MU = {"exponential": 0.0, "linear": 1.0}


def flow_shift(config: Mapping, mu: float | None) -> float:
    """The shift of a flow schedule: the configured one (``flow_shift`` with ``use_flow_sigmas``, else
    ``shift``), or with ``use_dynamic_shifting`` the resolution-dependent one given by ``mu``.

    diffusers' dynamic time shift ``e^mu / (e^mu + (1/s - 1))`` ("exponential") and ``mu / (mu + (1/s - 1))``
    ("linear") are :func:`shift_sigmas` with ``shift = e^mu`` and ``shift = mu``, written without ``1/s``.
    """
    if not config["use_dynamic_shifting"]:
        return config["flow_shift"] if config["use_flow_sigmas"] else config["shift"]
    if mu is None:
        raise ValueError("mu must be passed to set_timesteps when use_dynamic_shifting=True")
    if isinstance(mu, bool) or not isinstance(mu, (int, float, np.floating, np.integer)) or not math.isfinite(mu):
        raise TypeError(f"mu must be a finite number, got {type(mu).__name__} {mu!r}")
    if config["time_shift_type"] == "exponential":
        return math.exp(mu)
    if mu <= 0:
        raise ValueError(f"mu must be > 0 with time_shift_type='linear', got {mu}")
    return float(mu)


def flow_sigmas(
    config: Mapping, num_inference_steps: int | None, *, sigmas=None, mu=None, num_train_timesteps: int | None = None
) -> np.ndarray:
    """The decreasing step values of ``s`` of a flow-matching schedule (float64, final 0 not included).

    Without ``sigmas``: ``FlowMatchEulerDiscreteScheduler``'s even spacing of ``s`` from 1 down to its shifted
    ``1 / num_train_timesteps``, or with ``use_flow_sigmas`` ``DPMSolverMultistepScheduler``'s spacing of
    ``n + 1`` values from 1 to ``1 / num_train_timesteps`` less the last. ``sigmas`` are step values as
    diffusers' flow schedulers take them (a final 0, k-diffusion style, is allowed and dropped). Then, as in
    diffusers: the shift (:func:`flow_shift`), the stretch to ``shift_terminal``, and a Karras, exponential or
    beta family over the resulting range.
    """
    num_train = num_train_timesteps or config["num_train_timesteps"]
    shift = flow_shift(config, mu)
    if sigmas is not None:
        steps = _check_custom_sigmas(sigmas, at_least=1)
        if steps.max() > 1:
            raise ValueError(f"sigmas of a flow-matching schedule must lie in [0, 1], got a maximum of {steps.max()}")
        steps = steps[:-1] if steps[-1] == 0 else steps
        if steps.size == 0:
            raise ValueError("sigmas must hold at least one value above 0")
    elif config["use_flow_sigmas"]:
        steps = 1.0 - np.linspace(1.0, 1.0 / num_train, num_inference_steps + 1)[::-1][:-1]
    else:
        # diffusers shifts its lowest training value once when the scheduler is made (without dynamic
        # shifting), and the spacing between 1 and it is shifted again below
        lowest = 1.0 / num_train
        if not config["use_dynamic_shifting"]:
            lowest = float(shift_sigmas(lowest, config["shift"]))
        steps = np.linspace(1.0, lowest, num_inference_steps)
    steps = shift_sigmas(steps, shift)
    terminal = config["shift_terminal"]
    if terminal:  # stretch 1 - s so that the last step value is ``shift_terminal`` (0 leaves it, as diffusers)
        steps = 1.0 - (1.0 - steps) * ((1.0 - terminal) / (1.0 - steps[-1]))
    return _sigma_family(config, steps, steps.size)


def schedule_request(num_inference_steps, sigmas) -> int | None:
    """``num_inference_steps`` as a positive int (None with ``sigmas``); ValueError unless exactly one of the
    two is given."""
    if (num_inference_steps is None) == (sigmas is None):
        raise ValueError("pass exactly one of num_inference_steps and sigmas")
    if num_inference_steps is None:
        return None
    return positive_int("num_inference_steps", num_inference_steps)


def build_schedule(
    config: Mapping,
    num_inference_steps: int | None = None,
    *,
    sigmas=None,
    num_train_timesteps: int | None = None,
    eta: float = 0.0,
    mu: float | None = None,
) -> Schedule:
    """The schedule ``set_timesteps`` installs, for a validated config (see :mod:`kdpm2core.config`); ``eta > 0``
    gives the ancestral sampler's (1: diffusers' ``KDPM2AncestralDiscreteScheduler``).

    ``mu`` is the dynamic shift of a flow-matching schedule (see :func:`flow_shift`)."""
    train = training_table_for(config)
    flow = is_flow(config)
    if flow:  # timesteps are s * num_train_timesteps, so they are set below, after the midpoints
        step_sigmas = flow_sigmas(
            config, num_inference_steps, sigmas=sigmas, mu=mu, num_train_timesteps=num_train_timesteps
        )
        step_sigmas = step_sigmas.astype(np.float32).astype(np.float64)
        final = 0.0
    elif mu is not None:
        raise ValueError("mu (the dynamic shift) applies to flow-matching schedules only: prediction_type is not flow")
    elif sigmas is not None:  # k-diffusion style: the whole decreasing sequence, final sigma included
        values = _check_custom_sigmas(sigmas).astype(np.float32).astype(np.float64)
        step_sigmas, final = values[:-1], values[-1]
        step_t = sigma_to_t(step_sigmas, train.log_sigmas)
    else:
        num_train = num_train_timesteps or config["num_train_timesteps"]
        spaced = _spaced_timesteps(config["timestep_spacing"], num_inference_steps, num_train, config["steps_offset"])
        interpolated = np.interp(spaced, np.arange(len(train.sigmas)), train.sigmas)
        step_sigmas = _sigma_family(config, interpolated, num_inference_steps)
        if step_sigmas is interpolated:
            step_t = spaced.astype(np.float64)
        else:
            step_t = sigma_to_t(step_sigmas, train.log_sigmas)
            if config["use_karras_sigmas"]:
                step_t = np.round(step_t)
        step_sigmas = step_sigmas.astype(np.float32).astype(np.float64)
        final = 0.0
    if not np.all(np.isfinite(step_sigmas)) or np.any(step_sigmas <= 0):
        raise ValueError("the options give sigmas that are not finite and positive")

    sigma_next = np.append(step_sigmas[1:], final)
    sigma_in, midpoint, table, step = substep_table(
        step_sigmas, sigma_next, config["prediction_type"], eta=eta, flow=flow
    )
    expanded = np.concatenate([step_sigmas[:1], np.repeat(sigma_next, 2), [final]])
    if flow:  # x_1 is the noise itself
        timesteps = sigma_in * (num_train_timesteps or config["num_train_timesteps"])
        return Schedule(timesteps, expanded, sigma_in, table, 1.0)
    timesteps = np.where(midpoint, sigma_to_t(sigma_in, train.log_sigmas), step_t[step])
    top = float(expanded.max())
    init = top if config["timestep_spacing"] in ("linspace", "trailing") else math.sqrt(top * top + 1.0)
    return Schedule(timesteps, expanded, sigma_in, table, init)
