"""PyTorch adapter: device parsing, torch's generator, ready 0-d factors, and torch's fused multiply-add for the
substep's terms."""

from __future__ import annotations

import array_api_compat.torch
import torch

from kdpm2core.backend import ArrayAPIBackend


class TorchBackend(ArrayAPIBackend):
    """Backend on ``torch``; arrays are ``torch.Tensor`` on any device torch supports."""

    def __init__(self):
        super().__init__("torch", array_api_compat.torch)
        self.version = torch.__version__

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
        # as diffusers' randn_tensor: drawn in the dtype asked for, on the generator's device, then moved (float64
        # draws are another stream than float32's; float16 and bfloat16 are float32's, rounded)
        return torch.randn(shape, generator=rng, dtype=dtype, device=rng.device).to(device=device), rng

    def owns(self, x):
        # a plain isinstance check: traceable by torch.compile (array-api-compat's is not)
        return isinstance(x, torch.Tensor)

    def compiling(self, *arrays):
        return torch.compiler.is_compiling()

    def factors(self, values, device=None):
        """0-d float32 CPU tensors: torch makes a new 0-d tensor of a Python number on every operation, and a CPU
        0-d tensor multiplies tensors of every device, its value passed to the kernel as the number's would be
        (so ``x * factor`` rounds as ``x * float(value)`` does for float32 ``x``). Made outside inference mode,
        so that a schedule set under ``torch.inference_mode`` still serves a later autograd pass."""
        with torch.inference_mode(False):
            return torch.as_tensor(values, dtype=torch.float32, device="cpu").unbind()

    def multiply(self, x, coef, out=None):
        return torch.mul(x, coef) if out is None else torch.mul(x, coef, out=out)

    def multiply_add(self, acc, coef, x, out=None):
        """``acc + coef*x`` as one torch kernel: ``add(alpha=)`` for a Python number, ``addcmul`` for a 0-d
        tensor (torch takes no tensor ``alpha``). Both compute ``acc + coef*x`` per element in one pass, and on a
        given device and CPU capability they round alike (both fuse the multiply-add, or neither does), so
        the stateful and functional paths agree bit for bit (tests/test_torch_backend.py checks it). ``out is acc``
        updates in place, which autograd records (it refuses ``out=``)."""
        if isinstance(coef, torch.Tensor):
            if out is None:
                return torch.addcmul(acc, x, coef)
            return acc.addcmul_(x, coef) if out is acc else torch.addcmul(acc, x, coef, out=out)
        if out is None:
            return torch.add(acc, x, alpha=coef)
        return acc.add_(x, alpha=coef) if out is acc else torch.add(acc, x, alpha=coef, out=out)
