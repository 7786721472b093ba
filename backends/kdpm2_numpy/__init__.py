"""The NumPy backend of kdpm2, registered through the ``kdpm2`` entry-point group like any plugin."""

from kdpm2core.hookspecs import hookimpl


def make_backend():
    from kdpm2_numpy.backend import NumpyBackend

    return NumpyBackend()


@hookimpl
def register_backends(register):
    register("numpy", make_backend, requires=("numpy",))
