"""``KDPM2DiscreteScheduler`` and ``KDPM2AncestralDiscreteScheduler``: the stateful, diffusers-compatible faces
of the sampler.

Their attributes and semantics are diffusers': ``set_timesteps`` installs a schedule, and each ``step`` call
advances ``step_index`` by one substep. Unlike diffusers, a step reads its row of the float64 coefficient
table (:mod:`kdpm2core.schedule`) as Python floats: no device-side indexing and no host/device sync. Both classes
are thin subclasses of one base: the ancestral one only builds its table with ``eta = 1`` and supplies the noise
that the table's ``n`` column scales.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import json
import operator
import os
import secrets
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import numpy as np

from kdpm2core import config as _config
from kdpm2core import noise
from kdpm2core.backend import check_array, exactly, substep_recipes, table_recipes
from kdpm2core.errors import NonFiniteError
from kdpm2core.plugins import get_backend
from kdpm2core.schedule import (
    COLUMNS,
    NO_SHIFT_MU,
    TRAINING_OPTIONS,
    Schedule,
    build_schedule,
    input_scale,
    schedule_request,
    training_table,
)

__all__ = ["KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "KDPM2DiscreteSchedulerOutput"]

VERSION = "0.1.0"
STATE_FORMAT = "kdpm2.{}.state/1"  # the class name, so that a state resumes only in a scheduler of its own kind
# the table's columns a traced step reads (b, c, p, q, n, a), then the model input scale: the device rows
_TRACED = tuple(COLUMNS.index(name) for name in "bcpqna")
_SCALE = len(_TRACED)
# the diffusers schedulers that share KDPM2's config (diffusers' KarrasDiffusionSchedulers, its KDPM2's
# ``_compatibles``): ``from_config`` builds each from the other's config
DIFFUSERS_COMPATIBLES = (
    "DDIMScheduler",
    "DDPMScheduler",
    "PNDMScheduler",
    "LMSDiscreteScheduler",
    "EulerDiscreteScheduler",
    "HeunDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DEISMultistepScheduler",
    "UniPCMultistepScheduler",
    "DPMSolverSDEScheduler",
    "EDMEulerScheduler",
)


class KDPM2DiscreteSchedulerOutput(OrderedDict):
    """What :meth:`KDPM2DiscreteScheduler.step` returns, and reads as diffusers' outputs do: an ordered dict of
    the fields that are not None, whose values are also attributes and positions.

    ``out.prev_sample``, ``out["prev_sample"]``, ``out[0]`` and ``out.to_tuple()[0]`` are the same array;
    ``"prev_sample" in out`` is true; iterating gives the keys, as for any dict (``to_tuple()`` gives the
    values). Fields can be reassigned, by key or attribute, but not removed.
    """

    def __init__(self, prev_sample=None, pred_original_sample=None):
        super().__init__()
        if isinstance(prev_sample, Mapping) and pred_original_sample is None:  # copy(), or a dict of the fields
            prev_sample, pred_original_sample = prev_sample.get("prev_sample"), prev_sample.get("pred_original_sample")
        if prev_sample is not None:
            super().__setitem__("prev_sample", prev_sample)
        if pred_original_sample is not None:
            super().__setitem__("pred_original_sample", pred_original_sample)

    @property
    def prev_sample(self):
        """The sample after this substep: the next model input."""
        return self.get("prev_sample")

    @prev_sample.setter
    def prev_sample(self, value):
        self["prev_sample"] = value

    @property
    def pred_original_sample(self):
        """The model's prediction of the clean sample at this substep."""
        return self.get("pred_original_sample")

    @pred_original_sample.setter
    def pred_original_sample(self, value):
        self["pred_original_sample"] = value

    def __getitem__(self, key):
        if isinstance(key, str):
            return super().__getitem__(key)
        return self.to_tuple()[key]

    def to_tuple(self) -> tuple:
        """The values, in field order."""
        return tuple(self.values())

    def _fixed_fields(self, *args, **kwargs):
        raise TypeError(f"a {type(self).__name__}'s fields cannot be removed or added in bulk")

    __delitem__ = pop = popitem = clear = setdefault = update = _fixed_fields

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{key}={value!r}' for key, value in self.items())})"


