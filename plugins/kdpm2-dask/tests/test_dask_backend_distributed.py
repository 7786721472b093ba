"""The Dask plugin on a real ``dask.distributed`` cluster of local worker processes (loopback only).

A chunked 1x4x512x512 latent is sampled through the stateful scheduler: every ``step`` must return dask
arrays with the input's chunks without computing anything, and the one compute at the end, on the cluster,
must match the NumPy backend within 1e-6.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest

import kdpm2core
from kdpm2core import KDPM2DiscreteScheduler

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")
distributed = pytest.importorskip("distributed")

SHAPE = (1, 4, 512, 512)
CHUNKS = ((1,), (2, 2), (256, 256), (200, 312))  # uneven on purpose: the output must keep exactly these
STEPS = 4  # 7 substeps


def _model(x, t, xp):
    """A cheap stand-in for a UNet: elementwise, so dask keeps it lazy and blockwise."""
    return xp.tanh(x) * (0.5 + t / 1000.0) + 0.1 * x


def _forbidden_scheduler(dsk, keys, **kwargs):
    raise AssertionError(f"something computed inside the sampling loop (keys {str(keys)[:200]})")


@pytest.fixture(scope="module")
def client():
    with (
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            silence_logs=logging.ERROR,
        ) as cluster,
        distributed.Client(cluster, timeout="60s") as client,
    ):
        client.wait_for_workers(2, timeout=60)
        yield client


def test_registered_through_the_entry_point():
    assert "dask" in kdpm2core.available_backends()
    rows = {row["name"]: row for row in kdpm2core.backend_report()}
    assert rows["dask"]["status"] == "ok" and rows["dask"]["distribution"] == "kdpm2-dask"
    assert kdpm2core.get_backend("dask").inplace is False


def _sample(backend, x, on_step=None):
    scheduler = KDPM2DiscreteScheduler(beta_schedule="scaled_linear", use_karras_sigmas=True, backend=backend)
    scheduler.set_timesteps(STEPS)
    scheduler.set_begin_index(0)  # no timestep lookup, so not even the timesteps are computed
    xp = scheduler.backend.xp
    x = x * scheduler.init_noise_sigma
    for k, t in enumerate(_host_timesteps()):  # the model gets host floats, so it never reads a dask timestep
        model_input = scheduler.scale_model_input(x, scheduler.timesteps[k])
        out = scheduler.step(_model(model_input, float(t), xp), scheduler.timesteps[k], x)
        if on_step is not None:
            on_step(k, x, out)
        x = out.prev_sample
    return x


def _host_timesteps():
    reference = KDPM2DiscreteScheduler(beta_schedule="scaled_linear", use_karras_sigmas=True, backend="numpy")
    reference.set_timesteps(STEPS)
    return np.asarray(reference.timesteps)


def test_lazy_chunked_sampling_on_a_local_cluster(client):
    workers = client.run(os.getpid)
    assert len(workers) == 2 and os.getpid() not in workers.values(), "the workers must be separate processes"

    noise = np.random.default_rng(0).standard_normal(SHAPE)
    expected = _sample("numpy", noise)

    latent = da.from_array(noise, chunks=CHUNKS)
    checked = []

    def on_step(k, sample, out):
        for name, array in (("prev_sample", out.prev_sample), ("pred_original_sample", out.pred_original_sample)):
            assert isinstance(array, da.Array), f"substep {k}: {name} is a {type(array).__name__}, not a dask array"
            assert array.chunks == CHUNKS, f"substep {k}: {name} has chunks {array.chunks}, expected {CHUNKS}"
        checked.append(k)

    # any compute inside the loop (in step, scale_model_input or the backend) hits the forbidden scheduler
    with dask.config.set(scheduler=_forbidden_scheduler):
        with pytest.raises(AssertionError, match="inside the sampling loop"):
            latent[0, 0, 0, 0].compute()  # the guard itself works, even with a default Client set
        result = _sample("dask", latent, on_step)
    assert checked == list(range(2 * STEPS - 1))

    tasks = len(result.__dask_graph__())
    got = client.compute(result).result(timeout=120)
    assert got.shape == SHAPE and got.dtype == np.float64
    error = float(np.max(np.abs(got - expected)))
    assert error <= 1e-6, f"dask on the cluster differs from the NumPy backend by {error:.3g} ({tasks} tasks)"
