"""The functional KDPM2 sampler: pure functions over an immutable :class:`Plan` and a :class:`State` of arrays.

The stateful :class:`~kdpm2core.KDPM2DiscreteScheduler` keeps Python state and reads its coefficients as
Python floats. Here the coefficient table lives on the device and the substep index is a 0-d integer array,
so nothing branches on a value: a whole sampling loop traces once under ``jax.jit`` (``lax.fori_loop``),
``torch.compile(fullgraph=True)`` or a CUDA graph. ::

    plan = make_plan(num_inference_steps=25, backend="jax")
    x = sample(plan, model, noise * init_noise_sigma(plan))            # the whole loop

    state = init(plan, x)                                              # or drive it yourself
    for _ in range(num_substeps(plan)):
        model_output = model(*model_inputs(plan, state, x))
        (x, denoised), state = step(plan, state, model_output, x)

Both give the stateful scheduler's numbers bit for bit (eagerly; a compiler may fuse a multiply-add).

Design notes:

- The schedule math is :mod:`kdpm2core.schedule`'s, run once on the host in float64; a plan only moves the
  result to the backend (timesteps in float32 as diffusers has them; the rest in the working dtype).
- ``State.stored`` is simply the sample passed to the previous step. A midpoint substep needs exactly that
  (the sample its Euler substep started from), and an Euler substep multiplies it by ``a = 0``. Keeping a
  reference instead of a masked copy makes a step allocate only its two outputs.
- What only the host needs (the float64 schedule, the backend object, the options) sits in ``Plan.info``, a
  :class:`PlanInfo` that JAX treats as static (no leaves), so a plan can be a ``jax.jit`` argument.
- Churn (k-diffusion's ``s_churn``) only moves the sigmas a step starts from; the amounts are known on the
  host, so a churned plan is another table built with :func:`~kdpm2core.schedule.substep_table`, plus the
  standard deviation of the noise added before each Euler substep.
"""

from __future__ import annotations

import functools
import math
import numbers
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from kdpm2core import config as _config
from kdpm2core import noise as portable
from kdpm2core.backend import check_array, update
from kdpm2core.plugins import get_backend
from kdpm2core.schedule import (
    Schedule,
    build_schedule,
    input_scale,
    schedule_request,
    sigma_to_t,
    substep_table,
    training_table_for,
)

__all__ = [
    "Plan",
    "PlanInfo",
    "State",
    "make_plan",
    "init",
    "step",
    "model_inputs",
    "sample",
    "num_substeps",
    "init_noise_sigma",
]

Array = Any


class PlanInfo:
    """Host-side facts of a plan: no arrays. Static under ``jax.jit``, so it compares by value: two plans
    made alike (say, one per request) share one compiled function instead of compiling one each."""

    __slots__ = (
        "backend",
        "dtype",
        "device",
        "base",
        "options",
        "prediction_type",
        "churn",
        "index_dtype",
        "eta",
        "ancestral",
        "_key",
    )

    def __init__(
        self,
        backend,
        dtype,
        device,
        base: Schedule,
        options: dict,
        prediction_type: str,
        churn: tuple,
        eta: float = 0.0,
    ):
        self.backend = backend  #: the backend object every function of this module calls
        self.dtype = dtype  #: the working dtype of the plan's arrays
        self.device = device  #: where the plan's arrays live (``None``: the backend's default)
        self.base = base  #: the churn-free float64 schedule, as :func:`build_schedule` made it
        self.options = options  #: the validated scheduler options (for the training sigmas)
        self.prediction_type = prediction_type  #: what the table expects the model to predict
        self.churn = churn  #: ``(s_churn, s_tmin, s_tmax, s_noise)``
        self.index_dtype = _index_dtype(backend.xp)  #: the dtype of ``State.index``
        self.eta = eta  #: the ancestral noise (0: deterministic; DPM2 a with eta > 0, see :func:`make_plan`)
        # a bool, not a float comparison: torch.compile(dynamic=True) makes float attributes symbolic
        self.ancestral = bool(eta > 0)  #: whether each step takes noise
        schedule = tuple(np.ascontiguousarray(values).tobytes() for values in base[:4]) + (base.init_noise_sigma,)
        self._key = (
            backend.name,
            str(dtype),
            str(self.index_dtype),
            repr(device),
            schedule,
            tuple(sorted(options.items())),
            prediction_type,
            churn,
            eta,
        )
        _static_under_jax(sys.modules.get("jax"))

    def __eq__(self, other):
        return type(other) is PlanInfo and (
            self is other or (self.backend is other.backend and self._key == other._key)
        )

    def __hash__(self):
        return hash(self._key)

    @property
    def churned(self) -> bool:
        """Whether a sampling loop adds noise (some step's sigma is raised)."""
        return bool(np.any(_gammas(self.base, self.churn) > 0))

    def __repr__(self) -> str:
        return f"PlanInfo(backend={self.backend.name!r}, dtype={self.dtype}, prediction_type={self.prediction_type!r})"


