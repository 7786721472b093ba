"""k-diffusion's samplers (``k_diffusion.sampling`` of k-diffusion 0.1.1.post1) as a test reference.

k-diffusion's package ``__init__`` imports its whole training stack (torchvision, scikit-image, CLIP), which does
not install beside the CPU torch these tests run on; its sampler module needs only torch, scipy, torchdiffeq,
torchsde and one helper of ``k_diffusion.utils``. So k-diffusion is installed without its dependencies
(README: the test setup), and this module loads ``sampling.py`` from the installed files under a package object
of its own, with ``utils`` loaded while a placeholder stands in for torchvision (``utils`` imports it for image
helpers that the samplers never call). The sampler code that runs is k-diffusion's, unchanged.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest


def _load(package: types.ModuleType, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(
        f"{package.__name__}.{name}", Path(package.__path__[0]) / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    setattr(package, name, module)
    spec.loader.exec_module(module)
    return module


def load_sampling() -> types.ModuleType:
    """``k_diffusion.sampling``, or skip the calling test when k-diffusion (or a module it needs) is missing."""
    if "_kdpm2_k_diffusion.sampling" in sys.modules:
        return sys.modules["_kdpm2_k_diffusion.sampling"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("k-diffusion is not installed (README: pip install --no-deps k-diffusion==0.1.1.post1 ...)")
    for needed in ("torchdiffeq", "torchsde", "scipy", "PIL", "safetensors"):
        if importlib.util.find_spec(needed) is None:
            pytest.skip(f"k-diffusion's sampler needs {needed}, which is not installed")
    package = types.ModuleType("_kdpm2_k_diffusion")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules[package.__name__] = package
    placeholders = {}
    if importlib.util.find_spec("torchvision") is None:
        transforms = types.ModuleType("torchvision.transforms")
        transforms.functional = types.ModuleType("torchvision.transforms.functional")
        placeholders = {
            "torchvision": types.ModuleType("torchvision"),
            "torchvision.transforms": transforms,
            "torchvision.transforms.functional": transforms.functional,
        }
        placeholders["torchvision"].transforms = transforms
    saved = {name: sys.modules.get(name) for name in placeholders}
    sys.modules.update(placeholders)
    try:
        _load(package, "utils")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return _load(package, "sampling")
