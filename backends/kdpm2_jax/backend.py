"""JAX adapter: immutable arrays, ``jax.random`` keys, devices and a ``lax.fori_loop`` loop.

The substep update is the generic Array API one: under ``jax.jit`` XLA fuses each combination into one
elementwise kernel, so there is nothing to hand-fuse here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kdpm2core.backend import ArrayAPIBackend


class JaxBackend(ArrayAPIBackend):
    """Backend on ``jax.numpy`` (JAX implements the Array API itself)."""

    inplace = False
    jit = True

    def __init__(self):
        super().__init__("jax", jnp)
        self.version = jax.__version__

    @property
    def float64(self):
        return bool(jax.config.jax_enable_x64)

    def device(self, spec):
        if spec is None or isinstance(spec, (jax.Device, jax.sharding.Sharding)):
            return spec
        if not isinstance(spec, str):
            raise ValueError(f"device must be None, a string such as 'cpu:0' or a jax.Device, got {spec!r}")
        platform, _, index = spec.partition(":")
        platform = {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)
        try:
            return jax.devices(platform)[int(index or 0)]
        except (RuntimeError, IndexError, ValueError) as exc:
            raise ValueError(f"device {spec!r} is not available to JAX ({self.devices()}): {exc}") from None

    def devices(self):
        return [f"{d.platform}:{d.id}" for d in jax.devices()]

    def asarray(self, obj, *, dtype=None, device=None):
        x = jnp.asarray(obj, dtype=dtype)
        return x if device is None else jax.device_put(x, device)

    def to_numpy(self, x):
        return np.asarray(x)

    def synchronize(self, x=None):
        if x is None:
            jax.effects_barrier()
        else:
            jax.block_until_ready(x)

    def rng(self, seed, device=None):
        # a traced integer seed is fine too, so that ``vmap`` can map over seeds
        return jax.random.key(seed if isinstance(seed, jax.Array) else int(seed))

    def normal(self, rng, shape, *, dtype, device=None):
        rng, key = jax.random.split(rng)
        sample = jax.random.normal(key, shape, dtype=dtype)
        return (sample if device is None else jax.device_put(sample, device)), rng

    def loop(self, n, body, carry):
        return jax.lax.fori_loop(0, n, body, carry)

    def compiling(self, *arrays):
        """The stateful scheduler asks this on every call, with its array arguments. Under a JAX trace
        (``jit``, ``scan``, ``vmap``) they are tracers, and the scheduler's Python state, the step index and the
        stored sample, would be read once and frozen into the traced function, which then replays the first
        substep's coefficients: refuse, pointing at the functional API."""
        if any(isinstance(x, jax.core.Tracer) for x in arrays):
            raise RuntimeError(
                "KDPM2DiscreteScheduler cannot run inside jax.jit, lax.scan or vmap: its step index is Python "
                "state, which a trace reads once. Use kdpm2core.functional (make_plan, sample, or init/step), "
                "whose state is arrays, or call the scheduler outside the traced function"
            )
        return False
