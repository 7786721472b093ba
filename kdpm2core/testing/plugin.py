"""pytest plugin (``pytest11`` entry point ``kdpm2``): options and the backend x device x dtype matrix.

The matrix is data read from the plugin registry, never a list written here: every backend in
``kdpm2core.available_backends()`` (or the ones named with ``--kdpm2-backend``), every device in its
``devices()``, and the dtypes a test asks for with ``@pytest.mark.kdpm2_dtypes(...)``. A combination the backend
cannot run is still listed, with a skip marker that says why; a backend may declare known failures as a
``conformance_xfail`` mapping of test name to reason, which become strict ``xfail`` markers. A key is a test
function's name (every parametrization) or a full test name such as ``test_normal[mine-cpu-float16]`` (that
one); a key that names no test is a usage error.

The protocol section (``test_backend_protocol``, the backend object's own methods) runs before every other
test. Once a backend fails one of its tests, that backend's other tests are skipped, naming them: they would
fail for the same cause with messages far from it, while a protocol failure says which method to override.

Tests receive ``kdpm2_target`` (a :class:`~kdpm2core.testing.support.Target`) or ``kdpm2_case`` (a
:class:`~kdpm2core.testing.support.Case`). Outside those two parameters this plugin does nothing, so loading it
in unrelated pytest sessions costs nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

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


def pytest_generate_tests(metafunc):
    names = metafunc.fixturenames
    if "kdpm2_target" not in names and "kdpm2_case" not in names:
        return
    targets = _targets(metafunc.config)
    if "kdpm2_target" in names:
        params = [pytest.param(t, id=f"{t.backend_name}-{t.device_name}") for t in targets]
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
                skip = _dtype_skip(t, dtype)
                marks = [pytest.mark.skip(reason=skip)] if skip else []
                params.append(pytest.param(case, id=f"{t.backend_name}-{t.device_name}-{dtype}", marks=marks))
        metafunc.parametrize("kdpm2_case", params, indirect=True)


def _suite_tests() -> set[str]:
    """The test functions of kdpm2core.testing, read from its source: the same whatever ``-k`` or files select."""
    return {
        node.name
        for path in Path(__file__).parent.glob("test_*.py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test")
    }


def _target_of(item) -> Target | None:
    params = getattr(getattr(item, "callspec", None), "params", {})
    return params.get("kdpm2_case") or params.get("kdpm2_target")


PROTOCOL = Path(__file__).parent / "test_backend_protocol.py"  #: the protocol section, run first
_PROTOCOL_FAILURES = pytest.StashKey[dict]()  # backend name -> names of the protocol tests it failed


def _is_protocol(item) -> bool:
    return Path(item.path) == PROTOCOL


@pytest.hookimpl(tryfirst=True)  # before -k and -m deselect: a key is checked against every collected test
def pytest_collection_modifyitems(config, items):
    """The protocol section runs first; then each backend's ``conformance_xfail``: every key must name a test,
    and the tests it names become strict xfails."""
    items.sort(key=lambda item: not _is_protocol(item))  # stable: the rest keep their order
    collected: dict[str, tuple[object, list]] = {}  # backend name -> (backend, its items)
    for item in items:
        target = _target_of(item)
        if target is not None and target.backend is not None:
            collected.setdefault(target.backend_name, (target.backend, []))[1].append(item)
    for name, (backend, backend_items) in collected.items():
        known = getattr(backend, "conformance_xfail", None) or {}
        _check_known_failures(name, known, backend_items)
        for item in backend_items:
            reason = known.get(item.name, known.get(item.originalname))
            if reason is not None:
                item.add_marker(pytest.mark.xfail(reason=f"{name}: {reason}", strict=True))


def _check_known_failures(backend_name: str, known, items) -> None:
    """Raise a usage error for a ``conformance_xfail`` key that names no test (``items``: the backend's tests)."""
    if not known:
        return
    functions = {item.originalname for item in items}
    full_names = {item.name for item in items}
    tests = functions | _suite_tests()
    for key in known:
        function = key.partition("[")[0]
        if function not in tests:
            raise pytest.UsageError(
                f"backend {backend_name!r}: conformance_xfail key {key!r} names no test of kdpm2core.testing "
                f"(a key is a test function's name, or a full test name such as 'test_normal[{backend_name}-cpu-float32]')"
            )
        if "[" in key and function in functions and key not in full_names:
            examples = sorted(n for n in full_names if n.startswith(function + "["))[:3]
            raise pytest.UsageError(
                f"backend {backend_name!r}: conformance_xfail key {key!r} names no parametrization of {function} "
                f"on this backend; its test names are like {', '.join(examples)}"
            )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Remember which backends failed a protocol test (the backend object itself misbehaves)."""
    report = yield
    target = _target_of(item)
    if report.failed and target is not None and _is_protocol(item):
        item.config.stash.setdefault(_PROTOCOL_FAILURES, {}).setdefault(target.backend_name, []).append(item.name)
    return report


def pytest_runtest_setup(item):
    """Skip a backend's numeric tests once it failed a protocol test: they would fail for the same reason, far
    from it; the protocol failures, reported first, say which method to override."""
    target = _target_of(item)
    failed = item.config.stash.get(_PROTOCOL_FAILURES, {}).get(getattr(target, "backend_name", None))
    if failed and not _is_protocol(item):
        shown = ", ".join(failed[:3]) + (f" and {len(failed) - 3} more" if len(failed) > 3 else "")
        pytest.skip(f"backend {target.backend_name!r} failed the protocol tests ({shown}): fix those first")


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
