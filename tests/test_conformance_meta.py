"""Tests of the conformance suite itself: its reference, its helpers, and how a plugin author runs it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from test_plugin_isolation import make_distribution

from kdpm2core.testing import cases
from kdpm2core.testing.reference import Gaussian, sample_dpm2, substep_sigmas
from kdpm2core.testing.support import Case, assert_close

pytest_plugins = ["pytester"]

# NumPy under another name, as a plugin distribution; its known failures come from $NUMPY_COPY_XFAIL (JSON)
NUMPY_COPY = """
import json, os
from kdpm2core import hookimpl

def make():
    import array_api_compat.numpy
    from kdpm2core.backend import ArrayAPIBackend
    backend = ArrayAPIBackend("numpy-copy", array_api_compat.numpy)
    backend.conformance_xfail = json.loads(os.environ.get("NUMPY_COPY_XFAIL", "{}"))
    return backend

@hookimpl
def register_backends(register):
    register("numpy-copy", make, requires=("numpy",))
"""


def test_reference_is_second_order_on_the_gaussian():
    """The independent reference itself converges at order 2 to the exact solution (errors from 8 to 64 steps)."""
    gaussian = Gaussian(mu=-0.3, s0=1.3)
    x_start = np.array([-4.0, 0.5, 9.0])
    errors = []
    for n in (8, 16, 32, 64):
        sigmas = np.geomspace(30.0, 0.05, n + 1)
        got = sample_dpm2(gaussian.denoiser, x_start, sigmas)
        errors.append(np.max(np.abs(got - gaussian.solution(x_start, sigmas[0], sigmas[-1]))))
    orders = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(abs(p - 2) < 0.15 for p in orders), orders


def test_reference_final_step_to_zero_is_euler():
    """Into sigma = 0 the reference takes one Euler step, which with the exact denoiser lands on D(x, sigma)."""
    gaussian = Gaussian(mu=0.7, s0=0.4)
    x = np.array([1.5, -2.0])
    got = sample_dpm2(gaussian.denoiser, x, [2.0, 0.0])
    np.testing.assert_allclose(got, gaussian.denoiser(x, 2.0), rtol=1e-15)
    assert substep_sigmas([4.0, 1.0, 0.0]) == [4.0, 2.0, 1.0]


def test_assert_close_reports_backend_dtype_combination_and_size():
    from kdpm2core import get_backend

    case = Case("numpy", "cpu", get_backend("numpy"), None, "float32")
    x = case.array([1.0, 2.0, 3.0])
    assert_close(x, [1.0, 2.0, 3.0], case, what="ok")
    with pytest.raises(AssertionError) as info:
        assert_close(x, [1.0, 2.5, 3.0], case, what="karras/epsilon substep 3")
    message = str(info.value)
    for part in (
        "backend=numpy",
        "device=cpu",
        "dtype=float32",
        "karras/epsilon substep 3",
        "max abs error 0.5",
        "index (1,)",
    ):
        assert part in message, (part, message)
    with pytest.raises(AssertionError, match="dtype is float32, expected float64"):
        assert_close(x, [1.0, 2.0, 3.0], case, what="dtype", dtype="float64")
    with pytest.raises(AssertionError, match=r"shape is \(3,\), expected \(1, 3\)"):
        assert_close(x, [[1.0, 2.0, 3.0]], case, what="shape")
    with pytest.raises(AssertionError, match="not an array of backend 'numpy'"):
        assert_close([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], case, what="namespace")


def test_reference_data_is_compact_and_complete():
    data = cases.load()
    keys = [case["key"] for case in data["cases"]]
    assert len(keys) == len(set(keys)) == 4 * 4 * 4 * 2 * 4
    wanted = {key for key, _, _, with_trajectory in cases.grid() if with_trajectory}
    assert {case["key"] for case in data["cases"] if "prev" in case["slices"]} == wanted and len(wanted) > 380
    from importlib import resources

    size = resources.files("kdpm2core.testing").joinpath("data", cases.DATA_FILE).stat().st_size
    assert size < 2 * 1024 * 1024


@pytest.fixture
def numpy_copy(pytester, monkeypatch):
    """pytester, with the plugin distribution of NUMPY_COPY installed next to its test files, and a test file
    whose ``test_two`` fails on any backend but numpy and ``test_dtype`` on numpy-copy in float16 only."""
    make_distribution(pytester.path, "kdpm2-numpy-copy", "numpy-copy", NUMPY_COPY)
    pytester.makepyfile(
        test_matrix="""
        def test_one(kdpm2_case):
            assert kdpm2_case.backend.name == kdpm2_case.backend_name

        def test_two(kdpm2_target):
            assert kdpm2_target.backend_name == "numpy"

        def test_dtype(kdpm2_case):
            assert (kdpm2_case.backend_name, kdpm2_case.dtype_name) != ("numpy-copy", "float16")
        """,
    )
    monkeypatch.setenv("PYTHONPATH", str(pytester.path), prepend=os.pathsep)
    monkeypatch.setenv("KDPM2_LOAD_PLUGINS", "numpy,numpy-copy")
    return pytester


def known_failures(monkeypatch, mapping: dict) -> None:
    monkeypatch.setenv("NUMPY_COPY_XFAIL", json.dumps(mapping))


def test_matrix_comes_from_the_registry(numpy_copy, monkeypatch):
    """A newly installed plugin (a dist-info with a ``kdpm2`` entry point) joins the matrix with no edit to the
    suite; a dtype it lacks is listed as skipped with the reason, and its declared known failure is an xfail."""
    known_failures(monkeypatch, {"test_two": "a known failure of this backend", "test_dtype": "no float16"})
    result = numpy_copy.runpytest_subprocess("-rsx", "-p", "no:cacheprovider", "-v", "-k", "not test_dtype")
    result.stdout.fnmatch_lines(
        [
            "*test_one?numpy-cpu-float64?*PASSED*",
            "*test_one?numpy-copy-cpu-float32?*PASSED*",
            "*backend 'numpy-copy' has no bfloat16 dtype*",
            "*XFAIL*test_two?numpy-copy-cpu?*a known failure of this backend*",
        ]
    )
    result.assert_outcomes(passed=7, skipped=2, xfailed=1, deselected=8)


def test_known_failure_of_one_parametrization(numpy_copy, monkeypatch):
    # strict: the key must select exactly the failing float16 case, or a passing case would XPASS and fail
    known_failures(monkeypatch, {"test_dtype[numpy-copy-cpu-float16]": "no float16 arithmetic"})
    result = numpy_copy.runpytest_subprocess("-rsx", "-p", "no:cacheprovider", "-v", "-k", "test_dtype")
    result.stdout.fnmatch_lines(["*XFAIL*test_dtype?numpy-copy-cpu-float16?*no float16 arithmetic*"])
    result.assert_outcomes(passed=5, skipped=2, xfailed=1, deselected=10)


@pytest.mark.parametrize(
    "key, words",
    [
        ("test_dtpye", ["'test_dtpye'", "names no test"]),
        (
            "test_dtype[numpy-copy-cpu-float61]",
            ["'test_dtype[numpy-copy-cpu-float61]'", "test_dtype[numpy-copy-cpu-float16]"],
        ),
    ],
)
def test_unknown_known_failure_key_is_a_usage_error(numpy_copy, monkeypatch, key, words):
    known_failures(monkeypatch, {key: "typo"})
    result = numpy_copy.runpytest_subprocess("-p", "no:cacheprovider", "-k", "test_one")  # the key's test deselected
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    message = result.stderr.str()
    assert "numpy-copy" in message and all(word in message for word in words), message


def test_known_failure_keys_are_checked_against_the_whole_suite(numpy_copy, monkeypatch):
    # test_normal lives in a file this run does not collect, test_dtype is deselected by -k: neither is unknown
    known_failures(monkeypatch, {"test_normal": "no RNG", "test_dtype[numpy-copy-cpu-float16]": "no float16"})
    result = numpy_copy.runpytest_subprocess("-p", "no:cacheprovider", "-k", "test_one")
    result.assert_outcomes(passed=6, skipped=2, deselected=10)


GREEDY = """
import numpy as np
from kdpm2core import hookimpl
from kdpm2core.backend import ArrayAPIBackend

