"""The scheduler's configuration: validation, a read-only dict, and diffusers-format JSON files.

Loading never unpickles or evaluates anything: a config file is size-limited JSON, and every value is
checked for type and range with an error that names the key.
"""

from __future__ import annotations

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
}
CHOICES = {
    "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "prediction_type": ("epsilon", "v_prediction", "sample"),
    "timestep_spacing": ("linspace", "leading", "trailing"),
}
SIGMA_FAMILIES = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")

# Keys other diffusers schedulers put in their configs; swapping schedulers ignores them quietly, as diffusers
# does for its compatible schedulers. Any other unknown key is ignored with a warning.
FOREIGN_SCHEDULER_KEYS = frozenset(
    """clip_sample clip_sample_range set_alpha_to_one skip_prk_steps variance_type thresholding
    dynamic_thresholding_ratio sample_max_value rescale_betas_zero_snr interpolation_type timestep_type
    sigma_min sigma_max final_sigmas_type algorithm_type solver_order solver_type lower_order_final
    use_lu_lambdas euler_at_final lambda_min_clipped variance_type use_flow_sigmas flow_shift
    disable_corrector solver_p predict_x0 eta sigma_data rho s_noise final_sigmas_type
    use_dynamic_shifting time_shift_type num_inference_steps shift_terminal sigma_schedule
    noise_sampler_seed""".split()
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
    if out["trained_betas"] is None:
        for key in ("beta_start", "beta_end"):
            if not 0 < out[key] < 1:
                raise ValueError(f"{key} must be inside (0, 1), got {out[key]}")
    switched_on = [key for key in SIGMA_FAMILIES if out[key]]
    if len(switched_on) > 1:
        raise ValueError(f"only one sigma family can be switched on, got {', '.join(switched_on)}")
    return out


def split_known(values: Mapping, owner: str, *, warn: bool = True) -> tuple[dict, dict]:
    """(options we know, the rest); warns (unless ``warn`` is false: the caller takes the rest) about unknown
    keys that are not private or from other schedulers."""
    known = {k: v for k, v in values.items() if k in DEFAULTS}
    unknown = sorted(k for k in values if k not in DEFAULTS and not str(k).startswith("_"))
    noisy = [k for k in unknown if k not in FOREIGN_SCHEDULER_KEYS]
    if noisy and warn:
        warnings.warn(f"{owner}: config keys {noisy} are not used by KDPM2DiscreteScheduler and are ignored", stacklevel=3)
    return known, {k: values[k] for k in unknown}


def to_json_dict(config: Mapping, version: str) -> dict:
    """The diffusers-format dict written to ``scheduler_config.json``."""
    out = {"_class_name": CLASS_NAME, "_kdpm2_version": version}
    for key in DEFAULTS:
        value = config[key]
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


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


def parse_config_bytes(data: bytes, source: str = "<bytes>", *, what: str = "config", limit: int = MAX_CONFIG_BYTES) -> dict:
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
