"""PyTorch adapter: device parsing, torch's generator, and a substep of fused multiply-add kernels.

The update computes each output with one torch kernel per term. Large CPU arrays get two more things: pooled
output buffers (:meth:`TorchBackend._output`), so that a step touches no fresh memory, and the C kernel of
``_fused.c``, which computes both outputs in one pass over the inputs, to the same bits.
"""

from __future__ import annotations

import functools
import os
import sys
import threading

import array_api_compat.torch
import torch

from kdpm2core.backend import ArrayAPIBackend


class TorchBackend(ArrayAPIBackend):
    """Backend on ``torch``; arrays are ``torch.Tensor`` on any device torch supports."""

    def __init__(self):
        super().__init__("torch", array_api_compat.torch)
        self.version = torch.__version__
        self._pool = {}  # (shape, dtype) -> CPU buffers of earlier outputs, see _output
        self._pool_lock = threading.Lock()

    def device(self, spec):
        if spec is None:
            return None
        try:
            return torch.device(spec)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device {spec!r} is not a torch device: {exc}") from None

    def devices(self):
        found = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            found.append("mps")
        return found

    def asarray(self, obj, *, dtype=None, device=None):
        return torch.as_tensor(obj, dtype=dtype, device=device)

    def to_numpy(self, x):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.numpy()

    def synchronize(self, x=None):
        if torch.cuda.is_available() and (x is None or x.device.type == "cuda"):
            torch.cuda.synchronize(None if x is None else x.device)

    def rng(self, seed, device=None):
        return torch.Generator(device=device or "cpu").manual_seed(int(seed))

    def normal(self, rng, shape, *, dtype, device=None):
        sample = torch.randn(shape, generator=rng, dtype=torch.float32, device=rng.device)
        return sample.to(device=device, dtype=dtype), rng

    def _output(self, like):
        """A fresh result array shaped like ``like``: from the buffer pool for large CPU arrays.

        A new CPU allocation this large comes straight from the OS, and the first write to each of its pages
        faults and zero-fills it: measured here, that costs more than the substep itself. So large outputs
        reuse buffers of earlier outputs that nothing references any more (the storage's use count says so:
        no tensor, view, NumPy array or autograd record can see it; and the Python reference count of its
        storage object, that no storage handle can), as torch's CUDA caching allocator does. A buffer moved to
        shared memory (sent to another process) leaves the pool.
        A buffer still in use is never handed out, so a returned array is never overwritten behind the
        caller's back. At most :data:`POOL_BUFFERS` buffers per shape are kept; :meth:`release_buffers`
        frees them.
        """
        if _USE_COUNT is None or not like.is_cpu or like.numel() * like.element_size() < LARGE_BYTES or not like.is_contiguous() or self.compiling():
            return torch.empty_like(like)
        key = (tuple(like.shape), like.dtype)
        with self._pool_lock:
            buffers = self._pool.setdefault(key, [])
            for i in range(len(buffers) - 1, -1, -1):  # the most recently used free buffer: likely still cached
                buffer = buffers[i]
                if buffer.untyped_storage().is_shared():  # sent to another process (torch.multiprocessing)
                    del buffers[i]  # which may still map it: never reuse it
                    continue
                storage = _reusable(buffer)
                if storage is not None:
                    buffers.append(buffers.pop(i))
                    return torch.empty(0, dtype=like.dtype).set_(storage, 0, buffer.shape, buffer.stride())
            fresh = torch.empty_like(like)
            if len(buffers) < POOL_BUFFERS:
                buffers.append(fresh)
                fresh = torch.empty(0, dtype=like.dtype).set_(fresh.untyped_storage(), 0, fresh.shape, fresh.stride())
            return fresh

    def release_buffers(self):
        """Free the pooled output buffers (those still referenced stay alive with their arrays)."""
        with self._pool_lock:
            self._pool.clear()

    def owns(self, x):
        # a plain isinstance check: cheap, and traceable by torch.compile (array-api-compat's is not)
        return isinstance(x, torch.Tensor)

    # torch's own function, not a method wrapping it: the scheduler calls it twice per substep
    compiling = staticmethod(torch.compiler.is_compiling)

    def scale(self, x, factor):
        """``x * factor``. For float32/float64 CPU arrays the factor goes in as a cached 0-d tensor of ``x``'s
        dtype: given a Python float, torch wraps it in a new 0-d tensor on every call, which costs half as
        much as the multiply itself on a 1x4x64x64 latent. The same bits either way: the kernel rounds a
        Python factor to ``x``'s dtype too (half precision keeps it in float32, so those stay on floats).
        Large results come from the buffer pool, as the step's do."""
        scalar = _cpu_scalar(factor, x.dtype) if type(factor) is float and x.is_cpu else None
        if scalar is not None:
            if x.numel() * x.element_size() < LARGE_BYTES or (x.requires_grad and torch.is_grad_enabled()):
                return torch.mul(x, scalar)
            return torch.mul(x, scalar, out=self._output(x))
        return x * factor

    def update(self, a, b, c, p, q, stored, sample, model_output, out=None):
        """Both combinations of a substep, with no temporaries.

        Every term after the first is one fused multiply-add (``add_(x, alpha=coef)`` for Python floats,
        ``addcmul_(x, coef)`` for 0-d tensors; both round ``dst + coef*x`` once), in the fixed order
        ``(a*stored + b*sample) + c*model_output``; Python-float 0 and 1 skip work exactly. So the stateful
        scheduler (floats) and the functional API (0-d tensors) agree bit for bit, every epsilon substep is
        one kernel per output (``stored`` or ``sample`` plus ``c*model_output``), and a step allocates only
        its two outputs, nothing when ``out`` buffers are given.

        Large CPU arrays (at least :data:`LARGE_BYTES`) take two more measures, both measured in
        docs/performance.md. Their outputs come from a buffer pool (:meth:`_output`): fresh memory costs a
        page fault per page, more than the substep itself. And with float coefficients the C kernel of
        ``_fused.c`` computes both outputs in one pass over the inputs, with the same roundings in the same
        order, so bit for bit what the torch kernels give: torch's kernels read the inputs once per output, and
        on a large array memory traffic is the whole cost.
        """
        floats = type(a) is type(b) is type(c) is type(p) is type(q) is float
        if out is None and (
            not sample.is_cpu  # first: on an accelerator the size does not matter
            or sample.numel() * sample.element_size() < LARGE_BYTES  # (not nbytes: dynamic shapes, sparse)
            or model_output.dtype != sample.dtype  # mixed dtypes: torch's promotion picks the result's
            or (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (stored, sample, model_output)))
        ):
            # small, on an accelerator, mixed or differentiated: each first kernel allocates its result. A
            # small substep costs a few microseconds, so every epsilon row (each output one ``x + coef*y``)
            # calls torch.add directly, as _combine would, with the fewest Python steps first
            if floats and p == 1.0 and c != 0.0 and q != 0.0 and (a, b) in ((0.0, 1.0), (1.0, 0.0)):
                return torch.add(sample if a == 0.0 else stored, model_output, alpha=c), torch.add(sample, model_output, alpha=q)
            return _combine(None, ((a, stored), (b, sample), (c, model_output))), _combine(None, ((p, sample), (q, model_output)))
        if out is None and floats and _kernel is not None:
            fused = self._fused(a, b, c, p, q, stored, sample, model_output)
            if fused is not None:
                return fused
        prev, pred = (self._output(sample), self._output(sample)) if out is None else out
        _combine(prev, ((a, stored), (b, sample), (c, model_output)))
        _combine(pred, ((p, sample), (q, model_output)))
        return prev, pred

    def _fused(self, a, b, c, p, q, stored, sample, model_output):
        """Both outputs from the C kernel in one pass (contiguous float32/float64 CPU arrays of one dtype and
        shape), or None where it does not apply. :meth:`update` calls it only for a large CPU ``sample`` with
        ``model_output`` of the same dtype."""
        dtype = sample.dtype
        if (
            dtype not in _KERNEL_DTYPES
            or not sample.is_contiguous()
            or not model_output.is_cpu
            or not model_output.is_contiguous()
            or model_output.shape != sample.shape
        ):
            return None
        if a != 0.0:
            if stored is None or stored.dtype != dtype or not stored.is_cpu or not stored.is_contiguous() or stored.shape != sample.shape:
                return None
            stored = stored.data_ptr()
        else:
            stored = None
        n = sample.numel()
        threads = 1 if n < PARALLEL_MIN else min(torch.get_num_threads(), n // PARALLEL_MIN)
        prev, pred = self._output(sample), self._output(sample)
        _kernel.update(dtype is torch.float64, n, threads, prev.data_ptr(), pred.data_ptr(), stored, sample.data_ptr(), model_output.data_ptr(), a, b, c, p, q)
        return prev, pred


def _load_kernel():
    """The compiled ``_fused.c``, or None where it was not built (no C compiler when kdpm2 was installed) or
    ``KDPM2_NO_KERNEL`` is set: torch's kernels then compute every substep, to the same bits."""
    if os.environ.get("KDPM2_NO_KERNEL"):
        return None
    try:
        from kdpm2_torch import _fused
    except ImportError:
        return None
    return _fused


_kernel = _load_kernel()
_KERNEL_DTYPES = (torch.float32, torch.float64)
#: the C kernel splits arrays of at least this many elements per thread over torch's thread count
PARALLEL_MIN = 1 << 18

#: how many references a storage has (private torch API; without it there is no pool)
_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)
#: CPU arrays of at least this many bytes take the pooled outputs and the C kernel. Smaller ones are cheap to
#: allocate, and there the kernel saves nothing: its call and its outputs' allocation cost as much as torch's
#: second kernel over inputs still in cache (docs/performance.md)
LARGE_BYTES = 1 << 20
#: buffers kept per (shape, dtype): a loop holds about five arrays of one shape (input, stored, both outputs
#: and the model input) at a time
POOL_BUFFERS = 8


