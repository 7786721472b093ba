"""The JAX backend of kdpm2 (CPU, GPU, TPU; jit, scan, vmap and sharding); jax is imported on first use."""

from kdpm2core.hookspecs import hookimpl


def make_backend():
    from kdpm2_jax.backend import JaxBackend

    return JaxBackend()


@hookimpl
def register_backends(register):
    register("jax", make_backend, requires=("jax",))
