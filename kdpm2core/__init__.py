"""kdpm2core: the KDPM2 diffusion sampler, written once against the Array API.

Backends (NumPy, PyTorch, JAX, and any third-party plugin) are found through the ``kdpm2`` entry-point
group and imported only when used: ``import kdpm2core`` imports neither torch nor jax.
"""

from kdpm2core.hookspecs import hookimpl
from kdpm2core.plugins import BackendError, available_backends, backend_report, get_backend
from kdpm2core.scheduler import VERSION as __version__
from kdpm2core.scheduler import (
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    KDPM2DiscreteSchedulerOutput,
)

__all__ = [
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "KDPM2DiscreteSchedulerOutput",
    "available_backends",
    "get_backend",
    "backend_report",
    "BackendError",
    "hookimpl",
    "__version__",
]