def _reusable(buffer):
    """``buffer``'s storage when nothing but the pool reaches it, else None. Its use count then holds the pool's
    tensor and torch's one Python object for the storage; and since torch hands every caller that same object,
    a caller who kept it (``x.untyped_storage()``, ``x.storage()``) shows in its Python reference count."""
    storage = buffer.untyped_storage()
    if _USE_COUNT(storage._cdata) == 2 and sys.getrefcount(storage) <= _FREE_REFS:
        return storage
    return None


def _refs_of_a_fresh_storage(tensor) -> int:
    storage = tensor.untyped_storage()  # as in _reusable: one local name, one argument of getrefcount
    return sys.getrefcount(storage)


#: the Python reference count of a storage object that only _reusable holds (measured, not assumed)
_FREE_REFS = _refs_of_a_fresh_storage(torch.empty(1))


@functools.lru_cache(maxsize=4096)
def _cpu_scalar(value: float, dtype):
    """``value`` as a 0-d CPU tensor of ``dtype``, or None for dtypes other than float32 and float64. Made on
    the CPU and outside inference mode whatever the caller's context: the cache outlives it."""
    if dtype not in _KERNEL_DTYPES:
        return None
    with torch.inference_mode(False):
        return torch.tensor(value, dtype=dtype, device="cpu")