@functools.cache
def _static_under_jax(jax) -> None:
    """Register :class:`PlanInfo` with JAX as a static pytree node (no leaves), so that a plan can be an
    argument of ``jax.jit`` or ``vmap``; once, and only when jax is imported (this module never imports it)."""
    if jax is not None:
        jax.tree_util.register_static(PlanInfo)


class Plan(NamedTuple):
    """Everything a sampling loop reads, one entry per substep, as backend arrays."""

    timesteps: Array  #: (n,) float32: the timestep a diffusers-style model sees at each substep
    sigmas: Array  #: (n,) the sigma a denoiser sees at each substep
    input_scale: Array  #: (n,) the model input scale ``1 / sqrt(sigma**2 + 1)`` (1 on a flow schedule)
    table: Array  #: (n, 7) the coefficient rows ``(a, b, c, p, q, first, n)``, see :mod:`kdpm2core.schedule`
    noise: Array  #: (n,) standard deviation of the churn noise added before each substep (zeros: no churn)
    info: PlanInfo  #: host-side facts (static)


class State(NamedTuple):
    """The sampler's state: a pytree of arrays (JAX can carry it through ``lax.scan``)."""

    index: Array  #: 0-d integer (the namespace's default index dtype, :attr:`PlanInfo.index_dtype`): the next substep
    stored: Array  #: the sample passed to the previous step (what a midpoint substep starts from); zeros at first


# -- plans ------------------------------------------------------------------------------------------------------
def make_plan(
    source=None,
    num_inference_steps: int | None = None,
    *,
    sigmas=None,
    backend=None,
    dtype: Any = "float32",
    device: Any = None,
    prediction_type: str | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    eta: float | None = None,
    mu: float | None = None,
    **options,
) -> Plan:
    """Build a plan from a stateful scheduler, or from scheduler options.

    Args:
        source: A :class:`~kdpm2core.KDPM2DiscreteScheduler` after ``set_timesteps`` (its schedule, options,
            backend and device are taken as they are), or ``None`` to build from the other arguments.
        num_inference_steps: Number of steps (without ``source``; exclusive with ``sigmas``).
        sigmas: k-diffusion style decreasing sigmas, final sigma included (without ``source``).
        backend: Backend name or object (default: the scheduler's, else ``$KDPM2_BACKEND`` or numpy).
        dtype: Working dtype of the plan's arrays: a name such as ``"float32"`` or a dtype object.
        device: Device of the plan's arrays (default: the scheduler's timesteps' device).
        prediction_type: Override what the model predicts; ``"sample"`` suits k-diffusion denoisers.
        s_churn: Total churn of k-diffusion's ``sample_dpm_2`` (0: deterministic).
        s_tmin: Churn only steps whose sigma is at least this.
        s_tmax: Churn only steps whose sigma is at most this.
        s_noise: Scale of the churn noise, and of the ancestral noise.
        eta: The ancestral sampler, DPM2 a (k-diffusion's ``sample_dpm_2_ancestral``): each step adds ``eta``
            times the noise the forward process removed (1: diffusers' ``KDPM2AncestralDiscreteScheduler``;
            0: deterministic). ``None``: the source scheduler's (1 for the ancestral class), else 0. An
            ancestral plan's :func:`step` takes ``noise=``; :func:`sample` draws it.
        mu: The dynamic shift of a flow-matching schedule with ``use_dynamic_shifting`` (as ``set_timesteps``).
        **options: Scheduler options (``beta_schedule=...``, ``use_karras_sigmas=...``), without ``source``.

    Returns:
        An immutable :class:`Plan`.
    """
    if source is not None:
        if not hasattr(source, "schedule") or not hasattr(source, "config"):
            raise TypeError(f"source must be a KDPM2DiscreteScheduler or None, got {type(source).__name__}")
        if options or num_inference_steps is not None or sigmas is not None or mu is not None:
            raise ValueError("pass either a scheduler as source, or num_inference_steps/sigmas/options, not both")
        base, validated = source.schedule, _config.validate_config(source.config)
        backend = source.backend if backend is None else get_backend(backend)
        if device is None:
            device = backend.device_of(source.timesteps)
    else:
        unknown = sorted(set(options) - set(_config.DEFAULTS))
        if unknown:
            raise TypeError(f"make_plan() got unknown scheduler options: {', '.join(unknown)}")
        num_inference_steps = schedule_request(num_inference_steps, sigmas)
        if prediction_type is not None:  # the schedule's too: "flow_prediction" makes a flow schedule
            options["prediction_type"] = prediction_type
        validated = _config.validate_config(options)
        if _config.is_flow(validated) and not validated["use_dynamic_shifting"]:
            mu = None  # as set_timesteps: ignored without dynamic shifting
        base = build_schedule(validated, num_inference_steps, sigmas=sigmas, mu=mu)
        backend = get_backend(backend)
        device = backend.device(device)
    if isinstance(dtype, str):
        dtype = backend.dtype(dtype)
    info = PlanInfo(
        backend,
        dtype,
        device,
        base,
        validated,
        prediction_type or validated["prediction_type"],
        (0.0, 0.0, math.inf, 1.0),
    )
    if eta is None:
        eta = getattr(source, "_eta", 0.0)
    churn = _check_churn(s_churn, s_tmin, s_tmax, s_noise)
    return _with(info, prediction_type=info.prediction_type, churn=churn, eta=_check_eta(eta, churn))


