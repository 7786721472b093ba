"""Backends come from the ``kdpm2`` entry-point group, are imported lazily, and are chosen by name or by
``$KDPM2_BACKEND``. (Broken and hostile third-party plugins: tests/test_plugin_isolation.py.)"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import kdpm2core
from kdpm2core import KDPM2DiscreteScheduler

FIRST_PARTY = {"numpy": "kdpm2_numpy", "torch": "kdpm2_torch", "jax": "kdpm2_jax"}


def run_python(code: str, **env) -> dict:
    """Run ``code`` in a fresh interpreter (its last stdout line is JSON) and return that JSON."""
    environment = {k: v for k, v in os.environ.items() if k not in ("KDPM2_BACKEND", "KDPM2_LOAD_PLUGINS")}
    environment.update(env)
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=environment, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_numpy_backend_imports_neither_torch_nor_jax():
    result = run_python(
        """
        import json, sys
        import numpy as np
        import kdpm2core
        names = kdpm2core.available_backends()  # discovery must not import frameworks either
        scheduler = kdpm2core.KDPM2DiscreteScheduler(backend="numpy")
        scheduler.set_timesteps(4)
        x = np.ones((2, 3), np.float32)
        t = scheduler.timesteps[0]
        out = scheduler.step(x, t, scheduler.scale_model_input(x, t))
        noisy = scheduler.add_noise(x, x, scheduler.timesteps[:1])
        print(json.dumps({"names": names, "loaded": sorted(m for m in ("torch", "jax", "jaxlib", "diffusers") if m in sys.modules)}))
        """
    )
    assert {"numpy", "torch", "jax"} <= set(result["names"])
    assert result["loaded"] == []


def test_available_backends_lists_the_first_party_ones():
    names = kdpm2core.available_backends()
    assert names == sorted(names)
    for name in FIRST_PARTY:
        assert name in names
        backend = kdpm2core.get_backend(name)
        assert backend.name == name and backend is kdpm2core.get_backend(name)  # built once


def test_backend_xp_is_the_array_api_compat_namespace():
    array_api_compat = pytest.importorskip("array_api_compat")
    assert array_api_compat.array_namespace(np.ones(2)) is kdpm2core.get_backend("numpy").xp
    torch = pytest.importorskip("torch")
    assert array_api_compat.array_namespace(torch.ones(2)) is kdpm2core.get_backend("torch").xp


@pytest.mark.parametrize("name", ["nope", "NumPy", "", "torch "])
def test_unknown_backend_lists_the_available_names(name):
    with pytest.raises(LookupError) as info:
        kdpm2core.get_backend(name)
    assert not isinstance(info.value, (IndexError, KeyError))
    assert repr(name) in str(info.value)
    for available in kdpm2core.available_backends():
        assert available in str(info.value)


def test_backend_name_of_wrong_type():
    with pytest.raises(TypeError, match="backend"):
        kdpm2core.get_backend(3)


def test_environment_variable_selects_the_default_backend(monkeypatch):
    monkeypatch.setenv("KDPM2_BACKEND", "torch")
    assert KDPM2DiscreteScheduler().backend.name == "torch"
    assert KDPM2DiscreteScheduler(backend="numpy").backend.name == "numpy"  # an explicit name wins
    monkeypatch.setenv("KDPM2_BACKEND", "no-such-backend")
    with pytest.raises(LookupError, match="no-such-backend"):
        KDPM2DiscreteScheduler()
    monkeypatch.delenv("KDPM2_BACKEND")
    assert KDPM2DiscreteScheduler().backend.name == "numpy"


def test_environment_variable_in_a_fresh_process():
    result = run_python(
        """
        import json, sys
        import kdpm2core
        s = kdpm2core.KDPM2DiscreteScheduler()
        print(json.dumps({"backend": s.backend.name, "timesteps": type(s.timesteps).__module__}))
        """,
        KDPM2_BACKEND="jax",
    )
    assert result["backend"] == "jax" and result["timesteps"].startswith("jax")


def test_first_party_backends_are_registered_through_entry_points():
    entry_points = {ep.name: ep for ep in importlib.metadata.entry_points(group="kdpm2")}
    for name, module in FIRST_PARTY.items():
        assert entry_points[name].value == module
        assert entry_points[name].dist is not None and entry_points[name].dist.name == "kdpm2"
    rows = {row["name"]: row for row in kdpm2core.backend_report()}
    for name in FIRST_PARTY:
        assert rows[name]["distribution"] == "kdpm2"
        assert rows[name]["plugin"] == name
        assert rows[name]["status"] == "ok"


def test_load_plugins_variable_limits_discovery():
    result = run_python(
        """
        import json, kdpm2core
        print(json.dumps(kdpm2core.available_backends()))
        """,
        KDPM2_LOAD_PLUGINS="numpy,jax",
    )
    assert result == ["jax", "numpy"]
