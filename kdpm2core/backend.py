"""What a backend is: one small Protocol, and a base class whose defaults use only the Array API.

An adapter subclasses :class:`ArrayAPIBackend`, passes its array-api-compat namespace and overrides only what
its framework does better (device parsing, random numbers, a fused multiply-add, a compiled loop). The rule of a
substep's linear combinations is defined here once (:func:`recipe`, applied by :meth:`ArrayAPIBackend.combine`);
adapters supply its primitives.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np

from kdpm2core.schedule import COLUMNS

__all__ = [
    "Backend",
    "ArrayAPIBackend",
    "PROTOCOL_MEMBERS",
    "missing_members",
    "check_array",
    "exactly",
    "Recipe",
    "recipe",
    "live_arrays",
    "substep_recipes",
    "table_recipes",
    "update",
]

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

    def factors(self, values: np.ndarray, device: Any = None) -> Sequence[Any] | None:
        """``values`` (host float64, one per substep) as 0-d float32 arrays placed so that they multiply a float32
        array on ``device`` to the bits of ``x * float(value)``, or None. The stateful scheduler multiplies by them
        where a Python number would cost a conversion on every call (torch makes a new 0-d tensor of it)."""

    def combine(self, recipe: Recipe, coefs: Sequence[Any], arrays: Sequence[Array | None], out=None) -> Array:
        """One linear combination of a substep, ``sum(coefs[column] * arrays[slot])`` as :func:`recipe` orders it.

        Coefficients are Python floats (the stateful scheduler) or 0-d arrays (the functional API); the two
        must give the same bits. ``out`` is an optional caller buffer for the result (ignored where arrays are
        immutable). :meth:`ArrayAPIBackend.combine` is the rule every first-party backend follows; a backend
        overrides its primitives (:meth:`~ArrayAPIBackend.multiply`, :meth:`~ArrayAPIBackend.multiply_add`), or
        wraps it (NumPy applies it chunk by chunk), never the order or the shortcuts.
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
    return isinstance(coef, (int, float)) and coef == value


# -- the substep's two linear combinations -----------------------------------------------------------------
#: the arrays of a substep, in the order of the slots a recipe refers to
SLOTS = ("stored", "sample", "model_output", "noise")
#: the terms of each combination, in summation order: (the coefficient's column in the table, the array's slot)
PREV_TERMS = tuple((COLUMNS.index(name), SLOTS.index(array)) for name, array in zip("abcn", SLOTS))
PRED_TERMS = ((COLUMNS.index("p"), SLOTS.index("sample")), (COLUMNS.index("q"), SLOTS.index("model_output")))


class Recipe(NamedTuple):
    """A combination ``sum(coefs[column] * arrays[slot])`` with the rule's decisions taken (see :func:`recipe`)."""

    lead: int | None  #: slot of a leading term whose coefficient is exactly 1: it is added as it is
    terms: tuple[tuple[int, int], ...]  #: the other live terms, ``(column, slot)``, in summation order
    slots: tuple[int, ...]  #: every term's slot: with no live term, zeros like the first array given


def recipe(coefs: Sequence[Any], terms: Sequence[tuple[int, int]]) -> Recipe:
    """The one rule of a substep's linear combination, for the coefficients ``coefs`` (a table row).

    The terms are summed in the order given, left to right: ``((c0*x0 + c1*x1) + c2*x2)``, each ``acc + c*x`` one
    multiply-add. A coefficient that is a Python number exactly 0 drops its term (its array may then be None);
    a leading exactly 1 skips its multiply, the first multiply-add starting from that array as it is (a lone
    ``1*x`` is still a multiply: the result is never an input). Both shortcuts are exact for finite values
    (``x*1 == x``, ``acc + 0*x == acc``), so Python-float rows (the stateful scheduler) and 0-d array rows (the
    functional API, whose values the host never reads) give the same bits, as long as a backend's
    ``multiply_add`` rounds alike for both kinds of coefficient. A recipe depends only on which coefficients
    are exactly 0 or 1, so rows with one pattern share it (:func:`table_recipes`).
    """
    live = tuple(term for term in terms if not exactly(coefs[term[0]], 0))
    slots = tuple(slot for _, slot in terms)
    if len(live) > 1 and exactly(coefs[live[0][0]], 1):
        return Recipe(live[0][1], live[1:], slots)
    return Recipe(None, live, slots)


