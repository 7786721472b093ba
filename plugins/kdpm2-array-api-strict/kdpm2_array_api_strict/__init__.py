"""A kdpm2 backend on ``array_api_strict``, the Array API's reference namespace with nothing extra.

The scheduler runs here through :class:`kdpm2core.backend.ArrayAPIBackend`'s generic defaults only, so the
conformance suite passing on this backend shows that the core needs nothing outside the standard. Besides the
default ``CPU_DEVICE`` it exposes ``device1``, one of array-api-strict's simulated devices, so the suite checks
that results stay on the device of their inputs.
"""

from __future__ import annotations

import numpy as np

from kdpm2core import hookimpl
from kdpm2core.backend import ArrayAPIBackend

__all__ = ["StrictBackend", "register_backends"]

NAME = "array-api-strict"


class StrictBackend(ArrayAPIBackend):
    """``array_api_strict`` through the generic Array API defaults; only devices and host copies differ."""

    DEVICES = ("CPU_DEVICE", "device1")

    def __init__(self):
        import array_api_strict

        super().__init__(NAME, array_api_strict)

    def device(self, spec):
        if spec is None:
            return None
        if isinstance(spec, self.xp.Device):
            return spec
        if isinstance(spec, str) and spec in ("cpu", *self.DEVICES):
            return self.xp.Device("CPU_DEVICE" if spec == "cpu" else spec)
        raise ValueError(f"device {spec!r} is not available on backend {NAME!r}; it has {list(self.DEVICES)}")

    def devices(self):
        return list(self.DEVICES)

    def to_numpy(self, x):
        # DLPack is the standard's only way out of a namespace (np.asarray would rely on __array__)
        return np.from_dlpack(x).copy()


def make_backend() -> StrictBackend:
    return StrictBackend()


@hookimpl
def register_backends(register):
    register(NAME, make_backend, requires=("array_api_strict",))