def _check_eta(eta, churn: tuple) -> float:
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite Python number >= 0 (it is folded into the plan), got {eta!r}")
    if eta > 0 and churn[0] > 0:
        raise ValueError("eta > 0 (the ancestral sampler) and s_churn > 0 cannot be combined; k-diffusion has neither")
    return float(eta)


def _check_churn(s_churn, s_tmin, s_tmax, s_noise) -> tuple:
    values = {"s_churn": s_churn, "s_tmin": s_tmin, "s_tmax": s_tmax, "s_noise": s_noise}
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
            raise TypeError(
                f"{name} must be a real Python number (churn is folded into the plan on the host, so it cannot "
                f"be an array or a traced value), got {value!r}"
            )
    if s_churn < 0 or not math.isfinite(s_churn):
        raise ValueError(f"s_churn must be finite and >= 0, got {s_churn!r}")
    if not math.isfinite(s_noise):
        raise ValueError(f"s_noise must be finite, got {s_noise!r}")
    return (float(s_churn), float(s_tmin), float(s_tmax), float(s_noise))


def _gammas(base: Schedule, churn: tuple) -> np.ndarray:
    """k-diffusion's per-step churn: ``min(s_churn / steps, sqrt(2) - 1)`` where ``s_tmin <= sigma <= s_tmax``."""
    s_churn, s_tmin, s_tmax, _ = churn
    step_sigmas = base.sigma_in[base.table[:, 5] == 1]  # Euler rows start each step, at its sigma
    gamma = min(s_churn / step_sigmas.size, math.sqrt(2.0) - 1.0)
    return np.where((step_sigmas >= s_tmin) & (step_sigmas <= s_tmax), gamma, 0.0)


