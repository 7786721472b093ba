"""PyTorch adapter: device parsing, torch's generator, and a substep fused into ``add(..., alpha=)`` kernels."""

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
        sample = torch.randn(shape, generator=rng, dtype=torch.float32, device=rng.device)
        return sample.to(device=device, dtype=dtype), rng

    def lincomb(self, terms):
        # ``add(x, y, alpha=c)`` computes x + c*y in one kernel, so a combination with a coefficient-1 term
        # (every epsilon substep) is one kernel, and any other is two.
        if not all(isinstance(coef, (int, float)) for coef, _ in terms):
            return super().lincomb(terms)
        terms = sorted(((coef, x) for coef, x in terms if coef != 0), key=lambda term: term[0] != 1)
        (coef, x), rest = terms[0], terms[1:]
        if coef == 1 and rest:
            (coef, y), rest = rest[0], rest[1:]
            result = torch.add(x, y, alpha=coef)
        else:
            result = torch.mul(x, coef)
        for coef, y in rest:
            result.add_(y, alpha=coef)
        return result
