"""The option grid, the toy model and the reference-data loader shared by the suite and its data generator.

Nothing here imports diffusers or a framework: the toy model is written against an Array API namespace, so the
generator runs it on torch tensors inside diffusers and the suite runs it on whatever backend it tests.
"""

from __future__ import annotations

import functools
import itertools
import json
from importlib import resources

import numpy as np

__all__ = [
    "BETAS",
    "SPACINGS",
    "FAMILIES",
    "PREDICTIONS",
    "STEPS",
    "grid",
    "trained_betas",
    "toy_model",
    "array_toy_model",
    "NOISE",
    "ORIGINAL",
    "ORIGINAL_NOISE",
    "load",
]

DATA_FILE = "diffusers_reference.npz"

# Each entry is a set of config keys; the grid is their full product (4 x 4 x 4 x 2 x 4 = 512 schedules).
BETAS = {
    "linear": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    "squaredcos_cap_v2": {"beta_schedule": "squaredcos_cap_v2"},
    "trained_betas": {"num_train_timesteps": 500, "trained_betas": "quadratic-500"},
}
SPACINGS = {
    "linspace": {"timestep_spacing": "linspace"},
    "leading": {"timestep_spacing": "leading", "steps_offset": 0},
    "leading+1": {"timestep_spacing": "leading", "steps_offset": 1},
    "trailing": {"timestep_spacing": "trailing"},
}
FAMILIES = {
    "interpolated": {},
    "karras": {"use_karras_sigmas": True},
    "exponential": {"use_exponential_sigmas": True},
    "beta": {"use_beta_sigmas": True},
}
PREDICTIONS = ("epsilon", "v_prediction")
STEPS = (1, 2, 7, 25)

# The initial noise of every trajectory: both signs, a zero, and values past 2 standard deviations.
NOISE = np.array([-2.1, -0.7, 0.0, 0.3, 1.2, 2.5])
# The add_noise batch: 3 samples of 2 values, each noised at its own timestep.
ORIGINAL = np.array([[0.5, -1.0], [2.0, 0.25], [-0.3, 1.5]])
ORIGINAL_NOISE = np.array([[1.0, -0.5], [0.2, 2.0], [-1.5, 0.7]])


def trained_betas() -> np.ndarray:
    """The explicit betas of the ``trained_betas`` grid entry: a quadratic ramp over 500 training steps."""
    ramp = np.arange(500, dtype=np.float64) / 499.0
    return 0.0005 + 0.03 * ramp**2


def grid():
    """Yield ``(key, config, num_inference_steps, with_trajectory)`` for every schedule of the grid.

    The key names the option combination (it appears in failure messages). Trajectories are stored for every
    combination with fewer than 25 steps, and for 25 steps with linspace spacing and interpolated sigmas, to
    bound the data and the suite's time on slow backends.
    """
    for (bn, b), (sn, s), (fn, f), pred, steps in itertools.product(
        BETAS.items(), SPACINGS.items(), FAMILIES.items(), PREDICTIONS, STEPS
    ):
        config = {**b, **s, **f, "prediction_type": pred}
        if config.get("trained_betas") == "quadratic-500":
            config["trained_betas"] = trained_betas().tolist()
        key = f"{bn}/{sn}/{fn}/{pred}/steps={steps}"
        yield key, config, steps, steps < 25 or (sn == "linspace" and fn == "interpolated")


def toy_model(x_in, t: float, *, xp):
    """A cheap non-linear "model output" that depends on the scaled input and on the timestep.

    ``xp`` is the Array API namespace of ``x_in``; ``t`` is a Python float. The same expression runs in the
    diffusers generator (torch) and on every backend under test.
    """
    return xp.tanh(x_in) * (0.5 + t / 1000.0) + 0.1 * x_in


def array_toy_model(xp):
    """:func:`toy_model` for a timestep given as a 0-d array (what the functional API's ``model_inputs`` and
    ``scheduler.timesteps[k]`` give): the timestep's factor is cast to the input's dtype, so the output keeps
    it, and the whole model traces under a compiled loop."""

    def model(x_in, t):
        return xp.tanh(x_in) * xp.astype(0.5 + t / 1000.0, x_in.dtype) + 0.1 * x_in

    return model


@functools.lru_cache(maxsize=1)
def load() -> dict:
    """The stored diffusers reference data: ``{"cases": [...], "arrays": {name: ndarray}}`` (read once)."""
    with resources.files("kdpm2core.testing").joinpath("data", DATA_FILE).open("rb") as handle:
        with np.load(handle, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    cases = json.loads(str(arrays.pop("cases_json")))
    betas = arrays["trained_betas"].tolist()
    for case in cases:
        if case["config"].get("trained_betas") == "quadratic-500":
            case["config"]["trained_betas"] = betas
    return {"cases": cases, "arrays": arrays}


def case_arrays(case: dict, name: str) -> np.ndarray:
    """The slice of the flat array ``name`` that belongs to ``case`` (offsets are stored per case)."""
    start, stop = case["slices"][name]
    return load()["arrays"][name][start:stop]