def _with(info: PlanInfo, *, prediction_type: str, churn: tuple, eta: float) -> Plan:
    """The plan for ``info``'s schedule with another prediction type, churn or eta (host math, then one
    transfer)."""
    base = info.base
    info = PlanInfo(info.backend, info.dtype, info.device, base, info.options, prediction_type, churn, eta)
    gammas = _gammas(base, churn)
    flow = _config.is_flow(info.options)
    if flow and np.any(gammas > 0):
        raise ValueError("s_churn > 0 is not supported on a flow-matching schedule (its noise is not additive)")
    deterministic = eta == 0 and not np.any(base.table[:, 6])
    if deterministic and not np.any(gammas > 0) and prediction_type == info.options["prediction_type"]:
        timesteps, sigma_in, table = base.timesteps, base.sigma_in, base.table  # bit-identical to the scheduler
        noise = np.zeros_like(sigma_in)
    else:
        euler = base.table[:, 5] == 1
        step_sigmas = base.sigma_in[euler]
        sigma_next = np.append(step_sigmas[1:], base.sigmas[-1])
        sigma_hat = step_sigmas * (1.0 + gammas)
        sigma_in, midpoint, table, step_of_row = substep_table(
            sigma_hat, sigma_next, prediction_type, eta=eta, s_noise=churn[3], flow=flow
        )
        raised = gammas[step_of_row] > 0
        log_sigmas = training_table_for(info.options).log_sigmas
        if flow:  # timesteps are s * num_train_timesteps (build_schedule): the ratio recovers that integer
            timesteps = sigma_in * round(base.timesteps[0] / base.sigma_in[0])
        elif deterministic:  # unchurned steps keep the scheduler's timesteps; raised sigmas get their own sigma's
            timesteps = np.where(raised, sigma_to_t(sigma_in, log_sigmas), base.timesteps)
        else:  # DPM2 a's midpoints lie between sigma and sigma_down: they get their own sigma's timestep too
            step_t = base.timesteps[euler][step_of_row]
            timesteps = np.where(raised | midpoint, sigma_to_t(sigma_in, log_sigmas), step_t)
        added = churn[3] * np.sqrt(np.maximum(sigma_hat**2 - step_sigmas**2, 0.0))
        noise = np.where(midpoint, 0.0, added[step_of_row])
    backend, dtype, device = info.backend, info.dtype, info.device
    return Plan(
        timesteps=backend.asarray(timesteps.astype(np.float32), device=device),
        sigmas=backend.asarray(sigma_in, dtype=dtype, device=device),
        input_scale=backend.asarray(input_scale(sigma_in, flow), dtype=dtype, device=device),
        table=backend.asarray(table, dtype=dtype, device=device),
        noise=backend.asarray(noise, dtype=dtype, device=device),
        info=info,
    )


def num_substeps(plan: Plan) -> int:
    """Number of substeps (model calls) in the plan."""
    return int(plan.table.shape[0])


def init_noise_sigma(plan: Plan) -> float:
    """Standard deviation of the initial noise, as the stateful scheduler's ``init_noise_sigma``."""
    return plan.info.base.init_noise_sigma


# -- one substep ------------------------------------------------------------------------------------------------
def init(plan: Plan, sample: Array, index: int = 0) -> State:
    """The state before substep ``index`` for ``sample``.

    ``index`` must be an Euler substep (even): a midpoint substep continues from the sample its Euler substep
    started from, which only :func:`step` stores. An integer index is checked; a backend array (a traced
    value in a compiled loop) is taken as it is.
    """
    _check_start(plan, index, "index")
    xp, dtype = plan.info.backend.xp, plan.info.index_dtype
    if isinstance(index, numbers.Integral):
        # ``full`` fills on the device: no host-to-device copy (which CUDA's sync debug mode would flag); the
        # standard's fill value is a Python scalar (a NumPy integer is not one)
        extra = {} if plan.info.device is None else {"device": plan.info.device}
        start = xp.full((), int(index), dtype=dtype, **extra)
    else:  # a backend array, perhaps traced: converted where it is, without a host read
        start = xp.astype(index, dtype)
    # ``stored`` starts as zeros, not as ``sample`` itself: an alias of the step's input would make compilers
    # guard on it and compile the first step apart from the rest
    return State(start, xp.zeros_like(sample))


def _check_start(plan: Plan, index, name: str) -> None:
    """``index`` (the argument ``name``) is an Euler substep of ``plan``; a backend array is taken as it is."""
    if isinstance(index, numbers.Integral) and not isinstance(index, bool):
        n = num_substeps(plan)
        if not 0 <= index < n:
            raise ValueError(f"{name} must be in [0, {n - 1}], got {index}")
        if not plan.info.base.table[index, 5]:
            raise ValueError(
                f"{name} {index} is a midpoint substep: it continues from the sample stored by the Euler substep "
                f"before it, so start at an Euler substep ({index - 1}) and step from there"
            )
    elif not plan.info.backend.owns(index):
        raise TypeError(f"{name} must be an integer or a 0-d integer array, got {type(index).__name__} {index!r}")


def _index_dtype(xp) -> Any:
    """The integer dtype ``xp`` uses for indices: ``default_dtypes()["indexing"]`` of its
    ``__array_namespace_info__``, else the dtype of ``asarray(0)`` (the standard's default integer dtype).

    Some libraries' ``take`` accepts only this dtype (the standard allows any integer dtype), and JAX without
    ``jax_enable_x64`` has no int64, so the substep index is made in it."""
    info = getattr(xp, "__array_namespace_info__", None)
    if info is not None:
        return info().default_dtypes()["indexing"]
    return xp.asarray(0).dtype