def live_arrays(recipe: Recipe, arrays: Sequence[Array | None]) -> list[Array]:
    """The arrays ``recipe`` reads from ``arrays``, in term order (the order their dtypes are promoted in)."""
    return ([] if recipe.lead is None else [arrays[recipe.lead]]) + [arrays[slot] for _, slot in recipe.terms]


def substep_recipes(row: Sequence[Any]) -> tuple[Recipe, Recipe]:
    """The recipes of ``prev_sample`` (:data:`PREV_TERMS`) and ``pred_original_sample`` (:data:`PRED_TERMS`)
    for a row of coefficients in the table's column order (``schedule.COLUMNS``)."""
    return recipe(row, PREV_TERMS), recipe(row, PRED_TERMS)


def table_recipes(table: np.ndarray) -> list[tuple[Recipe, Recipe]]:
    """:func:`substep_recipes` of every row of a host table, worked out once per pattern of exact 0s and 1s."""
    codes = (((table == 0) + 2 * (table == 1)) @ 3 ** np.arange(table.shape[1])).tolist()  # one per pattern
    distinct = {}
    for i, code in enumerate(codes):
        if code not in distinct:
            distinct[code] = substep_recipes(table[i].tolist())
    return [distinct[code] for code in codes]


def update(
    backend: Backend, a, b, c, p, q, stored, sample, model_output, out=None, *, n=0.0, noise=None
) -> tuple[Array, Array]:
    """One KDPM2 substep by ``backend``: ``(a*stored + b*sample + c*model_output + n*noise, p*sample +
    q*model_output)``, each by :meth:`Backend.combine` (the functional API's step). ``stored`` may be None
    when ``a`` is 0, ``noise`` when ``n`` is; ``out`` is an optional pair of buffers for the two results."""
    named = {"a": a, "b": b, "c": c, "p": p, "q": q, "first": None, "n": n}
    row = tuple(named[name] for name in COLUMNS)
    arrays = (stored, sample, model_output, noise)
    prev_out, pred_out = (None, None) if out is None else out
    prev_recipe, pred_recipe = substep_recipes(row)
    return backend.combine(prev_recipe, row, arrays, prev_out), backend.combine(pred_recipe, row, arrays, pred_out)


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
    def factors(self, values: np.ndarray, device: Any = None) -> Sequence[Any] | None:
        return None  # Python floats: the Array API's scalar arithmetic

    def combine(self, recipe: Recipe, coefs: Sequence[Any], arrays: Sequence[Array | None], out=None) -> Array:
        """The combination :func:`recipe` describes, by :meth:`multiply` and :meth:`multiply_add`.

        The result is a new array, or ``out`` when given (later terms then accumulate in it); with mixed dtypes
        it has the promoted dtype (a float16 sample with a float32 model output gives float32, as the arithmetic
        itself would). Inputs are never modified and never returned.
        """
        lead, terms, slots = recipe
        if not self.inplace:  # immutable arrays (JAX, Dask) cannot be written into
            out = None
        if not terms:  # every coefficient is exactly 0: zeros of the first array's dtype
            like = next(arrays[slot] for slot in slots if arrays[slot] is not None)
            if out is None:
                return self.xp.zeros_like(like)
            out[...] = 0
            return out
        column, slot = terms[0]
        x = arrays[slot if lead is None else lead]
        more = len(terms) > 1
        if more and out is None:
            # later operations accumulate in place: start in the dtype the terms promote to, so that the sums
            # round there (a product keeps its library's dtype: a float16 array times a Python float is float16
            # in NumPy and JAX, while torch's add(alpha=) multiplies in float32)
            live = live_arrays(recipe, arrays)  # in term order: a library may fold result_type pairwise
            if any(y.dtype != x.dtype for y in live):
                x = self.xp.astype(x, self.xp.result_type(*live))
        if lead is None:
            acc = self.multiply(x, coefs[column], out=out)
        else:
            acc = self.multiply_add(x, coefs[column], arrays[slot], out=out)
        if more:  # ``acc`` is ours now (or the caller's ``out``): accumulate in place where we can; a 0-d
            # result may be an immutable scalar (NumPy's arithmetic returns those), so it gets a new array
            writable = self.inplace and (out is not None or len(acc.shape) > 0)
            for column, slot in terms[1:]:
                acc = self.multiply_add(acc, coefs[column], arrays[slot], out=acc if writable else None)
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
