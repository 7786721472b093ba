"""What a backend is: one small Protocol, and a base class whose defaults use only the Array API.

An adapter subclasses :class:`ArrayAPIBackend`, passes its array-api-compat namespace and overrides only what
its framework does better (device parsing, random numbers, a fused multiply-add, a compiled loop). The substep's
linear combination (:meth:`ArrayAPIBackend.lincomb`) is defined here once; adapters supply its primitives.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["Backend", "ArrayAPIBackend", "PROTOCOL_MEMBERS", "missing_members", "check_array", "exactly", "live_terms"]

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

    def device_of(self, x: Array) -> Any:
        """The device ``x`` is on, as :meth:`device` returns it."""

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

    def update(
        self, a, b, c, p, q, stored, sample, model_output, out=None, *, n=0.0, noise=None
    ) -> tuple[Array, Array]:
        """One KDPM2 substep: ``(a*stored + b*sample + c*model_output + n*noise, p*sample + q*model_output)``.

        Coefficients are Python floats (the stateful scheduler) or 0-d arrays (the functional API); the two
        must give the same bits. ``stored`` is None when ``a`` is 0. ``out`` is an optional pair of caller
        buffers for the two results (ignored where arrays are immutable). ``noise`` (the ancestral sampler's) is
        None when ``n`` is 0. :meth:`ArrayAPIBackend.lincomb` defines the term order and rounding every
        first-party backend follows.
        """

    def loop(self, n: int, body: Callable[[Any, Any], Any], carry: Any) -> Any:
        """``for i in range(n): carry = body(i, carry)``, compiled where the backend can."""

    def compiling(self, *arrays: Array) -> bool:
        """True while a graph compiler traces the caller (``torch.compile``); Python values are then frozen.
        ``arrays`` are the caller's arguments, from which a backend may tell a trace. A backend whose compiler
        cannot follow the stateful scheduler's Python state raises instead (JAX)."""


#: every attribute and method of :class:`Backend`: what the registry checks a plugin's object for
PROTOCOL_MEMBERS = tuple(Backend.__annotations__) + tuple(
    name for name, value in vars(Backend).items() if callable(value) and not name.startswith("_")
)


def missing_members(backend: Any) -> list[str]:
    """The members of :class:`Backend` that ``backend`` lacks (empty when it satisfies the protocol)."""
    return [name for name in PROTOCOL_MEMBERS if not hasattr(backend, name)]


def check_array(backend: Backend, name: str, x: Any) -> None:
    """Raise a TypeError naming the argument ``name`` unless ``x`` is an array of ``backend``."""
    if not backend.owns(x):
        raise TypeError(
            f"{name} must be an array of backend {backend.name!r}, got {type(x).__module__}.{type(x).__name__}"
        )


def exactly(coef: Any, value: int) -> bool:
    """Whether ``coef`` is a Python number equal to ``value``. A 0-d array never is: its value stays on the
    device (reading it would sync, or fail under a trace)."""
    return isinstance(coef, _NUMBERS) and coef == value


def live_terms(terms: Sequence[tuple[Any, Array | None]]) -> list[tuple[Any, Array]]:
    """``terms`` without those whose coefficient is exactly 0 (see :meth:`ArrayAPIBackend.lincomb`)."""
    # exactly(coef, 0), inlined: this runs twice per substep
    return [term for term in terms if not (isinstance(term[0], _NUMBERS) and term[0] == 0)]


_NUMBERS = (int, float)


def _into(out: Array | None, value: Array) -> Array:
    if out is None:
        return value
    out[...] = value
    return out


def _registered(name: str):
    from kdpm2core.plugins import get_backend

    return get_backend(name)


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
    def update(
        self, a, b, c, p, q, stored, sample, model_output, out=None, *, n=0.0, noise=None
    ) -> tuple[Array, Array]:
        """Both combinations of a substep (see :class:`Backend`), each by :meth:`lincomb`."""
        # immutable arrays (JAX, Dask) cannot be written into: ``out`` then goes unused
        prev_out, pred_out = (None, None) if out is None or not self.inplace else out
        return (
            self.lincomb(((a, stored), (b, sample), (c, model_output), (n, noise)), prev_out),
            self.lincomb(((p, sample), (q, model_output)), pred_out),
        )

    def lincomb(self, terms: Sequence[tuple[Any, Array | None]], out: Array | None = None) -> Array:
        """``sum(coef * x for coef, x in terms)``: the one definition of a substep's linear combination.

        The terms are summed in the order given, left to right: ``((c0*x0 + c1*x1) + c2*x2)``, each
        ``acc + c*x`` one :meth:`multiply_add`. A coefficient that is a Python number exactly 0 drops its term
        (``x`` may then be None); exactly 1 skips its multiply: a leading ``1*x0`` becomes the first
        multiply-add's ``acc``, a later ``1*x`` is added as it is. Both shortcuts are exact for finite values
        (``x*1 == x``, ``acc + 0*x == acc``), so Python-float rows (the stateful scheduler) and 0-d array rows
        (the functional API, whose values the host never reads) give the same bits, as long as
        :meth:`multiply_add` rounds alike for both kinds of coefficient.

        The result is a new array, or ``out`` when given (later terms then accumulate in it); with mixed
        dtypes it has the promoted dtype (a float16 sample with a float32 model output gives float32, as the
        arithmetic itself would). Inputs are never modified and never returned.
        """
        live = live_terms(terms)
        if not live:  # every coefficient is 0: zeros of the first array's dtype
            like = next(x for _, x in terms if x is not None)
            if out is None:
                return self.xp.zeros_like(like)
            out[...] = 0
            return out
        coef, x = live[0]
        n = len(live)
        done = 2 if n > 1 and exactly(coef, 1) else 1  # terms the first operation takes
        if n > done and out is None and any(y.dtype != x.dtype for _, y in live):
            # later operations accumulate in place: start in the dtype the terms promote to, so that every
            # product rounds there (a float16 sample's values are exact in float32)
            x = self.xp.astype(x, self.xp.result_type(*(y for _, y in live)))
        if done == 2:  # a leading 1: the first multiply-add starts from x itself
            acc = self.multiply_add(x, live[1][0], live[1][1], out=out)
        else:
            acc = self.multiply(x, coef, out=out)
        if n > done:  # ``acc`` is ours now (or the caller's ``out``): accumulate in place where we can; a 0-d
            # result may be an immutable scalar (NumPy's arithmetic returns those), so it gets a new array
            writable = self.inplace and (out is not None or len(acc.shape) > 0)
            for coef, y in live[done:]:
                acc = self.multiply_add(acc, coef, y, out=acc if writable else None)
        return acc

    def multiply(self, x: Array, coef: Any, out: Array | None = None) -> Array:
        """``coef * x`` (a Python number or a 0-d array), a new array or written into ``out``."""
        return _into(out, x * coef)

    def multiply_add(self, acc: Array, coef: Any, x: Array, out: Array | None = None) -> Array:
        """``acc + coef * x`` (``acc + x`` for a coefficient exactly 1), a new array or written into ``out``,
        which may be ``acc`` itself. A backend whose library has a fused multiply-add overrides this; it must
        round the same way for a Python-number and a 0-d array coefficient."""
        return _into(out, acc + (x if exactly(coef, 1) else x * coef))

    # -- loops ------------------------------------------------------------------------------------------------
    def loop(self, n: int, body: Callable[[Any, Any], Any], carry: Any) -> Any:
        for i in range(n):
            carry = body(i, carry)
        return carry

    def compiling(self, *arrays: Array) -> bool:
        return False
