"""PyTorch adapter: device parsing, torch's generator, and a substep fused into ``add(..., alpha=)`` kernels."""

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
            for buffer in buffers:
                storage = buffer.untyped_storage()
                if torch._C._storage_Use_Count(storage._cdata) == 2:  # the pool's tensor and ``storage`` only
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
        ``(b*sample + c*model_output) + a*stored``; Python-float 0 and 1 skip work exactly. So the stateful
        scheduler (floats) and the functional API (0-d tensors) agree bit for bit, and a step allocates only
        its two outputs, nothing when ``out`` buffers are given.

        Large CPU arrays are processed in :data:`CHUNK`-element slices: both outputs of a slice are computed
        while its inputs are in cache, so a substep reads each input from memory once (the memory floor)
        instead of once per output. CUDA/MPS and compiled graphs get the whole arrays (the compiler fuses).
        """
        prev, pred = (self._output(sample), self._output(sample)) if out is None else out
        operands = (sample, model_output, prev, pred) + ((stored,) if stored is not None else ())
        n = sample.numel()
        if n > CHUNK and sample.device.type == "cpu" and not self.compiling() and all(t.is_contiguous() for t in operands):
            parts = [t.view(-1).split(CHUNK) for t in (sample, model_output, prev, pred)]
            stored_parts = stored.view(-1).split(CHUNK) if stored is not None else [None] * len(parts[0])
            for x, mo, prev_part, pred_part, st in zip(*parts, stored_parts):
                _combine(prev_part, ((b, x), (c, mo), (a, st)))
                _combine(pred_part, ((p, x), (q, mo)))
        else:
            _combine(prev, ((b, sample), (c, model_output), (a, stored)))
            _combine(pred, ((p, sample), (q, model_output)))
        return prev, pred


#: CPU outputs of at least this many bytes come from the buffer pool; smaller ones are cheap to allocate
POOL_MIN_BYTES = 1 << 20
#: buffers kept per (shape, dtype): a loop holds about five arrays of one shape (input, stored, both outputs
#: and the model input) at a time
POOL_BUFFERS = 8

#: elements per slice of the chunked CPU update (measured on a 2-core Xeon with 2 MiB L2 per core: the five
#: slice operands of 128 KiB each stay in L2 and Python overhead stays under 5 % at 16x4x256x256)
CHUNK = 1 << 15


def _combine(dst, terms):
    """``dst[...] = sum(coef * x)`` in the order given, each product fused into the running sum."""
    terms = [(coef, x) for coef, x in terms if not (isinstance(coef, (int, float)) and coef == 0)]
    if not terms:
        dst.zero_()
        return
    (coef, x), rest = terms[0], terms[1:]
    if isinstance(coef, (int, float)) and coef == 1 and rest and isinstance(rest[0][0], (int, float)):
        (coef, y), rest = rest[0], rest[1:]
        torch.add(x, y, alpha=coef, out=dst)
    else:
        torch.mul(x, coef, out=dst)
    for coef, y in rest:
        if isinstance(coef, (int, float)):
            dst.add_(y, alpha=coef)
        else:
            dst.addcmul_(y, coef)
