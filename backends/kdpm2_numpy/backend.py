"""NumPy adapter: ufuncs that write into their outputs, and the combination applied chunk by chunk.

NumPy evaluates ``acc + c*x`` as two ufunc calls and a full-size temporary. So :meth:`NumpyBackend.combine`
runs the core's rule on :data:`CHUNK`-element slices, writing each slice of the result in place: a step allocates
its two outputs and one chunk of scratch at a time, and a chunk's operands are still in cache when the next term
reads them. The rule, its term order and its roundings are the core's; only the slicing is NumPy's.
"""

from __future__ import annotations

import array_api_compat.numpy
import numpy as np

from kdpm2core.backend import ArrayAPIBackend, exactly, live_arrays

#: elements per slice of a combination: each term's scratch is one slice
CHUNK = 1 << 15


class NumpyBackend(ArrayAPIBackend):
    """Backend on ``numpy``; arrays are ``numpy.ndarray`` (through array-api-compat's namespace)."""

    def __init__(self):
        super().__init__("numpy", array_api_compat.numpy)
        self.version = np.__version__

    def multiply(self, x, coef, out=None):
        return np.multiply(x, coef, out=out)

    def multiply_add(self, acc, coef, x, out=None):
        return np.add(acc, x if exactly(coef, 1) else np.multiply(x, coef), out=out)

    def combine(self, recipe, coefs, arrays, out=None):
        """The core's :meth:`~kdpm2core.backend.ArrayAPIBackend.combine`, one :data:`CHUNK` at a time.

        The result is a C-contiguous array of the first array's shape whatever the inputs' memory layout, in
        the dtype NumPy's promotion gives the live terms (a float32 sample with a float64 model output gives
        float64). ``out`` must be C-contiguous and must not overlap an input: writing the result would change
        what the rest of the substep reads.
        """
        if out is not None and any(np.may_share_memory(out, x) for x in arrays if x is not None):
            raise ValueError(
                "out buffers must not overlap sample, model_output, noise or the stored sample (state.stored)"
            )
        given = [slot for slot in recipe.slots if arrays[slot] is not None]
        live = live_arrays(recipe, arrays)
        dtype = np.result_type(*live) if live else arrays[given[0]].dtype
        if dtype.kind != "f":
            raise TypeError(f"sample and model_output must be floating-point arrays; their combination is {dtype}")
        if out is None:
            out = np.empty(arrays[given[0]].shape, dtype=dtype)
        elif not out.flags.c_contiguous:
            raise ValueError("out buffers must be C-contiguous arrays")
        flat = out.reshape(-1)  # a view, since ``out`` is contiguous
        flat_arrays = [None] * len(arrays)
        for slot in given:
            flat_arrays[slot] = np.ascontiguousarray(arrays[slot]).reshape(-1)
        for start in range(0, flat.size, CHUNK):
            part = slice(start, start + CHUNK)
            chunk = [None if x is None else x[part] for x in flat_arrays]
            super().combine(recipe, coefs, chunk, out=flat[part])
        return out
