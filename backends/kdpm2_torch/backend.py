"""PyTorch adapter: device parsing, torch's generator, and a substep of fused multiply-add kernels.

The update computes each output with one kernel per term; large CPU outputs go into pooled buffers (see
:meth:`TorchBackend._output`) so that a step touches no fresh memory.
"""

from __future__ import annotations

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
        no tensor, view, NumPy array or autograd record can see it), as torch's CUDA caching allocator does.
        A buffer still in use is never handed out, so a returned array is never overwritten behind the
        caller's back. At most :data:`POOL_BUFFERS` buffers per shape are kept; :meth:`release_buffers`
        frees them.
        """
        size = like.numel() * like.element_size()
        if like.device.type != "cpu" or size < POOL_MIN_BYTES or not like.is_contiguous() or self.compiling():
            return torch.empty_like(like)
        key = (tuple(like.shape), like.dtype)
        with self._pool_lock:
            buffers = self._pool.setdefault(key, [])
            for i in range(len(buffers) - 1, -1, -1):  # the most recently used free buffer: likely still cached
                buffer = buffers[i]
                storage = buffer.untyped_storage()
                if _USE_COUNT(storage._cdata) == 2:  # the pool's tensor and ``storage`` only
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

    def compiling(self):
        return torch.compiler.is_compiling()

    def update(self, a, b, c, p, q, stored, sample, model_output, out=None):
        """Both combinations of a substep, with no temporaries.

        Every term after the first is one fused multiply-add kernel (``add_(x, alpha=coef)`` for Python
        floats, ``addcmul_(x, coef)`` for 0-d tensors; both round ``dst + coef*x`` once), in the fixed order
        ``(a*stored + b*sample) + c*model_output``; Python-float 0 and 1 skip work exactly. So the stateful
        scheduler (floats) and the functional API (0-d tensors) agree bit for bit, every epsilon substep is
        one kernel per output (``stored`` or ``sample`` plus ``c*model_output``), and a step allocates only
        its two outputs, nothing when ``out`` buffers are given.

        Large CPU outputs come from a buffer pool (:meth:`_output`): fresh memory costs a page fault per page,
        which measured more than the substep itself. Slicing large arrays so that both outputs of a slice are
        computed while its inputs are in L2 was tried and measured (docs/performance.md): no gain with one
        thread, and many times slower with several threads on a shared CPU (each slice kernel is a parallel
        region that waits for all its threads), so whole-array kernels it is.
        """
        if out is None and (
            sample.device.type != "cpu"
            or sample.numel() * sample.element_size() < POOL_MIN_BYTES
            or _USE_COUNT is None
            or (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (stored, sample, model_output)))
        ):
            # small, on an accelerator, or differentiated (``out=`` kernels are not): each first kernel
            # allocates its result; a few microseconds per call matter for small arrays, so the epsilon rows
            # (one kernel each) skip _combine
            if type(a) is float and type(b) is float and type(p) is float and type(c) is float and type(q) is float:
                if a == 0.0 and b == 1.0:
                    prev = torch.add(sample, model_output, alpha=c)
                elif a == 1.0 and b == 0.0:
                    prev = torch.add(stored, model_output, alpha=c)
                else:
                    prev = _combine(None, ((a, stored), (b, sample), (c, model_output)))
                pred = torch.add(sample, model_output, alpha=q) if p == 1.0 else _combine(None, ((p, sample), (q, model_output)))
                return prev, pred
            return _combine(None, ((a, stored), (b, sample), (c, model_output))), _combine(None, ((p, sample), (q, model_output)))
        prev, pred = (self._output(sample), self._output(sample)) if out is None else out
        _combine(prev, ((a, stored), (b, sample), (c, model_output)))
        _combine(pred, ((p, sample), (q, model_output)))
        return prev, pred


#: how many references a storage has (private torch API; without it there is no pool)
_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)
#: CPU outputs of at least this many bytes come from the buffer pool; smaller ones are cheap to allocate
POOL_MIN_BYTES = 1 << 20
#: buffers kept per (shape, dtype): a loop holds about five arrays of one shape (input, stored, both outputs
#: and the model input) at a time
POOL_BUFFERS = 8


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