def _row(plan: Plan, state: State, values: Array) -> Array:
    """``values[state.index]`` through ``take`` with a 1-element index array: no host read on any backend.

    The leading axis of length 1 is dropped with ``[0, ...]``: the standard indexes every dimension (or says
    ``...`` for the rest), and standard-strict libraries refuse ``[0]`` on a 2-D array."""
    xp = plan.info.backend.xp
    picked = xp.take(values, xp.reshape(state.index, (1,)), axis=0)
    return picked[0, ...]


def model_inputs(plan: Plan, state: State, sample: Array, *, denoiser: bool = False) -> tuple[Array, Array]:
    """What the model sees at the current substep.

    Returns ``(sample * input_scale, timestep)`` for a diffusers-style model, or ``(sample, sigma)`` for a
    k-diffusion denoiser (``denoiser=True``); the second item is a 0-d array.
    """
    if denoiser:
        return sample, _row(plan, state, plan.sigmas)
    return sample * _row(plan, state, plan.input_scale), _row(plan, state, plan.timesteps)


def step(
    plan: Plan, state: State, model_output: Array, sample: Array, out=None, *, noise: Array | None = None
) -> tuple[tuple[Array, Array], State]:
    """One substep: ``((prev_sample, pred_original_sample), new_state)``.

    Args:
        plan: The plan.
        state: The state before this substep.
        model_output: The model's prediction for ``sample`` (of the plan's prediction type).
        sample: The current sample; never modified.
        out: Optional pair of buffers for the two results (backends with in-place arrays write into them,
            so the step allocates nothing); must not alias ``sample``, ``model_output``, ``state.stored``, ``noise``
            or each other.
        noise: Standard normal noise like ``sample``, on every substep of an ancestral plan (``eta > 0``; the
            table's ``n`` scales it: 0 except on midpoint substeps); None otherwise.
    """
    _check_dtype(plan, sample)
    ancestral = plan.info.ancestral
    if ancestral != (noise is not None):
        raise ValueError(
            "an ancestral plan (eta > 0) takes standard normal noise= on every substep"
            if ancestral
            else "noise= is for ancestral plans only (make_plan(..., eta=1.0))"
        )
    extra = {} if out is None else {"out[0]": out[0], "out[1]": out[1]}
    _check_like(plan, sample, model_output=model_output, **extra, **({"noise": noise} if ancestral else {}))
    if out is not None:  # the same array objects here; the NumPy backend also refuses views that overlap an input
        named = {"sample": sample, "model_output": model_output, "state.stored": state.stored, "noise": noise}
        for k, buffer in enumerate(out):
            for name, x in {**named, "out[0]": out[0]}.items():
                if x is buffer and name != f"out[{k}]":
                    raise ValueError(f"out[{k}] is {name}: out buffers must not overlap the inputs or each other")
    row = _row(plan, state, plan.table)
    a, b, c, p, q = (row[j] for j in range(5))
    extra = {} if out is None else {"out": out}
    if ancestral:
        extra.update(n=row[6], noise=noise)
    prev, pred = update(plan.info.backend, a, b, c, p, q, state.stored, sample, model_output, **extra)
    return (prev, pred), State(state.index + 1, sample)


def _check_dtype(plan: Plan, sample: Array) -> None:
    """A sample of another dtype than the plan's would be promoted (or, in a compiled loop, change the carry's
    type): refuse it, saying which plan to make."""
    if sample.dtype != plan.table.dtype:
        name = str(sample.dtype).rpartition(".")[2]  # torch.bfloat16 -> bfloat16
        raise TypeError(
            f"sample is {name} but the plan holds {str(plan.table.dtype).rpartition('.')[2]} coefficients; "
            f"make the plan for the sample's dtype: make_plan(..., dtype={name!r})"
        )


def _check_like(plan: Plan, sample: Array, **arrays) -> None:
    """``sample`` and each of ``arrays`` are the plan's backend's, and each has ``sample``'s shape and dtype: a
    loop's carry keeps one dtype (a model output of another would promote it, and a compiled loop would refuse
    it at the next substep), and shapes never broadcast silently."""
    backend = plan.info.backend
    for name, x in {"sample": sample, **arrays}.items():
        check_array(backend, name, x)
        if x.shape != sample.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)} but sample has shape {tuple(sample.shape)}")
        if x.dtype != sample.dtype:
            raise TypeError(f"{name} is {x.dtype} but sample is {sample.dtype}; cast it to the sample's dtype")


