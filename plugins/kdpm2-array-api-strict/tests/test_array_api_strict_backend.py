"""The array-api-strict plugin: registration, devices, and a sampling loop under array-api-strict's strictest
flags (the full conformance suite runs on this backend too, from the kdpm2 repository's pytest)."""

import array_api_strict
import numpy as np
import pytest

import kdpm2core
from kdpm2core import KDPM2DiscreteScheduler

NAME = "array-api-strict"


def test_registered_through_the_entry_point():
    assert NAME in kdpm2core.available_backends()
    rows = {row["name"]: row for row in kdpm2core.backend_report()}
    assert rows[NAME]["status"] == "ok" and rows[NAME]["distribution"] == "kdpm2-array-api-strict"
    backend = kdpm2core.get_backend(NAME)
    assert backend.xp is array_api_strict and backend.name == NAME


def test_unknown_device_is_a_clear_error():
    with pytest.raises(ValueError, match="device2"):
        kdpm2core.get_backend(NAME).device("device2")


@pytest.mark.parametrize("device", ["CPU_DEVICE", "device1"])
def test_sampling_under_the_strictest_flags(device):
    """No data-dependent shapes, no boolean indexing, the oldest API version with everything the core uses:
    a loop must still run, stay on its device and match the NumPy backend."""
    reference = KDPM2DiscreteScheduler(prediction_type="v_prediction", backend="numpy")
    scheduler = KDPM2DiscreteScheduler(prediction_type="v_prediction", backend=NAME)
    start = np.linspace(-2.0, 2.0, 24).reshape(2, 3, 4)
    with array_api_strict.ArrayAPIStrictFlags(
        api_version="2023.12", data_dependent_shapes=False, boolean_indexing=False
    ):
        results = []
        for sched, x in (
            (reference, start),
            (scheduler, array_api_strict.asarray(start, device=array_api_strict.Device(device))),
        ):
            sched.set_timesteps(5, device=device if sched is scheduler else None)
            xp = sched.backend.xp
            for k in range(sched.timesteps.shape[0]):
                t = sched.timesteps[k]
                x = sched.step(xp.tanh(sched.scale_model_input(x, t)), t, x).prev_sample
            results.append(x)
    assert results[1].device == array_api_strict.Device(device)
    np.testing.assert_allclose(np.from_dlpack(results[1]), results[0], rtol=1e-12, atol=1e-12)