class Greedy(ArrayAPIBackend):
    def owns(self, x):  # wrong: its arrays are array_api_strict's, yet it claims NumPy's too
        return isinstance(x, np.ndarray) or super().owns(x)

@hookimpl
def register_backends(register):
    import array_api_strict
    register("greedy", lambda: Greedy("greedy", array_api_strict), requires=("array_api_strict",))
"""


def test_owns_rule_follows_the_backends_array_type(numpy_copy, monkeypatch):
    """A backend whose arrays are NumPy arrays may own NumPy arrays whatever its name; one whose arrays are not
    must reject them."""
    pytest.importorskip("array_api_strict")
    make_distribution(numpy_copy.path, "kdpm2-greedy", "greedy", GREEDY)
    monkeypatch.setenv("KDPM2_LOAD_PLUGINS", "numpy-copy,greedy")
    result = numpy_copy.runpytest_subprocess(
        "-p", "no:cacheprovider", "-v", "--pyargs", "kdpm2core.testing.test_backend_protocol", "-k", "owns_only"
    )
    result.stdout.fnmatch_lines(
        [
            "*test_owns_only_its_arrays?greedy-cpu?*FAILED*",
            "*test_owns_only_its_arrays?numpy-copy-cpu?*PASSED*",
            "*owns() accepts a NumPy array, but its own arrays are Array*",
        ]
    )
    result.assert_outcomes(passed=1, failed=1)


def test_suite_runs_without_diffusers_torch_or_jax(tmp_path):
    """What a plugin author sees: diffusers, torch and jax cannot even be imported, yet the suite collects
    and passes on a backend that needs none of them."""
    script = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("diffusers", "torch", "jax", "jaxlib"):
                    raise ImportError(f"{name} is blocked in this test")
        sys.meta_path.insert(0, Block())
        import kdpm2core.testing
        rc = kdpm2core.testing.run("array-api-strict", ["-q", "-p", "no:randomly", "-k", "protocol or scheduler_api or exact"])
        sys.exit(rc)
        """
    )
    pytest.importorskip("kdpm2_array_api_strict")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "error" not in result.stdout.lower()


