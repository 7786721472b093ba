"""A kdpm2 backend on ``dask.array``: every step builds graph, nothing is computed until you ask.

``step``, ``scale_model_input`` and ``add_noise`` are elementwise combinations of their inputs with Python-float
coefficients (the core's :meth:`~kdpm2core.backend.ArrayAPIBackend.combine`, with dask's multiply and add), so
on dask arrays they stay lazy and keep the input's chunking; a whole sampling loop becomes one graph, whose
elementwise layers dask fuses per chunk, that a ``dask.distributed`` cluster evaluates chunk by chunk. Set
``scheduler.set_begin_index(0)`` (as diffusers' img2img pipelines do) to skip the one small compute that looking
up the first timestep needs.
"""

from __future__ import annotations

import numpy as np

from kdpm2core import hookimpl
from kdpm2core.backend import ArrayAPIBackend

__all__ = ["DaskBackend", "register_backends"]

NAME = "dask"


class DaskBackend(ArrayAPIBackend):
    """``dask.array`` through array-api-compat; arrays are lazy, so nothing is updated in place."""

    inplace = False

    def __init__(self):
        import array_api_compat.dask.array
        import dask

        super().__init__(NAME, array_api_compat.dask.array)
        self.version = dask.__version__

    def dtype(self, name):
        # dask arrays hold NumPy dtypes; the compat namespace leaves out float16, which dask handles
        if name in ("float16", "float32", "float64"):
            return np.dtype(name)
        return super().dtype(name)

    def to_numpy(self, x):
        return np.asarray(x.compute())  # the active scheduler: a distributed Client when one is set up

    def rng(self, seed, device=None):
        import dask.array as da

        return da.random.default_rng(int(seed))

    def normal(self, rng, shape, *, dtype, device=None):
        # drawn lazily, chunk by chunk, on the workers; the generator advances with each call
        return rng.standard_normal(shape, chunks="auto").astype(dtype), rng


def make_backend() -> DaskBackend:
    return DaskBackend()


@hookimpl
def register_backends(register):
    register(NAME, make_backend, requires=("dask",))