# -- the loop ---------------------------------------------------------------------------------------------------
def sample(
    plan: Plan,
    model: Callable[[Array, Array], Array],
    x: Array,
    *,
    denoiser: bool = False,
    s_churn: float | None = None,
    s_tmin: float | None = None,
    s_tmax: float | None = None,
    s_noise: float | None = None,
    eta: float | None = None,
    seed: int | None = None,
    rng: Any = None,
    noise: Callable[[Array], Array] | None = None,
    start: int = 0,
) -> Array:
    """Run the whole schedule from ``x`` (noise already scaled by :func:`init_noise_sigma`) with the backend's
    loop primitive (``lax.fori_loop`` on JAX, a Python loop elsewhere); returns the final sample.

    ``denoiser=True`` on a plan of another prediction type, or churn other than the plan's, runs on a plan
    built on the host from ``plan.info``, so ``plan``'s arrays are not read: to trace or differentiate
    through them, make the plan with ``prediction_type="sample"`` and the churn in :func:`make_plan`.

    Args:
        plan: The plan.
        model: ``model(scaled_input, timestep) -> prediction`` of the plan's prediction type, or with
            ``denoiser=True`` a k-diffusion denoiser ``model(x, sigma) -> denoised``.
        x: The initial sample.
        denoiser: Which model convention ``model`` follows.
        s_churn: Churn as k-diffusion's ``sample_dpm_2``; ``None`` keeps the plan's (see :func:`make_plan`).
        s_tmin: Churn only steps with sigma at least this (``None``: the plan's).
        s_tmax: Churn only steps with sigma at most this (``None``: the plan's).
        s_noise: Scale of the churn and ancestral noise (``None``: the plan's).
        eta: The ancestral noise, as :func:`make_plan` takes it (``None``: the plan's).
        seed: Seed of the churn or ancestral noise: :func:`kdpm2core.noise.normal` of ``(seed, substep)``, the
            same on every backend and for each batch item whatever the batch (an int, or a 0-d integer array).
        rng: Instead of ``seed``: a generator state from ``backend.rng``, drawn from once per substep (on JAX a
            key; may be traced).
        noise: Instead of ``seed`` or ``rng``: ``noise(index) -> standard normal noise like x``, called on every
            substep with the substep index (a 0-d integer array, traced in a compiled loop); the plan's
            coefficients scale it (0 where a substep adds none).
        start: The substep to start at (an Euler substep, as :func:`init` takes), for img2img: ``x`` is then the
            image's latents noised to that substep's sigma, as the stateful scheduler's ``set_begin_index``
            and ``add_noise`` prepare them.
    """
    _check_dtype(plan, x)
    info = plan.info
    given = (s_churn, s_tmin, s_tmax, s_noise)
    churn = _check_churn(*(old if new is None else new for new, old in zip(given, info.churn)))
    eta = _check_eta(info.eta if eta is None else eta, churn)
    prediction_type = "sample" if denoiser else info.prediction_type  # a denoiser predicts the clean sample
    if churn != info.churn or prediction_type != info.prediction_type or eta != info.eta:
        plan = _with(info, prediction_type=prediction_type, churn=churn, eta=eta)
        info = plan.info
    backend = info.backend
    churned, ancestral = info.churned, info.ancestral
    if (churned or ancestral) and seed is None and rng is None and noise is None:
        raise ValueError("s_churn > 0 or eta > 0 adds noise: pass seed=, rng= or noise= for a reproducible result")

    def draw(state, rng, x):
        if noise is not None:
            return noise(state.index), rng
        if rng is not None:
            return backend.normal(rng, tuple(x.shape), dtype=x.dtype, device=info.device)  # beside x
        return portable.normal(backend.xp, seed, x.shape, substep=state.index, dtype=x.dtype, device=info.device), rng

    def body(_, carry):
        x, state, rng = carry
        if churned:  # host-side constant: the churn-free loop is exactly the scheduler's
            eps, rng = draw(state, rng, x)
            x = x + eps * _row(plan, state, plan.noise)
        output = model(*model_inputs(plan, state, x, denoiser=denoiser))
        if ancestral:
            eps, rng = draw(state, rng, x)
            (x, _), state = step(plan, state, output, x, noise=eps)
        else:
            (x, _), state = step(plan, state, output, x)
        return x, state, rng

    if not isinstance(start, numbers.Integral):  # a loop's length is a host number
        raise TypeError(f"start must be an integer, got {type(start).__name__} {start!r}")
    _check_start(plan, start, "start")
    x, _, _ = backend.loop(num_substeps(plan) - start, body, (x, init(plan, x, start), rng))
    return x
