"""The plugin hooks of kdpm2: a backend plugin implements ``register_backends``."""

import pluggy

hookspec = pluggy.HookspecMarker("kdpm2")
hookimpl = pluggy.HookimplMarker("kdpm2")


@hookspec
def register_backends(register):
    """Call ``register(name, factory, requires=(module, ...))`` once per backend; ``factory()`` builds it lazily."""
