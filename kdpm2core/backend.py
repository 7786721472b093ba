"""What a backend is: one small Protocol, and a base class whose defaults use only the Array API.

An adapter subclasses :class:`ArrayAPIBackend`, passes its array-api-compat namespace and overrides only what
its framework does better (device parsing, random numbers, a fused update kernel, a compiled loop).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["Backend", "ArrayAPIBackend"]

Array = Any


@runtime_checkable
class Backend(Protocol):
    """The interface the scheduler needs from an array library."""

    name: str  #: registered name, e.g. ``"torch"``
    xp: Any  #: the namespace ``array_api_compat.array_namespace(x)`` returns for the library's arrays
    float64: bool  #: whether float64 arrays are supported (JAX: only with ``jax_enable_x64``)
    inplace: bool  #: whether arrays can be written in place (False for JAX)
    jit: bool  #: whether :meth:`loop` compiles the whole loop

    def owns(self, x: Array) -> bool:
        """True when ``x`` is an array of this backend (checked without importing anything)."""

    def device(self, spec: Any) -> Any:
        """Parse a device given as None, a string such as ``"cuda:0"``, or a device object."""

    def devices(self) -> list[str]:
        """Names of the devices this backend can place arrays on."""

    def asarray(self, obj: Any, *, dtype: Any = None, device: Any = None) -> Array:
        """Convert host data (NumPy arrays, Python scalars) to an array of this backend."""

    def dtype(self, name: str) -> Any:
        """The dtype object called ``name`` (``"float32"``, ``"bfloat16"``, ...)."""

    def to_numpy(self, x: Array) -> np.ndarray:
        """A host NumPy copy of ``x``."""

    def synchronize(self, x: Array | None = None) -> None:
        """Wait until pending work (on ``x``'s device) is done; for benchmarks."""

    def rng(self, seed: int, device: Any = None) -> Any:
        """A random generator state seeded with ``seed`` (``device``: where it draws, if that matters)."""

    def normal(self, rng: Any, shape: tuple[int, ...], *, dtype: Any, device: Any = None) -> tuple[Array, Any]:
        """Standard normal samples and the advanced generator state."""

    def scale(self, x: Array, factor: float) -> Array:
        """``x * factor`` for a Python float (the model input). Optional: the scheduler multiplies itself
        where a backend lacks it."""

    def update(self, a, b, c, p, q, stored, sample, model_output, out=None) -> tuple[Array, Array]:
        """One KDPM2 substep: ``(b*sample + c*model_output + a*stored, p*sample + q*model_output)``.

        Coefficients are Python floats (the stateful scheduler) or 0-d arrays (the functional API); ``out``
        is an optional pair of caller buffers for the two results.
        """

    def loop(self, n: int, body: Callable[[Any, Any], Any], carry: Any) -> Any:
        """``for i in range(n): carry = body(i, carry)``, compiled where the backend can."""

    def compiling(self) -> bool:
        """True while a graph compiler traces the caller (``torch.compile``); Python values are then frozen.
        A backend whose compiler cannot follow the stateful scheduler's Python state raises instead (JAX)."""


def _registered(name: str):
    from kdpm2core.plugins import get_backend

    return get_backend(name)


def _is_scalar(value) -> bool:
    return isinstance(value, (int, float))


class ArrayAPIBackend:
    """Defaults written against the Array API standard; adapters override what their framework does better."""

    float64 = True
    inplace = True
    jit = False

    def __init__(self, name: str, xp: Any):
        self.name = name
        self.xp = xp

    def __repr__(self) -> str:
        return f"<kdpm2 backend {self.name!r}>"

    # one object per registered name: a copied scheduler shares it, a pickled one names it
    def __deepcopy__(self, memo) -> ArrayAPIBackend:
        return self

    def __reduce__(self):
        return _registered, (self.name,)

    # -- arrays and devices ---------------------------------------------------------------------------------
    def owns(self, x: Array) -> bool:
        import array_api_compat

        try:
            return array_api_compat.array_namespace(x) is self.xp
        except TypeError:
            return False

    def device(self, spec: Any) -> Any:
        if spec is None or spec == "cpu":
            return None
        if not isinstance(spec, str):  # e.g. a torch.device given to a NumPy scheduler by a torch pipeline
            kind = f"{type(spec).__module__}.{type(spec).__qualname__}"
            raise ValueError(
                f"device {spec!r} is a {kind}, not a device of backend {self.name!r} (its devices: {self.devices()}); "
                "create the scheduler with the backend of your arrays, e.g. backend='torch'"
            )
        raise ValueError(f"device {spec!r} is not available on backend {self.name!r}; it has {self.devices()}")

    def devices(self) -> list[str]:
        return ["cpu"]

    def device_of(self, x: Array) -> Any:
        import array_api_compat

        return array_api_compat.device(x)

    def asarray(self, obj: Any, *, dtype: Any = None, device: Any = None) -> Array:
        if device is None:
            return self.xp.asarray(obj, dtype=dtype)
        return self.xp.asarray(obj, dtype=dtype, device=device)

    def dtype(self, name: str) -> Any:
        try:
            return getattr(self.xp, name)
        except AttributeError:
            raise TypeError(f"dtype {name!r} is not supported by backend {self.name!r}") from None

    def to_numpy(self, x: Array) -> np.ndarray:
        return np.asarray(x)

    def synchronize(self, x: Array | None = None) -> None:
        return None

    # -- random numbers (the Array API has none): NumPy's generator, moved to the backend ------------------------
    def rng(self, seed: int, device: Any = None) -> Any:
        return np.random.default_rng(seed)

    def normal(self, rng: Any, shape: tuple[int, ...], *, dtype: Any, device: Any = None) -> tuple[Array, Any]:
        return self.asarray(rng.standard_normal(shape), dtype=dtype, device=device), rng

    # -- the substep ------------------------------------------------------------------------------------------
    def lincomb(self, terms: Sequence[tuple[Any, Array]]) -> Array:
        """``sum(coef * x for coef, x in terms)`` as a fresh array.

        Python-float coefficients that are exactly 0 drop their term and exactly 1 skip the multiply; the
        product terms come first so that, on backends with in-place updates, only the result is allocated.
        """
        if all(_is_scalar(coef) for coef, _ in terms):
            terms = [(coef, x) for coef, x in terms if coef != 0]
            terms.sort(key=lambda term: term[0] == 1)
        result = None
        for coef, x in terms:
            if result is None:
                result = x * coef
            elif _is_scalar(coef) and coef == 1:
                result = self._add(result, x)
            else:
                result = self._add(result, x * coef)
        return result

    def _add(self, result: Array, term: Array) -> Array:
        if self.inplace:
            result += term
            return result
        return result + term

    def scale(self, x: Array, factor: float) -> Array:
        return x * factor

    def update(self, a, b, c, p, q, stored, sample, model_output, out=None) -> tuple[Array, Array]:
        """Both combinations of a substep; see :class:`Backend`.

        The terms are summed in one fixed order, ``(b*sample + c*model_output) + a*stored``, each product
        rounded once. Python-float coefficients 0 and 1 skip work, which is exact (``x*1 == x``,
        ``y + 0*x == y``), so Python-float rows (stateful scheduler) and 0-d array rows (functional API)
        give bit-identical results. NumPy-like namespaces (ufuncs with ``out=``) compute into the results
        directly, chunk by chunk, so a step allocates its two outputs and at most one
        :data:`CHUNK`-element scratch; with ``out`` buffers, only that scratch.
        """
        if _accepts_out(self.xp):
            prev, pred = (None, None) if out is None else out
            if out is not None and any(
                np.may_share_memory(buffer, x) for buffer in out for x in (sample, model_output, stored) if x is not None
            ):
                raise ValueError("out buffers must not overlap sample, model_output or the stored sample (state.stored)")
            prev = _ufunc_combine(prev, ((b, sample), (c, model_output), (a, stored)), like=sample)
            pred = _ufunc_combine(pred, ((p, sample), (q, model_output)), like=sample)
            return prev, pred
        prev = self.lincomb(((b, sample), (c, model_output), (a, stored)))
        pred = self.lincomb(((p, sample), (q, model_output)))
        if out is None:
            return prev, pred
        if not self.inplace:  # immutable arrays (JAX) cannot be written into: the buffers go unused
            return prev, pred
        out[0][...], out[1][...] = prev, pred
        return out[0], out[1]

    # -- loops ------------------------------------------------------------------------------------------------
    def loop(self, n: int, body: Callable[[Any, Any], Any], carry: Any) -> Any:
        for i in range(n):
            carry = body(i, carry)
        return carry

    def compiling(self) -> bool:
        return False


#: elements per chunk of the NumPy update: five chunk-sized operands stay in a core's L2 cache
CHUNK = 1 << 15


def _accepts_out(xp) -> bool:
    """Whether ``xp``'s arithmetic are NumPy ufuncs (they write into ``out=`` without temporaries)."""
    return isinstance(getattr(xp, "multiply", None), np.ufunc) and isinstance(getattr(xp, "add", None), np.ufunc)


def _ufunc_combine(dst, terms, *, like):
    """``dst[...] = sum(coef * x)`` in the order given, product by product, one chunk at a time; returns ``dst``.

    With ``dst`` None the result is a new C-contiguous array of ``like``'s shape, whatever ``like``'s memory
    layout (a transposed or Fortran-ordered sample too), in the dtype NumPy's promotion gives the terms' arrays
    (a float32 sample with a float64 model output gives float64, as the arithmetic itself would)."""
    terms = [(coef, x) for coef, x in terms if not (_is_scalar(coef) and coef == 0)]
    if dst is None:
        dtype = np.result_type(*(x for _, x in terms)) if terms else like.dtype
        if dtype.kind != "f":
            raise TypeError(f"sample and model_output must be floating-point arrays; their combination is {dtype}")
        dst = np.empty(like.shape, dtype=dtype)
    if not dst.flags.c_contiguous:
        raise ValueError("out buffers must be C-contiguous arrays")
    flat = dst.reshape(-1)  # a view, since ``dst`` is contiguous
    operands = [(coef, np.ascontiguousarray(x).reshape(-1)) for coef, x in terms]
    scratch = None
    for start in range(0, max(flat.size, 1), CHUNK):
        part = flat[start : start + CHUNK]
        if not terms:
            part[...] = 0
        for i, (coef, x) in enumerate(operands):
            x = x[start : start + CHUNK]
            one = _is_scalar(coef) and coef == 1
            if i == 0 and one:
                np.copyto(part, x)
            elif i == 0:
                np.multiply(x, coef, out=part)
            elif one:
                np.add(part, x, out=part)
            else:
                if scratch is None:
                    scratch = np.empty(min(CHUNK, flat.size), dtype=dst.dtype)
                tmp = scratch[: part.size]
                np.multiply(x, coef, out=tmp)
                np.add(part, tmp, out=part)
    return dst
