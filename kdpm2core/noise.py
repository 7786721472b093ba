"""Noise that is the same on every backend: a counter-based generator written against the Array API.

The Array API has no random numbers, and every library's own generator gives other numbers for the same seed.
Here a standard normal is a pure function of four integers::

    noise[i, e] = N(seed, items[i], substep, e)       e: the element's flat index within row i (C order)

so NumPy, PyTorch, JAX, array-api-strict, Dask and any other Array API namespace give the same noise for the
same seed, row ``i`` of a batch equals that item drawn alone, and nothing depends on how many draws came before.
It is computed from integers with elementwise operations only: no host sync and no branch on a value, so it traces
under ``jax.jit`` and ``torch.compile(fullgraph=True)``, and ``seed`` and ``substep`` may be 0-d traced arrays.

The mapping, which is a contract (it changes only with a major version):

1. A row key: Threefry-2x32 with 20 rounds (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
   SC11, 2011; the generator behind ``jax.random``), keyed by the 64-bit seed ``(low word, high word)``,
   applied to the counter ``(item, substep)``.
2. Per element ``e``: Threefry-2x32 keyed by the row key, applied to the counter ``(e, 0)``, gives two 32-bit
   words ``w0, w1``.
3. Box-Muller on their top 24 bits: ``u1 = (w0 // 2**8 + 1) / 2**24`` in ``(0, 1]`` (so ``log(u1)`` is finite),
   ``u2 = (w1 // 2**8) / 2**24`` in ``[0, 1)``, and the element is ``sqrt(-2 log u1) cos(2 pi u2)``, computed
   in float32 (float64 when that is the dtype asked for) and cast to the dtype.

The initial latent uses the reserved substep :data:`INITIAL_SUBSTEP`, so it is independent of every step's noise.

Why 16-bit halves in int32: the standard leaves integer overflow to the implementation and PyTorch implements
neither addition nor shifts on ``uint32`` tensors on the CPU, so a 32-bit word is held as two int32 arrays, its
high and low 16 bits. Every intermediate value stays below ``2**31``: the same exact integers on every library.
Threefry needs only addition, rotation and XOR (no 32x32-bit multiply), which keeps that representation cheap.
Each element takes one Threefry block and only the cosine half of Box-Muller: every element is then one
elementwise expression of its own index. Interleaving a pair's cosine and sine would stack two branches of one
integer chain, which XLA's CPU backend (jax 0.10) fuses into a kernel that does not finish running.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

__all__ = ["INITIAL_SUBSTEP", "initial_latent", "normal", "threefry2x32"]

Array = Any

#: the substep word reserved for the initial latent (:func:`initial_latent`); steps use ``0 .. 2**32 - 2``
INITIAL_SUBSTEP = 2**32 - 1

_HALF = 0xFFFF  # one 16-bit half of a word
# Threefry-2x32: the rotation of each round (mod 8) and the key-schedule parity word, from Salmon et al. (2011)
# and Random123's threefry.h; checked against Random123's known-answer vectors in the tests.
_ROTATIONS = (13, 15, 26, 6, 17, 29, 16, 24)
_PARITY = (0x1BD1, 0x1BDA)
_ROUNDS = 20

# A word is a pair ``(high, low)`` of 16-bit halves, each an int32 array or a Python int in [0, 2**16).


def _add(a, b, extra: int = 0):
    """``(a + b + extra) mod 2**32`` for words ``a``, ``b`` and a small Python int ``extra``."""
    low = a[1] + b[1] + extra
    high = a[0] + b[0] + (low >> 16)
    return high & _HALF, low & _HALF


def _xor(a, b):
    return a[0] ^ b[0], a[1] ^ b[1]


def _rotate(a, bits: int):
    """The word ``a`` rotated left by ``bits`` (0 to 31)."""
    high, low = a if bits < 16 else (a[1], a[0])
    bits %= 16
    if bits == 0:
        return high, low
    return ((high << bits) | (low >> (16 - bits))) & _HALF, ((low << bits) | (high >> (16 - bits))) & _HALF


def threefry2x32(key, counter):
    """Threefry-2x32-20 of ``counter`` under ``key``: the two output words.

    ``key``, ``counter`` and the result are pairs of 32-bit words, each word a pair ``(high, low)`` of its 16-bit
    halves given as int32 arrays (any shapes that broadcast) or Python ints in ``[0, 2**16)``. For example the
    word ``0x243F6A88`` is ``(0x243F, 0x6A88)``. All arithmetic stays below ``2**31``.
    """
    k0, k1 = key
    keys = (k0, k1, _xor(_xor(k0, k1), _PARITY))
    x0, x1 = _add(counter[0], keys[0]), _add(counter[1], keys[1])
    for r in range(_ROUNDS):
        x0 = _add(x0, x1)
        x1 = _xor(_rotate(x1, _ROTATIONS[r % 8]), x0)
        if r % 4 == 3:  # key injection s after every fourth round
            s = r // 4 + 1
            x0 = _add(x0, keys[s % 3])
            x1 = _add(x1, keys[(s + 1) % 3], s)
    return x0, x1


# -- arguments ------------------------------------------------------------------------------------------------


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _halves(xp, x, shifts: Sequence[int]):
    """The 16-bit halves of the integer array ``x`` at ``shifts`` (two's complement: negative values wrap), int32.

    Halves above the dtype's width repeat its sign (sign extension), as Python's ``int`` would."""
    info = xp.iinfo(x.dtype)
    if info.bits < 32:  # exact, and leaves room for the shifts below
        x, info = xp.astype(x, xp.int32), xp.iinfo(xp.int32)
    signed = info.min < 0
    result = []
    for shift in shifts:
        if shift < info.bits:
            part = (x >> shift) & _HALF
        else:
            part = ((x >> (info.bits - 1)) & _HALF) if signed else x & 0
        result.append(xp.astype(part, xp.int32))
    return result


def _words(xp, value, name: str, count: int, *, ndim: int) -> list:
    """``value`` (a Python int, or an integer array of ``ndim`` dimensions) as ``count`` words, low word first."""
    if _is_int(value):
        value = int(value)
        if not 0 <= value < 2 ** (32 * count):
            raise ValueError(f"{name} must be in [0, 2**{32 * count}), got {value}")
        halves = [(value >> (16 * i)) & _HALF for i in range(2 * count)]
    else:
        dtype = getattr(value, "dtype", None)
        if dtype is None or getattr(value, "ndim", None) != ndim or not xp.isdtype(dtype, "integral"):
            kind = "a Python int or a 0-d integer array" if ndim == 0 else "a sequence of ints or a 1-D integer array"
            raise TypeError(f"{name} must be {kind}, got {type(value).__name__} {getattr(value, 'dtype', '')}".rstrip())
        halves = _halves(xp, value, [16 * i for i in range(2 * count)])
    return [(halves[2 * i + 1], halves[2 * i]) for i in range(count)]


def _shape(shape) -> tuple[int, ...]:
    if not isinstance(shape, Sequence) or not shape or not all(_is_int(n) and n >= 0 for n in shape):
        raise ValueError(f"shape must be a non-empty tuple of non-negative ints (batch first), got {shape!r}")
    return tuple(int(n) for n in shape)


def _dtype(xp, dtype):
    dtype = xp.float32 if dtype is None else dtype
    if not xp.isdtype(dtype, "real floating"):
        raise TypeError(f"dtype must be a real floating dtype, got {dtype}")
    return dtype


def _items(xp, items, batch: int, device):
    """The item word of each row, as halves of shape ``(batch, 1)``."""
    if items is None:
        items = xp.arange(batch, dtype=xp.int32, **_on(device))
    elif not hasattr(items, "dtype"):
        items = list(items)
        if not all(_is_int(i) and 0 <= i < 2**32 for i in items):
            raise ValueError(f"items must be ints in [0, 2**32), got {items!r}")
        if len(items) != batch:
            raise ValueError(f"items has {len(items)} entries but the batch (shape[0]) is {batch}")
        # halves made on the host: an item of 2**31 or more does not fit int32
        return tuple(
            xp.asarray([[h] for h in halves], dtype=xp.int32, **_on(device))
            for halves in ([i >> 16 for i in items], [i & _HALF for i in items])
        )
    elif items.shape != (batch,):
        raise ValueError(f"items has shape {tuple(items.shape)} but the batch (shape[0]) is {batch}")
    (word,) = _words(xp, items, "items", 1, ndim=1)
    return tuple(xp.reshape(half, (batch, 1)) for half in word)


def _on(device) -> dict:
    return {} if device is None else {"device": device}


# -- normals --------------------------------------------------------------------------------------------------


def normal(xp, seed, shape, *, items=None, substep=0, dtype=None, device=None) -> Array:
    """Standard normal noise of ``shape`` that is the same on every backend; see the module docstring.

    Args:
        xp: The Array API namespace to compute in (e.g. ``array_api_compat.numpy``, ``jax.numpy``, a backend's
            ``xp``).
        seed: A Python int in ``[0, 2**64)`` or a 0-d integer array (negative values wrap modulo ``2**64``;
            on PyTorch a signed dtype: it has no shifts for ``uint32`` and ``uint64``).
        shape: The result's shape; its first axis is the batch.
        items: Each row's item index (default ``0, 1, ..., shape[0] - 1``): a sequence of ints in ``[0, 2**32)``
            or a 1-D integer array. Row ``i`` equals the noise of item ``items[i]`` drawn alone.
        substep: Which draw of a sampling loop: a Python int in ``[0, 2**32 - 1)`` or a 0-d integer array
            (taken modulo ``2**32``).
        dtype: A real floating dtype of ``xp`` (default ``xp.float32``). float16 and bfloat16 are computed in
            float32, float64 in float64.
        device: Where to create the result (default: the namespace's default device).

    Returns:
        An array of ``shape`` and ``dtype``.
    """
    shape, dtype = _shape(shape), _dtype(xp, dtype)
    if _is_int(substep) and substep == INITIAL_SUBSTEP:
        raise ValueError(f"substep {INITIAL_SUBSTEP} is reserved for the initial latent; use initial_latent()")
    return _normal(xp, seed, shape, items, substep, dtype, device)


def _normal(xp, seed, shape, items, substep, dtype, device):
    batch, size = shape[0], math.prod(shape[1:])
    if size > 2**31:
        raise ValueError(f"shape {shape} has {size} elements per item; at most 2**31 are supported")
    key = _words(xp, seed, "seed", 2, ndim=0)
    (step,) = _words(xp, substep, "substep", 1, ndim=0)
    row_key = threefry2x32(key, (_items(xp, items, batch, device), step))
    e = xp.reshape(xp.arange(size, dtype=xp.int32, **_on(device)), (1, size))
    w0, w1 = threefry2x32(row_key, ((e >> 16, e & _HALF), (0, 0)))

    work = xp.float64 if dtype == xp.float64 else xp.float32
    u1 = xp.astype(_top24(w0) + 1, work) * 2.0**-24  # in (0, 1]: exact, and log(u1) is finite
    angle = xp.astype(_top24(w1), work) * (2 * math.pi * 2.0**-24)  # one rounding: the same on every library
    z = xp.sqrt(xp.log(u1) * -2.0) * xp.cos(angle)
    z = xp.reshape(z, shape)
    return z if z.dtype == dtype else xp.astype(z, dtype)


def _top24(word):
    """The top 24 bits of a word, an int32 array in [0, 2**24)."""
    return word[0] * 256 + (word[1] >> 8)


def initial_latent(xp, seed, shape, *, sigma: float = 1.0, items=None, dtype=None, device=None) -> Array:
    """The starting sample of a sampling loop: ``sigma`` times noise from the reserved :data:`INITIAL_SUBSTEP`.

    Pass the scheduler's ``init_noise_sigma`` as ``sigma``. The noise is independent of every step's noise
    (:func:`normal` with ``substep`` ``0 .. 2**32 - 2``) for the same seed; the other arguments are
    :func:`normal`'s.
    """
    shape, dtype = _shape(shape), _dtype(xp, dtype)
    noise = _normal(xp, seed, shape, items, INITIAL_SUBSTEP, dtype, device)
    return noise if sigma == 1 else noise * sigma
