"""The scheduler's configuration: validation, a read-only dict, and diffusers-format JSON files.

Loading never unpickles or evaluates anything: a config file is size-limited JSON, and every value is
checked for type and range with an error that names the key.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import numbers
import operator
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np

__all__ = ["DEFAULTS", "FrozenConfig", "validate_config", "load_config_file", "CONFIG_NAME", "MAX_CONFIG_BYTES"]

CONFIG_NAME = "scheduler_config.json"
CLASS_NAME = "KDPM2DiscreteScheduler"
USE_DEFAULT_VALUES = "_use_default_values"  # diffusers' config key listing the options left at their defaults
DIFFUSERS_FORMAT_VERSION = "0.42.1"  # the diffusers release whose config files ours are checked against
MAX_CONFIG_BYTES = 1 << 20
MAX_TRAIN_TIMESTEPS = 100_000  # models train with 1000; a bound keeps a downloaded config from exhausting memory

DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "linear",
    "trained_betas": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "prediction_type": "epsilon",
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    # flow matching (rectified flow): DPMSolverMultistepScheduler's spelling ...
    "use_flow_sigmas": False,
    "flow_shift": 1.0,
    # ... and FlowMatchEulerDiscreteScheduler's, so that SD3 and Flux configs load as they are
    "shift": 1.0,
    "use_dynamic_shifting": False,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "shift_terminal": None,
    "time_shift_type": "exponential",
    "invert_sigmas": False,
    "stochastic_sampling": False,
}
CHOICES = {
    "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "prediction_type": ("epsilon", "v_prediction", "sample", "flow_prediction"),
    "timestep_spacing": ("linspace", "leading", "trailing"),
    "time_shift_type": ("exponential", "linear"),
}
#: the flow-matching options (diffusers' KDPM2 has none of them)
FLOW_OPTIONS = tuple(DEFAULTS)[tuple(DEFAULTS).index("use_flow_sigmas") :]
# the diffusers schedulers whose configs describe a flow-matching model: their configs carry no prediction_type
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler", "FlowMatchLCMScheduler")
# FlowMatchEulerDiscreteScheduler options that select a behaviour DPM2 does not have
UNSUPPORTED_FLOW_OPTIONS = {
    "invert_sigmas": "sigmas that increase (1 - s), used to invert an image into noise",
    "stochastic_sampling": "re-noising each step with fresh noise (a stochastic Euler sampler)",
}
# diffusers' from_pretrained options for downloading from the Hub: ours reads local files only, so they are
# accepted and have nothing to do (as in diffusers for a local directory)
DOWNLOAD_OPTIONS = frozenset(
    {
        "cache_dir",
        "force_download",
        "proxies",
        "local_files_only",
        "token",
        "revision",
        "mirror",
        "user_agent",
        "local_dir",
        "local_dir_use_symlinks",
    }
)
SIGMA_FAMILIES = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")

# Keys other diffusers schedulers put in their configs: a config built from theirs keeps them, unused and
# quietly, as diffusers does for its compatible schedulers. Any other unknown key is kept with a warning.
FOREIGN_SCHEDULER_KEYS = frozenset(
    """clip_sample clip_sample_range set_alpha_to_one skip_prk_steps variance_type thresholding
    dynamic_thresholding_ratio sample_max_value rescale_betas_zero_snr interpolation_type timestep_type
    sigma_min sigma_max final_sigmas_type algorithm_type solver_order solver_type lower_order_final
    use_lu_lambdas euler_at_final lambda_min_clipped variance_type
    disable_corrector solver_p predict_x0 eta sigma_data rho s_noise final_sigmas_type
    num_inference_steps sigma_schedule noise_sampler_seed""".split()
)


class FrozenConfig(dict):
    """A read-only dict whose keys are also attributes (``config.prediction_type``), as diffusers' configs."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"config has no key {key!r}") from None

    def _read_only(self, *args, **kwargs):
        raise TypeError("the scheduler config is read-only; build a new scheduler with from_config(config, key=value)")

    __setattr__ = __delattr__ = __setitem__ = __delitem__ = _read_only
    clear = pop = popitem = setdefault = update = __ior__ = _read_only

    def __reduce__(self):
        return (type(self), (dict(self),))

    def __repr__(self):
        return f"FrozenConfig({dict.__repr__(self)})"


