"""pytest plugin (``pytest11`` entry point ``kdpm2``): options and the backend x device x dtype matrix.

The matrix is data read from the plugin registry, never a list written here: every backend in
``kdpm2core.available_backends()`` (or the ones named with ``--kdpm2-backend``), every device in its
``devices()``, and the dtypes a test asks for with ``@pytest.mark.kdpm2_dtypes(...)``. A combination the backend
cannot run is still listed, with a skip marker that says why; a backend may declare known failures as a
``conformance_xfail`` mapping of test name to reason, which become strict ``xfail`` markers.

Tests receive ``kdpm2_target`` (a :class:`~kdpm2core.testing.support.Target`) or ``kdpm2_case`` (a
:class:`~kdpm2core.testing.support.Case`). Outside those two parameters this plugin does nothing, so loading it
in unrelated pytest sessions costs nothing.
"""

from __future__ import annotations

import pytest

from kdpm2core.testing.support import FLOAT_DTYPES, Case, Target


def pytest_addoption(parser):
    group = parser.getgroup("kdpm2", "kdpm2 conformance suite")
    group.addoption(
        "--kdpm2-backend",
        action="append",
        default=None,
        help="run the conformance suite on this backend only (repeatable); default: every available backend",
    )


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "kdpm2_dtypes(*names): dtypes a kdpm2_case test runs with (default: all floating dtypes); "
        "'widest' means float64 where the backend has it, else float32",
    )
    if config.getoption("kdpm2_backend", None):
        _targets(config)  # a backend named on the command line that cannot load is a usage error, up front


def _targets(config) -> list[Target]:
    cached = getattr(config, "_kdpm2_targets", None)
    if cached is not None:
        return cached
    from kdpm2core.plugins import BackendError, available_backends, get_backend

    requested = config.getoption("kdpm2_backend", None)
    names = requested or available_backends()
    targets = []
    for name in names:
        try:
            backend = get_backend(name)
            devices = list(backend.devices())
        except BackendError as exc:
            if requested:
                raise pytest.UsageError(f"--kdpm2-backend={name}: {exc}") from None
            targets.append(Target(name, "-", None, str(exc)))  # reported as an error, not skipped
            continue
        targets.extend(Target(name, device, backend) for device in devices)
    config._kdpm2_targets = targets
    return targets


def _dtype_skip(target: Target, dtype: str) -> str | None:
    """Why ``target`` cannot run ``dtype``, or None when it can."""
    if target.backend is None:
        return None
    if dtype == "float64" and not target.backend.float64:
        return f"backend {target.backend_name!r} reports float64=False (for JAX: jax_enable_x64 is off)"
    try:
        target.backend.dtype(dtype)
    except (TypeError, AttributeError):
        return f"backend {target.backend_name!r} has no {dtype} dtype"
    return None


def _marks(target: Target, test_name: str, skip: str | None) -> list:
    marks = []
    if skip:
        marks.append(pytest.mark.skip(reason=skip))
    known = getattr(target.backend, "conformance_xfail", None) or {}
    if test_name in known:
        marks.append(pytest.mark.xfail(reason=f"{target.backend_name}: {known[test_name]}", strict=True))
    return marks


def pytest_generate_tests(metafunc):
    names = metafunc.fixturenames
    if "kdpm2_target" not in names and "kdpm2_case" not in names:
        return
    targets = _targets(metafunc.config)
    test_name = metafunc.function.__name__
    if "kdpm2_target" in names:
        params = [
            pytest.param(t, id=f"{t.backend_name}-{t.device_name}", marks=_marks(t, test_name, None)) for t in targets
        ]
        metafunc.parametrize("kdpm2_target", params, indirect=True)
    if "kdpm2_case" in names:
        marker = metafunc.definition.get_closest_marker("kdpm2_dtypes")
        dtypes = marker.args if marker else FLOAT_DTYPES
        params = []
        for t in targets:
            for dtype in dtypes:
                if dtype == "widest":  # the most precise dtype the backend has: float64, else float32
                    dtype = "float64" if _dtype_skip(t, "float64") is None else "float32"
                case = Case(t.backend_name, t.device_name, t.backend, t.error, dtype)
                marks = _marks(t, test_name, _dtype_skip(t, dtype))
                params.append(pytest.param(case, id=f"{t.backend_name}-{t.device_name}-{dtype}", marks=marks))
        metafunc.parametrize("kdpm2_case", params, indirect=True)


def _loaded(request):
    target = request.param
    if target.error is not None:  # a backend that failed to load fails its tests with the loader's message
        pytest.fail(f"backend {target.backend_name!r} failed to load: {target.error}", pytrace=False)
    return target


@pytest.fixture
def kdpm2_target(request):
    """One backend on one device (a :class:`~kdpm2core.testing.support.Target`), from the registry."""
    return _loaded(request)


@pytest.fixture
def kdpm2_case(request):
    """One backend, device and dtype (a :class:`~kdpm2core.testing.support.Case`), from the registry."""
    return _loaded(request)
