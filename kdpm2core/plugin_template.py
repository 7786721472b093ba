"""The files of a new backend plugin distribution (``kdpm2 plugin new NAME``).

The generated backend runs on NumPy through array-api-compat, so it installs with ``pip install -e`` and passes
``kdpm2 conformance NAME`` as it is; its module says where the library to support goes and which methods an
adapter may need to override (docs/plugins.md has the full table).
"""

from __future__ import annotations

import re
from pathlib import Path

from kdpm2core.plugins import _NAME  # the backend names the plugin registry accepts

__all__ = ["module_name", "write_plugin"]

PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "kdpm2-{name}"
version = "0.1.0"
description = "kdpm2 backend {name}."
requires-python = ">=3.10"
dependencies = ["kdpm2", "numpy>=1.26", "array-api-compat"]

[project.optional-dependencies]
test = ["pytest>=8", "hypothesis>=6.100"]

# kdpm2 finds the backend through this entry-point group, as it finds its own numpy, torch and jax backends
[project.entry-points.kdpm2]
{name} = "{module}"

[tool.setuptools]
packages = ["{module}"]
"""

MODULE = '''\
"""The kdpm2 backend ``{name}``.

It runs on NumPy as generated. For another array library, set ``xp`` to the namespace that
``array_api_compat.array_namespace(x)`` returns for its arrays, and override what the library does differently
(see docs/plugins.md): ``device``/``devices`` (more than one CPU), ``device_of`` (arrays without ``.device``),
``to_numpy`` (``numpy.asarray`` does not make a host copy of them), ``rng``/``normal`` (its own generator),
``multiply``/``multiply_add`` (a fused multiply-add), ``factors`` (ready 0-d scale factors), ``loop`` (a
compiled loop, with ``jit = True``); set ``float64 = False`` or ``inplace = False`` where they do not hold.
Then run ``kdpm2 conformance {name}``.
"""

from __future__ import annotations

from kdpm2core import hookimpl
from kdpm2core.backend import ArrayAPIBackend

NAME = "{name}"


class Backend(ArrayAPIBackend):
    """NumPy through array-api-compat: every default of ``ArrayAPIBackend`` fits it as is."""

    def __init__(self):
        import array_api_compat.numpy  # the library is imported on first use, never at registration
        import numpy

        super().__init__(NAME, array_api_compat.numpy)
        self.version = numpy.__version__  # the version ``kdpm2 backends`` prints


def make_backend() -> Backend:
    return Backend()


@hookimpl
def register_backends(register):
    register(NAME, make_backend, requires=("numpy", "array_api_compat"))
'''

TEST = '''\
"""The kdpm2 conformance suite on this plugin's backend: every device it reports, every dtype it has."""

import kdpm2core.testing


def test_conformance():
    assert kdpm2core.testing.run("{name}", ["-q"]) == 0
'''


def module_name(name: str) -> str:
    """The import name of the plugin's module for backend ``name``: ``my-lib.x`` -> ``kdpm2_my_lib_x``."""
    return "kdpm2_" + re.sub(r"[.-]", "_", name)


def write_plugin(name: str, directory: str | Path) -> list[Path]:
    """Write the plugin distribution for backend ``name`` into ``directory`` (which must not exist yet, or be
    empty); returns the files written."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"backend name {name!r} must be lowercase letters, digits, '_', '.' or '-', starting with a letter"
        )
    if name in ("numpy", "torch", "jax"):
        raise ValueError(f"backend name {name!r} belongs to kdpm2 itself; choose another")
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ValueError(f"directory {str(directory)!r} already exists and is not empty")
    module = module_name(name)
    files = {
        directory / "pyproject.toml": PYPROJECT.format(name=name, module=module),
        directory / module / "__init__.py": MODULE.format(name=name),
        directory / "tests" / "test_conformance.py": TEST.format(name=name),
    }
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return list(files)