def _int(key, value, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{key} must be an integer, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{key} must be >= {minimum}, got {value}")
    return int(value)


def positive_int(name: str, value) -> int:
    """``value`` as an int >= 1, or a TypeError/ValueError naming ``name`` (bools are refused)."""
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be a positive integer, got {type(value).__name__} {value!r}") from None
    if isinstance(value, bool) or number < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return number


def _float(key, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{key} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{key} must be finite, got {value}")
    return float(value)


def _bool(key, value):
    if not isinstance(value, (bool, np.bool_)):  # NumPy's bool too (configs built from arrays); never 0 or 1
        raise TypeError(f"{key} must be true or false, got {type(value).__name__} {value!r}")
    return bool(value)


def _optional_float(key, value):
    return None if value is None else _float(key, value)


def _choice(key, value):
    if not isinstance(value, str):
        raise TypeError(f"{key} must be a string, got {type(value).__name__} {value!r}")
    if value not in CHOICES[key]:
        raise ValueError(f"{key} must be one of {', '.join(CHOICES[key])}; got {value!r}")
    return value


def _betas(key, value):
    if value is None:
        return None
    if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__len__"):
        raise TypeError(f"{key} must be a sequence of numbers or null, got {type(value).__name__}")
    try:
        values = [float(v) for v in (value.tolist() if hasattr(value, "tolist") else value)]
    except (TypeError, ValueError):
        raise TypeError(f"{key} must be a 1-D sequence of numbers") from None
    if not values:
        raise ValueError(f"{key} must not be empty")
    if not all(math.isfinite(v) and 0 < v < 1 for v in values):
        raise ValueError(f"{key} must all be finite and inside (0, 1)")
    return tuple(values)


def validate_config(values: Mapping) -> dict:
    """Checked, normalised scheduler options (known keys only), or a TypeError/ValueError naming the key."""
    out = dict(DEFAULTS)
    out.update({k: v for k, v in values.items() if k in DEFAULTS})
    out["num_train_timesteps"] = _int("num_train_timesteps", out["num_train_timesteps"], 1)
    if out["num_train_timesteps"] > MAX_TRAIN_TIMESTEPS:
        raise ValueError(f"num_train_timesteps must be at most {MAX_TRAIN_TIMESTEPS}, got {out['num_train_timesteps']}")
    out["steps_offset"] = _int("steps_offset", out["steps_offset"], 0)
    for key in ("beta_start", "beta_end"):
        out[key] = _float(key, out[key])
    for key in SIGMA_FAMILIES:
        out[key] = _bool(key, out[key])
    for key in CHOICES:
        out[key] = _choice(key, out[key])
    out["trained_betas"] = _betas("trained_betas", out["trained_betas"])
    if out["trained_betas"] is not None and len(out["trained_betas"]) != out["num_train_timesteps"]:
        # the timesteps run over num_train_timesteps while the sigmas come from one beta per training step:
        # with other lengths the two disagree and the schedule is meaningless (it can repeat its first timestep)
        raise ValueError(
            f"trained_betas must have one value per training timestep: got {len(out['trained_betas'])} values "
            f"but num_train_timesteps={out['num_train_timesteps']}"
        )
    if out["trained_betas"] is None:
        for key in ("beta_start", "beta_end"):
            if not 0 < out[key] < 1:
                raise ValueError(f"{key} must be inside (0, 1), got {out[key]}")
    switched_on = [key for key in SIGMA_FAMILIES if out[key]]
    if len(switched_on) > 1:
        raise ValueError(f"only one sigma family can be switched on, got {', '.join(switched_on)}")
    _validate_flow(out)
    return out


def _validate_flow(out: dict) -> None:
    """Check and normalise the flow-matching options of ``out`` in place."""
    for key in ("use_flow_sigmas", "use_dynamic_shifting", *UNSUPPORTED_FLOW_OPTIONS):
        out[key] = _bool(key, out[key])
    for key, what in UNSUPPORTED_FLOW_OPTIONS.items():
        if out[key]:
            raise ValueError(f"{key}=True ({what}) is not supported by the DPM2 sampler; set {key}=False")
    for key in ("base_image_seq_len", "max_image_seq_len"):
        out[key] = _int(key, out[key], 1)
    for key in ("base_shift", "max_shift"):  # read by pipelines to compute mu, never by the scheduler
        out[key] = _optional_float(key, out[key])
    for key in ("shift", "flow_shift"):
        out[key] = _float(key, out[key])
        if out[key] <= 0:
            raise ValueError(f"{key} must be > 0, got {out[key]}")
    out["shift_terminal"] = _optional_float("shift_terminal", out["shift_terminal"])
    if out["shift_terminal"] is not None and not 0 <= out["shift_terminal"] < 1:
        raise ValueError(f"shift_terminal must be in [0, 1) or null, got {out['shift_terminal']}")
    for key in ("use_flow_sigmas", "use_dynamic_shifting"):
        if out[key] and out["prediction_type"] != "flow_prediction":
            raise ValueError(f"{key}=True needs prediction_type='flow_prediction', got {out['prediction_type']!r}")
    if out["use_flow_sigmas"] and out["shift"] != 1.0 and out["shift"] != out["flow_shift"]:
        raise ValueError(
            f"shift={out['shift']} and flow_shift={out['flow_shift']} disagree: with use_flow_sigmas=True the shift "
            "is flow_shift; set one of them"
        )


def is_flow(options: Mapping) -> bool:
    """Whether validated ``options`` describe a flow-matching (rectified-flow) model."""
    return options["prediction_type"] == "flow_prediction"


def split_config(
    config: Mapping, overrides: Mapping, owner: str, *, warn: bool = True, class_name: str = CLASS_NAME
) -> tuple[dict, dict, dict]:
    """Split a scheduler config (any diffusers scheduler's) and keyword overrides as diffusers' ``from_config``
    does: ``(our options, the unused keys, the keys to keep in the new config)``.

    Keys the source left at its own defaults (its ``_use_default_values``) are dropped, so that ours apply. The
    kept keys are every other key of the source that is not one of our options (other schedulers' settings,
    ``_class_name``, ``_diffusers_version``): a scheduler built back from our config gets them again. Unknown
    keys that are neither private nor another diffusers scheduler's warn, naming them, unless ``warn`` is false
    (the caller takes the unused keys). ``class_name`` is the building class's (the kept ``_class_name``).
    """
    defaulted = config.get(USE_DEFAULT_VALUES) or ()
    if (
        isinstance(defaulted, str)
        or not isinstance(defaulted, (list, tuple))
        or not all(isinstance(k, str) for k in defaulted)
    ):
        raise TypeError(f"{USE_DEFAULT_VALUES} must be a list of option names, got {defaulted!r}")
    source_class = config.get("_class_name")
    if source_class is not None and not isinstance(source_class, (str, list, tuple)):
        raise ValueError(f"_class_name must be a string (or a list of strings), got {type(source_class).__name__}")
    source = {key: value for key, value in config.items() if key not in defaulted and key != USE_DEFAULT_VALUES}
    options = {
        key: overrides[key] if key in overrides else source[key]
        for key in DEFAULTS
        if key in overrides or key in source
    }
    if _is_flow_scheduler(source_class) and "prediction_type" not in options:
        options["prediction_type"] = "flow_prediction"  # a FlowMatch* scheduler's model predicts the velocity
    kept = {key: value for key, value in source.items() if key not in options}
    if "_class_name" in kept:
        kept["_class_name"] = class_name
    unexpected = {k: v for k, v in kept.items() if not str(k).startswith("_") and k not in FOREIGN_SCHEDULER_KEYS}
    if unexpected and warn:
        warnings.warn(
            f"{owner}: config keys {sorted(unexpected)} are not used by {class_name} and are ignored", stacklevel=3
        )
    unused = {**{k: v for k, v in overrides.items() if k not in DEFAULTS}, **kept}
    return options, unused, kept


def _is_flow_scheduler(class_name) -> bool:
    names = [class_name] if isinstance(class_name, str) else list(class_name or ())
    return any(name in FLOW_SCHEDULERS for name in names)


def updated_config(config: Mapping, changes: Mapping) -> FrozenConfig:
    """``config`` with ``changes`` (diffusers' ``register_to_config``): any key may be set; our options are
    checked first, with an error naming the key, and stored normalised."""
    merged = {**config, **changes}
    checked = validate_config(merged)
    return FrozenConfig({**merged, **{key: checked[key] for key in changes if key in DEFAULTS}})


def _json_value(value):
    if isinstance(value, (tuple, list)):
        return [_json_value(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return Path(value).as_posix()
    return value


def to_json_dict(config: Mapping, class_name: str = CLASS_NAME) -> dict:
    """The diffusers-format dict written to ``scheduler_config.json``: every key of the config, other schedulers'
    too, with ``_class_name`` and ``_diffusers_version``, but without ``_use_default_values`` (as diffusers
    writes it, a loaded file gives values for every option). The flow-matching options at their defaults are left
    out: diffusers' KDPM2 and the schedulers sharing its config would warn about keys they do not know, and a
    missing option reads as its default."""
    out = {
        key: _json_value(value)
        for key, value in config.items()
        if key not in (USE_DEFAULT_VALUES, "_ignore_files") and not (key in FLOW_OPTIONS and value == DEFAULTS[key])
    }
    out["_class_name"] = class_name
    out["_diffusers_version"] = diffusers_format_version(config)
    return out


def diffusers_format_version(config: Mapping) -> str:
    """The ``_diffusers_version`` a saved config carries: the installed diffusers' (what diffusers itself writes),
    else the one the config came with, else the diffusers release whose format this package writes."""
    try:
        return importlib.metadata.version("diffusers")  # the installed distribution's metadata: no import
    except importlib.metadata.PackageNotFoundError:
        recorded = config.get("_diffusers_version")
        return recorded if isinstance(recorded, str) else DIFFUSERS_FORMAT_VERSION


def to_state_config(config: Mapping, version: str) -> dict:
    """The config as JSON data for a scheduler's state: every key, ``_use_default_values`` too, and the version
    of kdpm2 that wrote it (``_kdpm2_version``)."""
    return {**{key: _json_value(value) for key, value in config.items()}, "_kdpm2_version": version}


def from_state_config(config: Mapping) -> FrozenConfig:
    """The config saved by :func:`to_state_config`, checked (our options by :func:`validate_config`, the list of
    defaulted options by name) and normalised; a TypeError or ValueError names the key."""
    restored = {key: value for key, value in config.items() if key != "_kdpm2_version"}
    defaulted = restored.get(USE_DEFAULT_VALUES, [])
    if not isinstance(defaulted, list) or not all(isinstance(key, str) and key in DEFAULTS for key in defaulted):
        raise TypeError(f"{USE_DEFAULT_VALUES} must be a list of option names, got {defaulted!r}")
    return FrozenConfig({**restored, **validate_config(restored)})


def load_config_file(path: str | os.PathLike, *, what: str = "config", limit: int = MAX_CONFIG_BYTES) -> dict:
    """Parse a diffusers ``scheduler_config.json`` (or another JSON object of ``what``, at most ``limit``
    bytes); a ValueError names the file when it is unusable."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise FileNotFoundError(f"no scheduler {what} at {str(path)!r}: {exc.strerror}") from None
    if size > limit:
        raise ValueError(f"{what} file {str(path)!r} is {size} bytes; the limit is {limit}")
    return parse_config_bytes(path.read_bytes(), source=str(path), what=what, limit=limit)


def parse_config_bytes(
    data: bytes, source: str = "<bytes>", *, what: str = "config", limit: int = MAX_CONFIG_BYTES
) -> dict:
    """Decode config JSON; any malformed input (duplicate keys too) gives a ValueError naming ``source``."""
    if len(data) > limit:
        raise ValueError(f"{what} {source!r} is {len(data)} bytes; the limit is {limit}")
    try:
        value = json.loads(data.decode("utf-8"), parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:  # ValueError: also bad UTF-8 and integers over 4300 digits
        raise ValueError(f"{what} {source!r} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} {source!r} must hold a JSON object, got {type(value).__name__}")
    return value


def _reject_constant(name):
    raise json.JSONDecodeError(f"{name} is not allowed in a config", name, 0)


def _unique_keys(pairs) -> dict:
    """A JSON object, refusing a key given twice (which value would win is a guess a reader should not make)."""
    value = dict(pairs)
    if len(value) != len(pairs):
        seen = set()
        duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise ValueError(f"key {duplicate!r} appears more than once")
    return value
