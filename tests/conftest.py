"""Shared fixtures of the project's own tests: the backends to run on, and a cheap synthetic "model".

diffusers is a test-only dependency: the files that compare against it import it with ``importorskip``.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

import kdpm2core
from kdpm2core.config import DEFAULTS, FLOW_OPTIONS

# the first-party backends that are installed here; each parity test runs once per entry
BACKENDS = [name for name in ("numpy", "torch", "jax") if name in kdpm2core.available_backends()]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Run torch, once some test module has imported it, with one intra-op thread: on a small machine whose
    cores are shared, torch's worker threads spin against each other and the small tensors of these tests
    run 5-40x slower with two threads than with one. No result depends on it (each comparison runs both
    sides under the same setting), and torch is never imported just for this."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != 1:
        torch.set_num_threads(1)
    yield


@pytest.fixture(params=BACKENDS)
def backend_name(request) -> str:
    """Name of one installed first-party backend."""
    return request.param


def synthetic_model(scaled_input: np.ndarray, timestep: float, prediction_type: str = "epsilon") -> np.ndarray:
    """A deterministic stand-in for a denoiser: a smooth, nonlinear function of the scaled input and the timestep.

    Computed in float64 on the host, so every backend (and diffusers) gets the same model output for the same
    input; the callers cast it to the sample's dtype. ``v_prediction`` gets a differently shaped function so
    that both prediction types exercise more than one linear map.
    """
    x = np.asarray(scaled_input, dtype=np.float64)
    t = float(timestep) / 1000.0
    position = np.arange(x.size, dtype=np.float64).reshape(x.shape) / max(x.size, 1)
    if prediction_type == "v_prediction":
        return 0.8 * np.tanh(x) - 0.3 * x * np.cos(3.0 * t) + 0.05 * np.sin(7.0 * position + t)
    return np.tanh(0.7 * x) + 0.2 * x * np.sin(5.0 * t) + 0.05 * np.cos(11.0 * position - 2.0 * t)


def initial_noise(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Standard normal float32 noise from NumPy's generator (the same numbers for every backend)."""
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    """``max |ours - reference| / max |reference|``: the relative error of a whole array, in float64."""
    ours, reference = np.asarray(ours, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    scale = np.abs(reference).max()
    return float(np.abs(ours - reference).max() / (scale if scale > 0 else 1.0))


def diffusers_kdpm2(*, ancestral: bool = False, **options):
    """diffusers' ``KDPM2DiscreteScheduler(**options)`` (``KDPM2AncestralDiscreteScheduler`` when ``ancestral``),
    built without the schedule its constructor computes.

    That schedule is for ``num_train_timesteps`` steps and costs up to a second with a sigma family, only to
    be replaced by the test's own ``set_timesteps`` call, which is never patched. Betas and alphas_cumprod
    are computed as usual.
    """
    from unittest import mock

    import diffusers
    import torch

    cls = diffusers.KDPM2AncestralDiscreteScheduler if ancestral else diffusers.KDPM2DiscreteScheduler

    def no_schedule(self, *args, **kwargs):
        self.sigmas = torch.zeros(1)  # the constructor moves self.sigmas to the CPU afterwards

    with mock.patch.object(cls, "set_timesteps", no_schedule):
        return cls(**options)


def scheduler_options(beta="linear", family=None, spacing="linspace", offset=0, *, trained_betas=None, **extra) -> dict:
    """Constructor keywords for one option combination (``beta="trained_betas"`` passes ``trained_betas``)."""
    kw = {"timestep_spacing": spacing, "steps_offset": offset, **extra}
    if beta == "trained_betas":
        kw["trained_betas"] = trained_betas
    else:
        kw["beta_schedule"] = beta
    if family:
        kw[f"use_{family}_sigmas"] = True
    return kw


def comparable_config(config) -> dict:
    """A scheduler config as a plain dict with ``_use_default_values`` sorted: diffusers builds that list from a
    set, so its order changes from run to run, and configs are compared as diffusers' own tests do, by value.
    The flow-matching options left at their defaults are left out: diffusers' KDPM2 has none of them."""
    defaulted = set(config.get("_use_default_values", ()))
    flow_defaults = {key for key in FLOW_OPTIONS if key in defaulted or config.get(key, DEFAULTS[key]) == DEFAULTS[key]}
    out = {key: value for key, value in config.items() if key not in flow_defaults}
    if "_use_default_values" in out:
        out["_use_default_values"] = sorted(set(out["_use_default_values"]) - flow_defaults)
        if not out["_use_default_values"]:  # only flow options were at their defaults
            del out["_use_default_values"]
    return out
