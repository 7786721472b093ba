"""A kdpm2 backend on ``dask.array``: every step builds graph, nothing is computed until you ask.

``step``, ``scale_model_input`` and ``add_noise`` are elementwise combinations of their inputs with Python-float
coefficients, so on dask arrays they stay lazy and keep the input's chunking; a whole sampling loop becomes one
graph that a ``dask.distributed`` cluster evaluates chunk by chunk. Set ``scheduler.set_begin_index(0)`` (as
diffusers' img2img pipelines do) to skip the one small compute that looking up the first timestep needs.
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

    def update(self, a, b, c, p, q, stored, sample, model_output, out=None):
        """Each combination as one blockwise layer (one task per chunk) instead of a multiply and an add per
        term: smaller graphs, and the output keeps the chunks of ``sample``."""
        coefficients = (a, b, c, p, q)
        if out is not None or not all(isinstance(v, (int, float)) for v in coefficients):
            return super().update(a, b, c, p, q, stored, sample, model_output, out=out)
        import dask.array as da

        prev_terms = [(b, sample), (c, model_output), (a, stored)]
        prev_terms = [(coef, x) for coef, x in prev_terms if coef != 0]
        pred_terms = [(coef, x) for coef, x in ((p, sample), (q, model_output)) if coef != 0]

        def combine(terms):
            if not terms:
                return da.zeros_like(sample)
            coefs, arrays = zip(*terms)
            dtype = np.result_type(*(x.dtype for x in arrays))  # what the blocks compute: NumPy's promotion
            return da.map_blocks(_combine, *arrays, coefs=coefs, dtype=dtype, meta=sample._meta.astype(dtype))

        return combine(prev_terms), combine(pred_terms)

    def to_numpy(self, x):
        return np.asarray(x.compute())  # the active scheduler: a distributed Client when one is set up

    def rng(self, seed, device=None):
        import dask.array as da

        return da.random.default_rng(int(seed))

    def normal(self, rng, shape, *, dtype, device=None):
        # drawn lazily, chunk by chunk, on the workers; the generator advances with each call
        return rng.standard_normal(shape, chunks="auto").astype(dtype), rng


def _combine(*blocks, coefs):
    """``sum(coef * block)`` on NumPy blocks, in the order given and rounded as the NumPy backend rounds:
    each product once, coefficient 1 without a multiply."""
    result = None
    for coef, block in zip(coefs, blocks):
        term = block if coef == 1 else block * coef
        result = (term.copy() if term is block else term) if result is None else result + term
    return result


def make_backend() -> DaskBackend:
    return DaskBackend()


@hookimpl
def register_backends(register):
    register(NAME, make_backend, requires=("dask",))