BROKEN = """
import numpy as np
from kdpm2core import hookimpl
from kdpm2core.backend import ArrayAPIBackend

class WrongXp(ArrayAPIBackend):  # plain numpy, not the namespace array_api_compat gives NumPy arrays
    def __init__(self):
        super().__init__("wrong-xp", np)

class NoDeviceOf(ArrayAPIBackend):  # as for a library whose arrays have no .device
    def device_of(self, x):
        raise AttributeError(f"{type(x).__name__!r} object has no attribute 'device'")

class IgnoresDtype(ArrayAPIBackend):
    def asarray(self, obj, *, dtype=None, device=None):
        return self.xp.asarray(obj, dtype=self.xp.float64)

class ObjectToNumpy(ArrayAPIBackend):  # what numpy.asarray does with an array type it does not understand
    def to_numpy(self, x):
        host = np.empty((), dtype=object)
        host[()] = x
        return host

def make(cls, name):
    import array_api_compat.numpy
    return lambda: cls() if cls is WrongXp else cls(name, array_api_compat.numpy)

@hookimpl
def register_backends(register):
    for cls, name in ((WrongXp, "wrong-xp"), (NoDeviceOf, "no-device-of"), (IgnoresDtype, "ignores-dtype"),
                      (ObjectToNumpy, "object-to-numpy")):
        register(name, make(cls, name), requires=("numpy",))
"""