def _recording_defaults(init):
    """Decorate the scheduler's ``__init__`` so that its config lists, under ``_use_default_values`` as diffusers'
    configs do, the options the caller left at their defaults: a scheduler of another class built from this
    config then takes *its own* defaults for them (``DDIMScheduler``'s ``timestep_spacing`` is not ours)."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        init(self, *args, **kwargs)
        given = signature.bind(self, *args, **kwargs).arguments
        defaulted = [key for key in _config.DEFAULTS if key not in given]
        if defaulted:
            # the schedule's record too: it is the same config, and state_dict() saves that one
            self._internal_dict = self._schedule_config = _config.FrozenConfig(
                {**self.config, _config.USE_DEFAULT_VALUES: defaulted}
            )

    return wrapper


# the one stateful base: KDPM2DiscreteScheduler and KDPM2AncestralDiscreteScheduler (at the end) only name it
class _KDPM2Scheduler:
    """The KDPM2 sampler (DPM-Solver-2 / Algorithm 2 of Karras et al. 2022) with diffusers' interface.

    Args:
        num_train_timesteps: Number of diffusion steps the model was trained with.
        beta_start: First beta of the ``linear`` / ``scaled_linear`` schedules.
        beta_end: Last beta of those schedules.
        beta_schedule: ``"linear"``, ``"scaled_linear"`` or ``"squaredcos_cap_v2"``.
        trained_betas: Explicit betas, overriding ``beta_start``, ``beta_end`` and ``beta_schedule``.
        use_karras_sigmas: Use the sigma sequence of Karras et al. (2022), rho = 7.
        use_exponential_sigmas: Use sigmas evenly spaced in log-sigma.
        use_beta_sigmas: Use the Beta(0.6, 0.6) quantile sigmas of Lee et al. (2024).
        prediction_type: What the model predicts: ``"epsilon"``, ``"v_prediction"``, ``"sample"``, or
            ``"flow_prediction"`` (the velocity ``noise - x0`` of a flow-matching model such as SD3 or Flux; the
            schedule is then one of ``s`` in [0, 1], see docs/flow.md). A config of diffusers'
            ``FlowMatchEulerDiscreteScheduler`` given to :meth:`from_config` sets it.
        timestep_spacing: ``"linspace"``, ``"leading"`` or ``"trailing"`` (Lin et al. 2023, Table 2).
        steps_offset: Offset added to ``leading`` timesteps.
        use_flow_sigmas: Flow schedule spaced as ``DPMSolverMultistepScheduler``'s (with ``flow_shift``).
        flow_shift: The shift of that schedule.
        shift: The shift of ``FlowMatchEulerDiscreteScheduler``'s flow schedule (SD3: 3.0).
        use_dynamic_shifting: Resolution-dependent shift: ``set_timesteps`` takes ``mu`` (Flux).
        base_shift: Read by pipelines to compute ``mu``; unused by the scheduler.
        max_shift: Read by pipelines to compute ``mu``; unused by the scheduler.
        base_image_seq_len: Read by pipelines to compute ``mu``; unused by the scheduler.
        max_image_seq_len: Read by pipelines to compute ``mu``; unused by the scheduler.
        shift_terminal: Stretch the flow schedule so that its last step value is this.
        time_shift_type: How ``mu`` shifts: ``"exponential"`` (shift ``e^mu``) or ``"linear"`` (shift ``mu``).
        invert_sigmas: Not supported (must be False); kept so that diffusers configs load.
        stochastic_sampling: Not supported (must be False); kept so that diffusers configs load.
        backend: Name of a registered backend (``None``: ``$KDPM2_BACKEND``, else ``"numpy"``). A runtime
            choice, not part of the saved config.
        check_finite: Opt-in check mode: :meth:`step` raises :class:`kdpm2core.errors.NonFiniteError`,
            naming the substep and sigma, when an input or the result holds NaN or inf. Costs a host sync per
            step; a runtime choice (also the attribute ``check_finite``), not part of the saved config.
    """

    order = 2
    # diffusers' class-level conventions (SchedulerMixin / ConfigMixin), by name: diffusers is not imported
    config_name = _config.CONFIG_NAME
    has_compatibles = True
    _compatibles: ClassVar[list[str]] = list(DIFFUSERS_COMPATIBLES)  # lists, as diffusers' are
    _deprecated_kwargs: ClassVar[list[str]] = []
    ignore_for_config: ClassVar[list[str]] = ["backend", "check_finite"]  # runtime choices, not options
    _eta: ClassVar[float] = 0.0  # the ancestral noise of the table (0: deterministic), see kdpm2core.schedule

    @_recording_defaults
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "linear",
        trained_betas=None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        shift_terminal: float | None = None,
        time_shift_type: str = "exponential",
        invert_sigmas: bool = False,
        stochastic_sampling: bool = False,
        *,
        backend=None,
        check_finite: bool = False,
    ):
        options = {key: value for key, value in locals().items() if key in _config.DEFAULTS}
        self._internal_dict = _config.FrozenConfig(_config.validate_config(options))
        self._backend = get_backend(backend)
        # bound once: scale_model_input and step call them on every substep
        self._owns, self._compiling = self._backend.owns, self._backend.compiling
        self._float32 = self._backend.dtype("float32")  # the dtype of the backend's factors (set_timesteps)
        if not isinstance(check_finite, bool):
            raise TypeError(f"check_finite must be True or False, got {type(check_finite).__name__}")
        self.check_finite = check_finite
        self._training = None
        # the training timesteps, as diffusers makes them at construction (with the dynamic shift undecided)
        unshifted = NO_SHIFT_MU[time_shift_type] if use_dynamic_shifting else None
        self.set_timesteps(self.config["num_train_timesteps"], mu=unshifted)

    # -- configuration ----------------------------------------------------------------------------------------
    @property
    def config(self):
        """The options, read-only, by key or attribute. Pipelines may replace ``_internal_dict``; we follow."""
        return self._internal_dict

    def __getattr__(self, name):
        # as diffusers: a config key read as an attribute answers, with a deprecation warning
        config = self.__dict__.get("_internal_dict")
        if config is not None and name in config:
            warnings.warn(
                f"Accessing config attribute {name!r} directly via {type(self).__name__!r} object attribute is "
                f"deprecated (as in diffusers); read it from the config instead: 'scheduler.config.{name}'",
                FutureWarning,
                stacklevel=2,
            )
            return config[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def register_to_config(self, **kwargs) -> None:
        """Set config keys (any key, as diffusers' ``ConfigMixin.register_to_config``; ours are checked, with an
        error naming the key). A changed option takes effect at the next :meth:`set_timesteps`."""
        kwargs.pop("kwargs", None)
        self._internal_dict = _config.updated_config(self.config, kwargs)

    @property
    def compatibles(self) -> list:
        """The scheduler classes that ``from_config(scheduler.config)`` can build: this class, then our other
        public scheduler (DPM2 or DPM2 a), then diffusers' that share KDPM2's config (when diffusers is
        installed; they are looked up by name, as diffusers does)."""
        return self._get_compatibles()

    @classmethod
    def _get_compatibles(cls) -> list:
        ours = [cls] + [other for other in _KDPM2Scheduler.__subclasses__() if other is not cls]
        try:
            diffusers = importlib.import_module("diffusers")
        except ImportError:  # an optional dependency: without it, ours alone
            return ours
        return ours + [getattr(diffusers, name) for name in cls._compatibles if hasattr(diffusers, name)]

    @property
    def backend(self):
        """The backend object the scheduler computes with."""
        return self._backend

    def _options(self) -> dict:
        return _config.validate_config(self.config)

    @classmethod
    def from_config(
        cls, config=None, return_unused_kwargs: bool = False, *, backend=None, check_finite: bool = False, **overrides
    ):
        """Build from a diffusers config (any diffusers scheduler's), with keyword overrides, as diffusers'
        ``from_config`` does: options the source left at its defaults (its ``_use_default_values``) take ours,
        and the source's other keys stay in the new config, unused, so that switching back restores them. With
        ``return_unused_kwargs=True``, returns ``(scheduler, the keys it did not use)``."""
        if config is None:
            config = {}
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict (a scheduler's .config), got {type(config).__name__}")
        options, unused, kept = _config.split_config(
            config, overrides, f"{cls.__name__}.from_config", warn=not return_unused_kwargs, class_name=cls.__name__
        )
        scheduler = cls(**options, backend=backend, check_finite=check_finite)
        if kept:
            scheduler.register_to_config(**kept)
        return (scheduler, unused) if return_unused_kwargs else scheduler

    @classmethod
    def load_config(
        cls, pretrained_model_name_or_path, subfolder: str | None = None, return_unused_kwargs: bool = False, **kwargs
    ):
        """The config dict of a local ``scheduler_config.json``: a file, or a directory holding one (in
        ``subfolder`` if it is there, else at the top, as diffusers looks). Nothing is downloaded; diffusers'
        download options are accepted and unused. With ``return_unused_kwargs``: ``(config, other kwargs)``."""
        path = Path(pretrained_model_name_or_path)
        if path.is_dir():
            inner = path / subfolder / cls.config_name if subfolder else None
            if inner is not None and (inner.is_file() or not (path / cls.config_name).is_file()):
                path = inner  # when neither is there, the error names the subfolder the caller asked for
            else:
                path = path / cls.config_name
        config = _config.load_config_file(path)
        others = {key: value for key, value in kwargs.items() if key not in _config.DOWNLOAD_OPTIONS}
        return (config, others) if return_unused_kwargs else config

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path,
        subfolder: str | None = None,
        return_unused_kwargs: bool = False,
        *,
        backend=None,
        **kwargs,
    ):
        """Build from a local ``scheduler_config.json`` (as saved by diffusers or :meth:`save_config`), found as
        :meth:`load_config` finds it; other keywords go to :meth:`from_config`."""
        config, overrides = cls.load_config(
            pretrained_model_name_or_path, subfolder, return_unused_kwargs=True, **kwargs
        )
        return cls.from_config(config, return_unused_kwargs, backend=backend, **overrides)

    def to_json_string(self) -> str:
        """The config as diffusers writes it: every key, sorted, with ``_class_name`` and ``_diffusers_version``.

        As in diffusers, those two keys are then recorded in the config too, so that a scheduler loaded from the
        written file has this scheduler's config (less ``_use_default_values``: a file sets every option)."""
        # checked first: a bad value is not written
        written = _config.to_json_dict({**self.config, **self._options()}, type(self).__name__)
        self.register_to_config(_class_name=written["_class_name"], _diffusers_version=written["_diffusers_version"])
        return json.dumps(written, indent=2, sort_keys=True) + "\n"

    def save_config(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **_ignored) -> Path:
        """Write a diffusers-format ``scheduler_config.json`` into ``save_directory``; returns its path."""
        if push_to_hub:
            raise NotImplementedError("push_to_hub is not supported: save locally, then upload the directory")
        directory = Path(save_directory)
        if directory.is_file():
            raise ValueError(f"save_directory {str(directory)!r} is a file, not a directory")
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / self.config_name
        target.write_text(self.to_json_string(), encoding="utf-8")
        return target

    save_pretrained = save_config

    # -- the training table -----------------------------------------------------------------------------------
    def _training_table(self):
        options = self._options()
        key = tuple(options[k] for k in TRAINING_OPTIONS)
        if self._training is None or self._training[0] != key:
            self._training = (key, training_table(*key))
        return self._training[1]

    @property
    def betas(self):
        """The training betas (float32, equal to diffusers' bit for bit)."""
        return self._backend.asarray(self._training_table().betas)

    @property
    def alphas_cumprod(self):
        """Cumulative products of ``1 - betas`` (float32)."""
        return self._backend.asarray(self._training_table().alphas_cumprod)

    def __len__(self) -> int:
        return self.config["num_train_timesteps"]

    # -- the schedule -----------------------------------------------------------------------------------------
    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device=None,
        num_train_timesteps: int | None = None,
        *,
        sigmas=None,
        mu: float | None = None,
        timesteps=None,
    ) -> None:
        """Install the schedule for ``num_inference_steps`` steps, or for custom decreasing ``sigmas``.

        ``sigmas`` is k-diffusion style: the whole sequence including the final sigma (usually 0), one step
        per consecutive pair. ``timesteps`` and ``sigmas`` are then backend arrays on ``device``.

        Flow-matching schedules take the arguments as diffusers' ``FlowMatchEulerDiscreteScheduler`` does:
        ``sigmas`` are the step values of ``s`` before the shift (the final 0 is appended), ``mu`` is the
        dynamic shift (required with ``use_dynamic_shifting``, ignored without it, as in diffusers), and
        ``timesteps`` stands for ``sigmas = timesteps / num_train_timesteps`` (the timesteps the model then
        sees are those of the shifted schedule, ``s * num_train_timesteps``).
        """
        options = self._options()
        flow = _config.is_flow(options)
        if flow and not options["use_dynamic_shifting"]:
            mu = None  # ignored, as diffusers' flow schedulers do (Flux pipelines always pass it)
        if timesteps is not None:
            if not flow:
                raise ValueError("timesteps= is for flow-matching schedules; pass sigmas= (the timesteps follow them)")
            if sigmas is not None:
                raise ValueError("pass sigmas or timesteps, not both: DPM2's timesteps follow its sigmas")
            train = _config.positive_int("num_train_timesteps", num_train_timesteps or options["num_train_timesteps"])
            host = self._backend.to_numpy(timesteps) if self._backend.owns(timesteps) else timesteps
            sigmas = np.asarray(host, dtype=np.float64) / train
        num_inference_steps = schedule_request(num_inference_steps, sigmas)
        if num_train_timesteps is not None:
            num_train_timesteps = _config.positive_int("num_train_timesteps", num_train_timesteps)
        if sigmas is not None and not isinstance(sigmas, (list, tuple, np.ndarray)):
            sigmas = self._backend.to_numpy(sigmas) if self._backend.owns(sigmas) else sigmas
        host = build_schedule(
            options,
            num_inference_steps,
            sigmas=sigmas,
            num_train_timesteps=num_train_timesteps,
            mu=mu,
            eta=self._eta,
        )
        # what built this schedule, so that state_dict() can rebuild it exactly in another process
        self._schedule_config = self.config
        self._schedule_request = {
            "num_inference_steps": num_inference_steps,
            "sigmas": None if sigmas is None else np.asarray(sigmas, dtype=np.float64).tolist(),
            "num_train_timesteps": num_train_timesteps,
            "mu": mu,
        }
        backend = self._backend
        placed = backend.device(device)
        self.num_inference_steps = num_inference_steps if sigmas is None else (len(host.sigmas) - 2) // 2
        self._host = host
        self._rows = [tuple(row) for row in host.table.tolist()]
        self._recipes = table_recipes(host.table)
        scales = input_scale(host.sigma_in, flow)
        self._input_scale = scales.tolist()
        self._factors = backend.factors(scales, placed)  # the same scales as 0-d float32 arrays, or None
        # the same rows as one small float32 device array (float32: every device has it), read only while
        # torch.compile traces us: indexing it with the step index keeps one graph for every step
        self._device_rows = backend.asarray(
            np.column_stack([host.table[:, _TRACED], scales]).astype(np.float32), device=placed
        )
        self._rescaled = bool(np.any((host.table[:, 0] != 0) & (host.table[:, 0] != 1)))
        self._host_timesteps = host.timesteps.astype(np.float32)
        self._first_timestep = float(self._host_timesteps[0])
        self._first_start = self._loop_start(self._first_timestep)
        self.timesteps = backend.asarray(self._host_timesteps, device=placed)
        self.sigmas = backend.asarray(host.sigmas.astype(np.float32), device=placed)
        self._init_noise_sigma = host.init_noise_sigma
        self._step_index = None
        self._begin_index = None
        self._stored = None

    @property
    def schedule(self) -> Schedule:
        """The float64 host schedule the last ``set_timesteps`` built: timesteps, sigmas, the sigma the model
        sees at each substep and the coefficient table (see :mod:`kdpm2core.schedule`). Shared, not copied:
        read it, do not modify it. :func:`kdpm2core.functional.make_plan` builds a plan from it."""
        return self._host

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the initial noise."""
        return self._init_noise_sigma

    @property
    def step_index(self) -> int | None:
        """Index of the next substep; advances by one on each ``step``."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """The first substep, when a pipeline set it with :meth:`set_begin_index`."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at substep ``begin_index`` (img2img and inpainting start mid-schedule)."""
        try:
            begin_index = operator.index(begin_index)
        except TypeError:
            raise TypeError(
                f"begin_index must be an integer, got {type(begin_index).__name__} {begin_index!r}"
            ) from None
        if not 0 <= begin_index < len(self._rows):
            raise ValueError(f"begin_index must be in [0, {len(self._rows) - 1}], got {begin_index}")
        self._begin_index = begin_index

    @property
    def state_in_first_order(self) -> bool:
        """True before an Euler substep, False when a midpoint substep is due."""
        return self._stored is None

    def index_for_timestep(self, timestep, schedule_timesteps=None) -> int:
        """Position of ``timestep`` in the schedule; with duplicates the second one, as diffusers does, so that
        starting mid-schedule never skips a sigma."""
        schedule = self._host_timesteps if schedule_timesteps is None else self._host_array(schedule_timesteps)
        value = self._host_array(timestep)
        if value.size != 1:
            raise ValueError(f"timestep must be a single value, got shape {value.shape}")
        # a float timestep is rounded to a float schedule's dtype, as diffusers' comparison does (a float64
        # 978.33 matches the float32 978.33); against integers it is compared as it is (998.5 matches nothing)
        wanted = value.astype(schedule.dtype) if schedule.dtype.kind == "f" else value
        matches = np.flatnonzero(schedule == wanted.reshape(()))
        if matches.size == 0:
            raise ValueError(f"timestep {value.item()!r} is not in the schedule; use a value from scheduler.timesteps")
        return int(matches[1 if matches.size > 1 else 0])

    def _host_array(self, value) -> np.ndarray:
        if self._backend.owns(value):
            return np.asarray(self._backend.to_numpy(value))
        if value is None or isinstance(value, (str, bytes)):  # np.asarray makes None NaN and "999" a number
            raise TypeError(f"timestep must be a number or an array, got {type(value).__name__} {value!r}")
        try:
            return np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"timestep must be a number or an array, got {type(value).__name__}") from None

    def _init_step_index(self, timestep) -> None:
        if self._begin_index is not None:
            self._step_index = self._begin_index
            return
        if self._owns(timestep) and self._compiling(timestep):  # traced: its value is known on the device only
            raise RuntimeError(
                "under torch.compile the scheduler cannot find the first timestep in the schedule without a host "
                "sync: call scheduler.set_begin_index(0) (or the substep to start at) before the loop, as diffusers "
                "pipelines do; see 'torch.compile the stateful loop' in docs/torch.md"
            )
        # the usual first timestep (scheduler.timesteps[0], or its value as a number) costs one comparison,
        # instead of a conversion to the host and a search of the schedule
        if type(timestep) in (int, float) or (self._owns(timestep) and getattr(timestep, "ndim", None) == 0):
            try:
                if float(timestep) == self._first_timestep:
                    self._step_index = self._first_start
                    return
            except (TypeError, ValueError, RuntimeError):  # complex, meta, ...: the general rule's error
                pass
        self._step_index = self._loop_start(timestep)

    def _loop_start(self, timestep) -> int:
        """Where a loop whose first timestep is ``timestep`` starts: :meth:`index_for_timestep`, except that a
        midpoint substep cannot start a loop. The duplicate rule lands on one when sigmas above the training
        range clamp a step and its midpoint to the same timestep; the loop then starts at its Euler half."""
        index = self.index_for_timestep(timestep)
        if self._rows[index][0]:
            index = int(np.flatnonzero(self._host_timesteps == self._host_timesteps[index])[0])
        return index

    def _current_row(self, timestep) -> int:
        """The step index, found from ``timestep`` on the first substep. The per-substep methods call this only
        when the index is unset or past the end, so a substep of a small latent spends no Python on it."""
        if self._step_index is None:
            self._init_step_index(timestep)
        if self._step_index >= len(self._rows):
            raise ValueError(
                f"step_index {self._step_index} is past the end of the schedule ({len(self._rows)} substeps); "
                "call set_timesteps again before sampling again"
            )
        return self._step_index

    def _check_array(self, name: str, x) -> None:
        check_array(self._backend, name, x)

    # -- the loop ---------------------------------------------------------------------------------------------
    # The checks of scale_model_input and step are inlined (the helpers above run only when one fails): on a
    # small latent the scheduler's Python is a visible part of a substep's time.
    def scale_model_input(self, sample, timestep):
        """The model input at the current substep: ``sample / sqrt(sigma**2 + 1)``; for a flow-matching model the
        sample as it is (a new array of equal values)."""
        if not self._owns(sample):
            self._check_array("sample", sample)
        compiling = self._compiling(sample, timestep)  # first: a backend that cannot trace the scheduler raises here
        k = self._step_index
        if k is None or k >= len(self._rows):
            k = self._current_row(timestep)
        if compiling:
            return sample * self._device_rows[k][_SCALE]
        if self._factors is not None and sample.dtype == self._float32:
            return sample * self._factors[k]
        return sample * self._input_scale[k]

    def _step(self, model_output, timestep, sample, generator, return_dict: bool):
        """Advance one substep (the subclasses' ``step``). Returns ``(prev_sample, pred_original_sample)``, as an
        output object when ``return_dict`` is true. Inputs are never modified."""
        if not (self._owns(sample) and self._owns(model_output)):
            self._check_array("sample", sample)
            self._check_array("model_output", model_output)
        if model_output.shape != sample.shape:
            raise ValueError(
                f"model_output has shape {tuple(model_output.shape)} but sample has shape {tuple(sample.shape)}"
            )
        compiling = self._compiling(sample, model_output, timestep)
        k = self._step_index
        if k is None or k >= len(self._rows):
            k = self._current_row(timestep)
        if compiling:
            # Traced by torch.compile: Python floats picked by the step index would be frozen into the graph
            # (one graph per step), so read the coefficients as 0-d arrays from the device rows, and the
            # substep kind from the state (rows alternate Euler, midpoint; ``a`` is 0 or 1).
            # ``a`` is 1 on midpoint rows but for DPM2 a on a flow schedule (its ``alpha_ratio``, see schedule.py)
            first = self._stored is None
            device_row = self._device_rows[k]
            a = 0.0 if first else (device_row[5] if self._rescaled else 1.0)
            n = 0.0 if first or not self._eta else device_row[4]  # only midpoint substeps add noise
            row = (a, device_row[0], device_row[1], device_row[2], device_row[3], None, n)  # COLUMNS' order
            recipes = substep_recipes(row)
        else:
            row, recipes = self._rows[k], self._recipes[k]
            first, n = row[5], row[6]
            if row[0] and self._stored is None:
                raise ValueError(
                    f"substep {k} is a midpoint substep but no Euler substep preceded it; start at an even begin_index"
                )
        if self.check_finite:
            self._require_finite(k, model_output=model_output, sample=sample)
        # a Python zero: no noise term (a 0-d device coefficient always gets one)
        noise = None if exactly(n, 0) else self._noise(model_output, generator, k)
        arrays = (self._stored, sample, model_output, noise)
        combine = self._backend.combine
        prev, pred = combine(recipes[0], row, arrays), combine(recipes[1], row, arrays)
        if self.check_finite:
            self._require_finite(k, prev_sample=prev)
        self._stored = sample if first else None
        self._step_index = k + 1
        if not return_dict:
            return prev, pred
        return KDPM2DiscreteSchedulerOutput(prev, pred)

    def _require_finite(self, k: int, **arrays) -> None:
        xp = self._backend.xp
        for name, x in arrays.items():
            count = int(xp.sum(xp.astype(~xp.isfinite(x), xp.int32)))  # int32: JAX has no int64 by default
            if count:
                kind = "midpoint substep" if self._rows[k][0] else "Euler substep"
                raise NonFiniteError(name, k, float(self._host.sigma_in[k]), count, kind)

    def add_noise(self, original_samples, noise, timesteps):
        """``original_samples + noise * sigma(timesteps)`` (training, img2img and inpainting); for a flow-matching
        model ``(1 - s) * original_samples + s * noise``."""
        self._check_array("original_samples", original_samples)
        self._check_array("noise", noise)
        if self._begin_index is None:  # training, or a pipeline that never called set_begin_index
            values = self._host_array(timesteps).reshape(-1)
            indices = [self.index_for_timestep(t, self._host_timesteps) for t in values]
        else:  # img2img before the first step, inpainting after it
            count = int(np.prod(getattr(timesteps, "shape", np.shape(timesteps))))
            index = self._begin_index if self._step_index is None else self._step_index
            indices = [index] * count
        # as diffusers: the float32 sigmas rounded to the samples' dtype, one per batch entry (an array, never a
        # Python float: that would skip the rounding in half precision, and a float32 sample with float16 noise
        # would get a float16 product)
        sigmas = self._host.sigmas[indices].astype(np.float32)
        xp = self._backend.xp
        shape = (len(indices),) + (1,) * (original_samples.ndim - 1)
        sigma = self._backend.asarray(
            sigmas.reshape(shape), dtype=original_samples.dtype, device=self._backend.device_of(original_samples)
        )
        sigma = xp.astype(sigma, original_samples.dtype)
        if _config.is_flow(self._schedule_config):
            return noise * sigma + original_samples * (1.0 - sigma)
        return original_samples + noise * sigma

    def scale_noise(self, sample, timestep, noise):
        """:meth:`add_noise` with ``FlowMatchEulerDiscreteScheduler.scale_noise``'s argument order (flow-matching
        img2img pipelines call this)."""
        return self.add_noise(sample, noise, timestep)

    # -- checkpoint and resume --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue this run elsewhere, also between an Euler and a midpoint substep.

        Every value is plain JSON data except ``"stored"``: the sample of the last Euler substep (a backend
        array, not copied) or None. :mod:`kdpm2core.checkpoint` writes it to disk without pickle. The config is
        the one the current schedule was built with; ``schedule_sha256`` lets a loader prove it rebuilt the
        same schedule (a different kdpm2 version might not).
        """
        return {
            "format": self._state_format(),
            "config": _config.to_state_config(self._schedule_config, VERSION),
            "schedule": dict(self._schedule_request),
            "schedule_sha256": self._schedule_digest(),
            "step_index": self._step_index,
            "begin_index": self._begin_index,
            "stored": self._stored,
            **self._noise_state(),
        }

    def load_state_dict(self, state: dict, device=None) -> None:
        """Continue the run captured by :meth:`state_dict`: config, schedule, indices and stored sample.

        The scheduler takes the saved config and rebuilds the schedule on ``device``; ``state["stored"]`` must
        be an array of this scheduler's backend (or None). Everything is checked before anything changes:
        a TypeError or ValueError names the offending entry.
        """
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from state_dict(), got {type(state).__name__}")
        expected = {"format", "config", "schedule", "schedule_sha256", "step_index", "begin_index", "stored"}
        expected |= set(self._noise_state())
        if set(state) != expected:
            raise ValueError(f"state has keys {sorted(state)}; expected {sorted(expected)}")
        if state["format"] != self._state_format():
            raise ValueError(f"state format is {state['format']!r}; this scheduler reads {self._state_format()!r}")
        config, schedule = state["config"], state["schedule"]
        if not isinstance(config, dict):
            raise TypeError(f"state['config'] must be a dict, got {type(config).__name__}")
        keys = {"num_inference_steps", "sigmas", "num_train_timesteps"}
        if not isinstance(schedule, dict) or not keys <= set(schedule) <= keys | {"mu"}:
            raise ValueError(
                "state['schedule'] must be a dict with keys num_inference_steps, sigmas, num_train_timesteps (and mu)"
            )
        sigmas = schedule["sigmas"]
        if sigmas is not None and not (
            isinstance(sigmas, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in sigmas)
        ):
            raise TypeError("state['schedule']['sigmas'] must be null or a list of numbers")
        for key in ("num_inference_steps", "num_train_timesteps"):  # a tampered state must not exhaust memory
            if isinstance(schedule[key], int) and schedule[key] > _config.MAX_TRAIN_TIMESTEPS:
                raise ValueError(
                    f"state['schedule'][{key!r}] must be at most {_config.MAX_TRAIN_TIMESTEPS}, got {schedule[key]}"
                )
        if sigmas is not None and len(sigmas) > _config.MAX_TRAIN_TIMESTEPS:
            raise ValueError(f"state['schedule']['sigmas'] must have at most {_config.MAX_TRAIN_TIMESTEPS} values")
        restored = _config.from_state_config(config)
        fresh = type(self)(**_config.validate_config(restored), backend=self._backend, check_finite=self.check_finite)
        fresh._internal_dict = restored  # with its other keys, and the options left at their defaults
        fresh._load_noise_state(state)
        fresh.set_timesteps(
            schedule["num_inference_steps"],
            device,
            schedule["num_train_timesteps"],
            sigmas=sigmas,
            mu=schedule.get("mu"),
        )
        if state["schedule_sha256"] != fresh._schedule_digest():
            raise ValueError(
                f"the schedule rebuilt from this state differs from the saved one (saved by kdpm2 "
                f"{config.get('_kdpm2_version')!r}, this is {VERSION}); the state was edited or is from another version"
            )
        count = len(fresh._rows)
        step_index = _optional_index("step_index", state["step_index"], count)
        begin_index = _optional_index("begin_index", state["begin_index"], count - 1)
        stored = state["stored"]
        after_euler = step_index is not None and step_index > 0 and fresh._rows[step_index - 1][5] == 1
        if stored is not None:
            fresh._check_array("state['stored']", stored)
            if not after_euler:
                raise ValueError(f"state['stored'] is set, but substep {step_index} does not follow an Euler substep")
        elif after_euler and step_index < count and step_index != begin_index:
            raise ValueError(f"substep {step_index} is a midpoint substep: the state must hold the stored sample")
        fresh._step_index, fresh._begin_index, fresh._stored = step_index, begin_index, stored
        self.__dict__.update(fresh.__dict__)  # all checks passed: take the new state at once

    @classmethod
    def _state_format(cls) -> str:
        return STATE_FORMAT.format(cls.__name__)

    # -- noise (the ancestral subclass adds it; the deterministic scheduler has none) --------------------------
    def _noise_state(self) -> dict:
        """The entries of :meth:`state_dict` that say where the noise comes from."""
        return {}

    def _load_noise_state(self, state: dict) -> None:
        """Take the noise entries of a checked ``state`` (see :meth:`_noise_state`)."""

    def _noise(self, model_output, generator, k: int):
        raise NotImplementedError  # unreachable: rows of a deterministic table have n = 0

    def _schedule_digest(self) -> str:
        host = self._host
        digest = hashlib.sha256()
        for part in (host.table, host.timesteps, host.sigmas, host.sigma_in):
            digest.update(np.ascontiguousarray(part, dtype=np.float64).tobytes())
        return digest.hexdigest()

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self._options().items() if _config.DEFAULTS[k] != v)
        return f"{type(self).__name__}({options}{', ' if options else ''}backend={self._backend.name!r})"


def _optional_index(name: str, value, maximum: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"state[{name!r}] must be null or an integer, got {type(value).__name__}")
    if not 0 <= value <= maximum:
        raise ValueError(f"state[{name!r}] must be in [0, {maximum}], got {value}")
    return value


class KDPM2DiscreteScheduler(_KDPM2Scheduler):
    __doc__ = _KDPM2Scheduler.__doc__

    def step(self, model_output, timestep, sample, return_dict: bool = True):
        """Advance one substep. Returns ``(prev_sample, pred_original_sample)``, as an output object when
        ``return_dict`` is true. Inputs are never modified."""
        return self._step(model_output, timestep, sample, None, return_dict)


class KDPM2AncestralDiscreteScheduler(_KDPM2Scheduler):
    """DPM2 a, the ancestral KDPM2 sampler, with the interface of diffusers' class of the same name.

    Each step goes from ``sigma`` down to ``sigma_down`` through the midpoint ``sqrt(sigma * sigma_down)``, then
    adds ``sigma_up`` times fresh standard normal noise, with ``sigma_down**2 + sigma_up**2 == sigma_next**2``
    (``eta = 1``, as diffusers); the last step, to 0, is one Euler substep without noise. The constructor takes
    :class:`KDPM2DiscreteScheduler`'s arguments, and ``noise_seed``.

    Where the noise comes from: ``step(..., generator=g)`` draws it from ``g``, a generator of the backend
    (``torch.Generator``, ``numpy.random.Generator``; or a list of them, one per batch item), exactly as
    diffusers does with ``randn_tensor``, so that a pipeline given a generator makes diffusers' images. Without
    a generator it is :func:`kdpm2core.noise.normal` of ``noise_seed`` and the substep: the same noise on every
    backend, for each batch item whatever the batch, and nothing else (``noise_seed`` is random when not given;
    read or set it as the attribute). :meth:`state_dict` then holds the whole noise state, so a resumed run adds
    the same noise. A generator is the caller's: save its state (``generator.get_state()``) beside the
    scheduler's to resume such a run.
    """

    _eta = 1.0

    def __init__(self, *args, noise_seed: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.noise_seed = noise_seed

    __init__.__signature__ = inspect.signature(_KDPM2Scheduler.__init__).replace(
        parameters=[
            *inspect.signature(_KDPM2Scheduler.__init__).parameters.values(),
            inspect.Parameter("noise_seed", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="int | None"),
        ]
    )

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, *, noise_seed: int | None = None, **kwargs):
        """:meth:`KDPM2DiscreteScheduler.from_config`, and ``noise_seed`` (not a config key): pipelines do not pass
        their generator to ``step`` (SD3 and Flux among them), so this seed is what makes their runs repeatable."""
        built = super().from_config(config, return_unused_kwargs, **kwargs)
        (built[0] if return_unused_kwargs else built).noise_seed = noise_seed
        return built

    @property
    def noise_seed(self) -> int:
        """The seed of the noise drawn without a generator (a non-negative integer below ``2**63``)."""
        return self._noise_seed

    @noise_seed.setter
    def noise_seed(self, seed) -> None:
        if seed is None:
            seed = secrets.randbits(63)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"noise_seed must be None or an integer, got {type(seed).__name__} {seed!r}")
        if not 0 <= seed < 2**63:
            raise ValueError(f"noise_seed must be in [0, 2**63), got {seed}")
        self._noise_seed = seed

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True):
        """Advance one substep; a midpoint substep adds ``sigma_up`` times noise from ``generator`` (see the
        class). Returns ``(prev_sample, pred_original_sample)``, as an output object when ``return_dict`` is
        true. Inputs are never modified."""
        return self._step(model_output, timestep, sample, generator, return_dict)

    def _noise(self, model_output, generator, k: int):
        backend = self._backend
        shape, dtype, device = tuple(model_output.shape), model_output.dtype, backend.device_of(model_output)
        if generator is None:  # the portable noise of (noise_seed, substep): the same on every backend
            return noise.normal(backend.xp, self._noise_seed, shape, substep=k, dtype=dtype, device=device)
        if not isinstance(generator, (list, tuple)):
            return _draw(backend, generator, shape, dtype, device)
        if len(generator) != shape[0]:
            raise ValueError(f"generator is a list of {len(generator)} generators but the batch has {shape[0]} items")
        parts = [_draw(backend, g, (1, *shape[1:]), dtype, device) for g in generator]  # one per item, as diffusers
        return backend.xp.concat(parts, axis=0)

    def _noise_state(self) -> dict:
        return {"noise_seed": self._noise_seed}

    def _load_noise_state(self, state: dict) -> None:
        try:
            self.noise_seed = state["noise_seed"]
        except (TypeError, ValueError) as error:
            raise type(error)(f"state['noise_seed']: {error}") from None


def _draw(backend, generator, shape: tuple, dtype, device):
    """Standard normal noise from the caller's generator, which must advance in place (as diffusers' do)."""
    values, after = backend.normal(generator, shape, dtype=dtype, device=device)
    if after is not generator:
        raise TypeError(
            f"generator must be a generator that advances in place (backend {backend.name!r} returned a new one, "
            "so every step would get the same noise); leave generator=None to use the scheduler's noise_seed"
        )
    return values
