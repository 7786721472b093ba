"""The NumPy backend of kdpm2, registered through the ``kdpm2`` entry-point group like any plugin."""

from kdpm2core.hookspecs import hookimpl


def make_backend():
    """The NumPy backend: every default of :class:`kdpm2core.backend.ArrayAPIBackend` fits NumPy as is."""
    import array_api_compat.numpy

    from kdpm2core.backend import ArrayAPIBackend

    return ArrayAPIBackend("numpy", array_api_compat.numpy)


@hookimpl
def register_backends(register):
    register("numpy", make_backend, requires=("numpy",))