def test_protocol_failures_come_first_and_name_the_method_to_override(numpy_copy, monkeypatch):
    """Each misbehaving method fails a protocol test whose message names the method to override and why; the
    protocol section runs before the numeric tests, and a backend that failed it has its numeric tests skipped
    with a pointer back, while a correct backend runs them."""
    make_distribution(numpy_copy.path, "kdpm2-broken", "broken", BROKEN)
    monkeypatch.setenv("KDPM2_LOAD_PLUGINS", "numpy-copy,broken")
    result = numpy_copy.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "-v",
        "-rs",
        "--pyargs",
        "kdpm2core.testing",
        "-k",
        "test_owns_only or test_device_of or test_asarray_round_trip or test_functional_steps_equal",
    )
    out = result.stdout.str()
    for words in (
        [
            "owns() is False for its own asarray()",
            "xp is 'numpy'",
            "is 'array_api_compat.numpy'",
            "set xp to that namespace",
        ],
        ["device_of(x) raised AttributeError", "no attribute 'device'", "override device_of(x)"],
        ["asarray(values, dtype=float32) gave float64", "override asarray(obj, dtype=, device=)"],
        ["to_numpy(x) gave a ndarray of dtype object and shape ()", "0-d object array", "override to_numpy(x)"],
    ):
        assert all(word in out for word in words), (words, out[-6000:])
    lines = [
        line
        for line in out.splitlines()
        if "::test_" in line and ("PASSED" in line or "FAILED" in line or "SKIPPED" in line)
    ]
    protocol = [i for i, line in enumerate(lines) if "test_backend_protocol.py" in line]
    assert protocol and max(protocol) < min(i for i, line in enumerate(lines) if "test_functional_api.py" in line)
    for name in ("wrong-xp", "no-device-of", "ignores-dtype", "object-to-numpy"):
        assert f"backend '{name}' failed the protocol tests" in out, name
    functional = [line for line in lines if "test_functional_steps_equal" in line and "numpy-copy-cpu-float32" in line]
    assert len(functional) == 3 and all("PASSED" in line for line in functional), functional


def test_plugin_new_installs_and_passes_conformance(tmp_path):
    """``kdpm2 plugin new NAME`` writes a distribution that ``pip install -e`` installs into a fresh environment,
    where the backend is listed with its version and passes ``kdpm2 conformance NAME`` and the generated test."""
    from click.testing import CliRunner

    from kdpm2core.cli import cli

    dist = tmp_path / "kdpm2-np-example"
    made = CliRunner().invoke(cli, ["plugin", "new", "np-example", "--directory", str(dist)])
    assert made.exit_code == 0, made.output
    assert "pip install -e" in made.output and (dist / "kdpm2_np_example" / "__init__.py").is_file()
    again = CliRunner().invoke(cli, ["plugin", "new", "np-example", "--directory", str(dist)])
    assert again.exit_code == 2 and "not empty" in again.output

    # a throwaway environment layered on this one (its site-packages, .pth files included, stay importable)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    import site

    parents = "".join(f"import site; site.addsitedir({p!r})\n" for p in site.getsitepackages())
    (Path(purelib) / "_parent_environment.pth").write_text(parents)
    env = {**os.environ, "KDPM2_LOAD_PLUGINS": "numpy,np-example"}

    def run(*args):
        return subprocess.run(
            [python, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False
        )

    installed = run("-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-e", str(dist))
    assert installed.returncode == 0, installed.stdout + installed.stderr
    listed = run("-m", "kdpm2core.cli", "backends", "--json")
    row = {r["name"]: r for r in json.loads(listed.stdout)["backends"]}.get("np-example")
    assert row and row["status"] == "ok" and row["version"] == np.__version__, listed.stdout + listed.stderr
    conformance = run("-m", "kdpm2core.cli", "conformance", "np-example", "-q", "-p", "no:randomly")
    assert conformance.returncode == 0 and " passed" in conformance.stdout, (
        conformance.stdout[-3000:] + conformance.stderr[-3000:]
    )
    own_test = run("-m", "pytest", "-q", "-p", "no:cacheprovider", str(dist / "tests"))
    assert own_test.returncode == 0 and "1 passed" in own_test.stdout, own_test.stdout[-3000:]