def _combine(dst, terms):
    """``sum(coef * x)`` in the order given, each product fused into the running sum; written into ``dst``,
    or into a new tensor when ``dst`` is None. Returns the result.

    Python-float coefficients 0 drop their term and a leading 1 skips its multiply (both exact); the checks
    are plain type tests because this runs twice per substep and small substeps cost a few microseconds.
    """
    live = [term for term in terms if type(term[0]) is not float or term[0] != 0.0]
    if not live:
        return torch.zeros_like(terms[0][1]) if dst is None else dst.zero_()
    coef, x = live[0]
    if dst is None and any(y.dtype != x.dtype for _, y in live[1:]):
        # mixed dtypes: the in-place adds below would keep the first term's dtype; start in the promoted one,
        # the dtype torch's operators (and diffusers) give the whole expression
        x = x.to(functools.reduce(torch.promote_types, (y.dtype for _, y in live)))
    extra = {} if dst is None else {"out": dst}
    if len(live) > 1 and type(coef) is float and coef == 1.0 and type(live[1][0]) is float:
        dst = torch.add(x, live[1][1], alpha=live[1][0], **extra)
        rest = live[2:]
    else:
        dst = torch.mul(x, coef, **extra)
        rest = live[1:]
    for coef, y in rest:
        if type(coef) is float or type(coef) is int:
            dst.add_(y, alpha=coef)
        else:
            dst.addcmul_(y, coef)
    return dst
