"""What the conformance tests share: the matrix entries they receive, ``assert_close``, and a sampling loop.

A test receives a :class:`Target` (backend and device) or a :class:`Case` (backend, device and dtype) from the
``kdpm2_target`` / ``kdpm2_case`` parameters that :mod:`kdpm2core.testing.plugin` builds from the plugin
registry. Every assertion message starts with :attr:`Target.label`, so a failure names backend, device and
dtype, and callers add the option combination.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Target", "Case", "assert_close", "EPS", "sample_loop", "describe"]

# Unit roundoff of each floating dtype: tolerances are multiples of it.
EPS = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


@dataclass(frozen=True)
class Target:
    """One backend on one of its devices."""

    backend_name: str
    device_name: str
    backend: Any = None  # the backend object; None when it failed to load (``error`` says why)
    error: str | None = None

    @property
    def label(self) -> str:
        return f"backend={self.backend_name} device={self.device_name}"

    @property
    def xp(self):
        return self.backend.xp

    @property
    def device(self):
        """The backend's device object for :attr:`device_name`."""
        return self.backend.device(self.device_name)

    def asarray(self, values, dtype: str) -> Any:
        """Host values as an array of this backend, dtype ``dtype`` (a name), on this device."""
        return self.backend.asarray(np.asarray(values), dtype=self.backend.dtype(dtype), device=self.device)

    def to_numpy(self, x) -> np.ndarray:
        """A float64 host copy of the backend array ``x``."""
        return np.asarray(self.backend.to_numpy(x), dtype=np.float64)

    def scheduler(self, **config):
        """A ``KDPM2DiscreteScheduler`` with ``config`` on this backend."""
        from kdpm2core import KDPM2DiscreteScheduler

        return KDPM2DiscreteScheduler(**config, backend=self.backend_name)


@dataclass(frozen=True)
class Case(Target):
    """One backend, one device and one dtype (by name)."""

    dtype_name: str = "float32"

    @property
    def label(self) -> str:
        return f"{super().label} dtype={self.dtype_name}"

    @property
    def dtype(self):
        return self.backend.dtype(self.dtype_name)

    @property
    def eps(self) -> float:
        return EPS[self.dtype_name]

    def array(self, values) -> Any:
        """Host values as an array of this case's dtype and device."""
        return self.asarray(values, self.dtype_name)


def describe(config: Mapping) -> str:
    """A short text of the non-default options in ``config`` (long lists are abbreviated)."""
    parts = []
    for key, value in config.items():
        if isinstance(value, (list, tuple)) and len(value) > 6:
            value = f"[{len(value)} values]"
        parts.append(f"{key}={value}")
    return ", ".join(parts)


def assert_close(
    actual,
    expected,
    target: Target,
    *,
    what: str,
    dtype: str | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    device=None,
) -> None:
    """Assert that the backend array ``actual`` matches the host values ``expected``.

    Checks, in order: ``actual`` belongs to the target's backend (namespace), its dtype is ``dtype`` (default:
    the case's), its shape is ``expected``'s, its device equals ``device`` when given, then its values:
    ``|actual - expected| <= atol + rtol * |expected|`` elementwise, with ``rtol`` defaulting to 8 units of
    roundoff of the dtype and ``atol`` to ``rtol`` times the largest ``|expected|`` (so entries near zero are
    judged on the array's scale). ``what`` names the quantity and the option combination in the message.
    """
    label = f"{target.label} [{what}]"
    backend = target.backend
    if not backend.owns(actual):
        raise AssertionError(
            f"{label}: result is a {type(actual).__module__}.{type(actual).__name__}, "
            f"not an array of backend {target.backend_name!r}"
        )
    dtype = dtype or getattr(target, "dtype_name", None)
    if dtype is not None and actual.dtype != backend.dtype(dtype):
        raise AssertionError(f"{label}: dtype is {actual.dtype}, expected {dtype}")
    expected = np.asarray(expected, dtype=np.float64)
    if tuple(actual.shape) != expected.shape:
        raise AssertionError(f"{label}: shape is {tuple(actual.shape)}, expected {expected.shape}")
    if device is not None and backend.device_of(actual) != device:
        raise AssertionError(f"{label}: device is {backend.device_of(actual)!r}, expected {device!r}")
    values = target.to_numpy(actual)
    if rtol is None:
        rtol = 8 * EPS[dtype or "float64"]
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    if atol is None:
        atol = rtol * max(scale, 1e-300)
    if not np.all(np.isfinite(values)):
        bad = np.argwhere(~np.isfinite(values))[0]
        raise AssertionError(f"{label}: non-finite value {values[tuple(bad)]} at index {tuple(bad)}")
    err = np.abs(values - expected)
    allowed = atol + rtol * np.abs(expected)
    if np.all(err <= allowed):
        return
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(allowed > 0, err / np.where(allowed > 0, allowed, 1.0), np.inf)
    worst = np.unravel_index(np.argmax(ratio), ratio.shape) if ratio.ndim else ()
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = float(np.max(np.where(expected != 0, err / np.abs(expected), 0.0)))
    raise AssertionError(
        f"{label}: {int(np.sum(err > allowed))} of {max(err.size, 1)} values differ; max abs error "
        f"{float(np.max(err)):.3g}, max rel error {rel:.3g}, worst at index {tuple(int(i) for i in worst)}: "
        f"got {float(values[worst])!r}, expected {float(expected[worst])!r} (error {float(err[worst]):.3g} is "
        f"{float(ratio[worst]):.3g}x the allowed atol={atol:.3g} + rtol={rtol:.3g} * |expected|)"
    )


def sample_loop(scheduler, x, model: Callable, target: Target, *, start: int = 0):
    """Run the pipeline loop from substep ``start`` with ``model(model_input, t)`` (``t`` a Python float).

    Timesteps are passed to the scheduler as elements of ``scheduler.timesteps``, as pipelines do. Returns the
    final sample and host copies, one row per substep, of ``model_input``, ``prev_sample`` and
    ``pred_original_sample`` (stacked on the backend and copied once, so lazy backends compute once).
    """
    timesteps = scheduler.timesteps
    host = target.to_numpy(timesteps)
    inputs, prevs, preds = [], [], []
    for k in range(start, len(host)):
        t = timesteps[k]
        model_input = scheduler.scale_model_input(x, t)
        x, pred = scheduler.step(model(model_input, float(host[k])), t, x, return_dict=False)
        inputs.append(model_input)
        prevs.append(x)
        preds.append(pred)
    stacked = target.to_numpy(target.xp.stack(inputs + prevs + preds))
    n = len(prevs)
    return x, {"model_input": stacked[:n], "prev": stacked[n : 2 * n], "pred": stacked[2 * n :]}
