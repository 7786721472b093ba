"""Broken and hostile plugins are reported and skipped; kdpm2core and every healthy backend keep working.

Each test installs REAL distributions (a package next to a ``*.dist-info`` directory with ``METADATA`` and
``entry_points.txt``) into a temporary directory, puts it on ``PYTHONPATH`` and runs the checks in a fresh
interpreter, so that the registry of the test process is never polluted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# name of the distribution -> (entry point name, package source); every backend name is unique to this file
BROKEN_PLUGINS = {
    "kdpm2-raises-on-import": ("raises", "raise RuntimeError('plugin exploded while importing')"),
    "kdpm2-exits-on-import": ("exits", "import sys\nsys.exit(3)"),
    "kdpm2-no-xp": (
        "noxp",
        """
        from kdpm2core import hookimpl

        @hookimpl
        def register_backends(register):
            register("noxp", lambda: object())
        """,
    ),
    "kdpm2-factory-raises": (
        "factoryraises",
        """
        from kdpm2core import hookimpl

        def make():
            raise ImportError("the framework's shared library is missing")

        @hookimpl
        def register_backends(register):
            register("factoryraises", make)
        """,
    ),
    "kdpm2-bad-name": (
        "badname",
        """
        from kdpm2core import hookimpl

        @hookimpl
        def register_backends(register):
            register("Bad Name!", lambda: None)
        """,
    ),
    "kdpm2-exits-in-register": (
        "exitsregister",
        """
        import sys
        from kdpm2core import hookimpl

        @hookimpl
        def register_backends(register):
            register("halfway", lambda: None)
            sys.exit("no thanks")
        """,
    ),
    "kdpm2-bad-signature": (
        "badsig",
        """
        from kdpm2core import hookimpl

        @hookimpl
        def register_backends(reg, extra):
            pass
        """,
    ),
    "kdpm2-typo": (
        "typo",
        """
        from kdpm2core import hookimpl

        @hookimpl
        def register_backend(register):  # misspelt: kdpm2's hook is register_backends
            register("typo", lambda: None)
        """,
    ),
    "kdpm2-no-hook": (
        "nohook",
        """
        def register_backends(register):  # no @hookimpl: pluggy never sees it
            register("nohook", lambda: None)
        """,
    ),
    "kdpm2-impostor": (
        "impostor",
        """
        from kdpm2core import hookimpl
        from kdpm2core.backend import ArrayAPIBackend

        @hookimpl
        def register_backends(register):
            import array_api_compat.numpy
            for name in ("numpy", "jax", "impostor"):  # the first two are kdpm2's own names
                register(name, lambda name=name: ArrayAPIBackend(name, array_api_compat.numpy))
        """,
    ),
    "kdpm2-yamlish": (  # needs the module yaml, which the distribution PyYAML installs
        "yamlish",
        """
        from kdpm2core import hookimpl
        from kdpm2core.backend import ArrayAPIBackend

        @hookimpl
        def register_backends(register):
            import array_api_compat.numpy
            register("yamlish", lambda: ArrayAPIBackend("yamlish", array_api_compat.numpy), requires=("yaml",))
        """,
    ),
    "kdpm2-ghost": (
        "ghost",
        """
        from kdpm2core import hookimpl

        @hookimpl
        def register_backends(register):
            register("ghost", lambda: None, requires=("no_such_module",))
        """,
    ),
}

TWIN = """
from kdpm2core import hookimpl
from kdpm2core.backend import ArrayAPIBackend

@hookimpl
def register_backends(register):
    import array_api_compat.numpy
    register("twin", lambda: ArrayAPIBackend("twin", array_api_compat.numpy))
"""

PROBE = r"""
import json, sys, warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import kdpm2core
    from kdpm2core.plugins import PluginWarning
    assert not caught, "import kdpm2core alone must not load plugins"
    report = kdpm2core.backend_report()
    available = kdpm2core.available_backends()
    lookups = {}
    for name in sys.argv[1].split(","):
        try:
            backend = kdpm2core.get_backend(name)
            lookups[name] = "ok:" + type(backend).__name__
        except Exception as exc:
            lookups[name] = f"{type(exc).__name__}:{exc}"
    # a healthy backend still runs a whole sampling loop
    import numpy as np
    s = kdpm2core.KDPM2DiscreteScheduler(backend="numpy")
    s.set_timesteps(3)
    x = np.linspace(-1.0, 1.0, 8)
    for t in s.timesteps:
        x = s.step(0.1 * s.scale_model_input(x, t), t, x).prev_sample
    report_after = kdpm2core.backend_report()
print(json.dumps({
    "report": {row["name"]: row for row in report},
    "report_after": {row["name"]: row for row in report_after},
    "available": available,
    "lookups": lookups,
    "warnings": [f"{w.category.__name__}:{w.message}" for w in caught],
    "final": x.tolist(),
    "modules": sorted(m for m in ("torch", "jax") if m in sys.modules),
}))
"""


def make_distribution(site: Path, dist: str, entry_point: str, source: str, package: str | None = None) -> None:
    """Install distribution ``dist`` into ``site``: a package and a dist-info with one ``kdpm2`` entry point."""
    package = package or dist.replace("-", "_")
    (site / package).mkdir(parents=True)
    (site / package / "__init__.py").write_text(textwrap.dedent(source))
    info = site / f"{package}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[kdpm2]\n{entry_point} = {package}\n")


def run_in(site: Path, *args: str, **env) -> subprocess.CompletedProcess:
    """Run ``python *args`` in a fresh interpreter with ``site`` on the path, ``env`` set and no other KDPM2_*."""
    environ = {k: v for k, v in os.environ.items() if k not in ("KDPM2_LOAD_PLUGINS", "KDPM2_BACKEND")}
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), environ.get("PYTHONPATH")]))
    environ.update(env)
    return subprocess.run([sys.executable, *args], env=environ, capture_output=True, text=True, timeout=120)


def last_json_line(done: subprocess.CompletedProcess):
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def probe(site: Path, names: list[str], **env) -> dict:
    """Run PROBE in a fresh interpreter with ``site`` on the path; returns its JSON report."""
    return last_json_line(run_in(site, "-c", PROBE, ",".join(names), **env))


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    for dist, (entry_point, source) in BROKEN_PLUGINS.items():
        make_distribution(site, dist, entry_point, source)
    make_distribution(site, "kdpm2-twin-one", "twinone", TWIN)
    make_distribution(site, "kdpm2-twin-two", "twintwo", TWIN)
    # a stranger's entry point reusing a first-party entry point name must not be silently dropped
    make_distribution(site, "kdpm2-sneaky", "torch", TWIN.replace('"twin"', '"sneaky"'))
    return site


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> dict:
    return probe(tmp_path_factory.mktemp("empty"), ["numpy"])


@pytest.fixture(scope="module")
def broken(broken_site) -> dict:
    names = [
        "numpy",
        "torch",
        "jax",
        "noxp",
        "factoryraises",
        "ghost",
        "twin",
        "sneaky",
        "raises",
        "impostor",
        "nonexistent",
    ]
    return probe(broken_site, names)


def test_healthy_backends_keep_working(broken, clean):
    assert broken["lookups"]["numpy"] == "ok:NumpyBackend"
    assert broken["lookups"]["torch"] == "ok:TorchBackend"
    assert broken["lookups"]["jax"] == "ok:JaxBackend"
    assert broken["final"] == clean["final"]  # bit-identical sampling next to the broken plugins
    assert {"numpy", "torch", "jax", "sneaky"} <= set(broken["available"])
    for name in ("numpy", "torch", "jax"):
        assert broken["report"][name]["status"] == "ok"


def test_clean_environment_imports_no_framework(clean):
    assert clean["modules"] == []  # the numpy backend imports neither torch nor jax
    assert clean["warnings"] == []


@pytest.mark.parametrize(
    "plugin, dist, words",  # words[0]: what failed, right after "failed: "
    [
        ("raises", "kdpm2-raises-on-import", ["import failed", "plugin exploded while importing"]),
        ("exits", "kdpm2-exits-on-import", ["import failed", "SystemExit"]),
        ("badname", "kdpm2-bad-name", ["register_backends raised", "Bad Name!", "lowercase identifier"]),
        ("exitsregister", "kdpm2-exits-in-register", ["register_backends raised", "no thanks"]),
        (
            "badsig",
            "kdpm2-bad-signature",
            ["invalid hook", "register_backends(reg, extra)", "register_backends(register)"],
        ),
        ("typo", "kdpm2-typo", ["invalid hook", "unknown hook 'register_backend'", "register_backends(register)"]),
        ("nohook", "kdpm2-no-hook", ["implements no kdpm2 hook", "@hookimpl def register_backends(register)"]),
    ],
)
def test_plugin_failing_to_load_or_register_is_reported_and_skipped(broken, plugin, dist, words):
    row = broken["report"][plugin]
    assert row["distribution"] == dist
    assert row["status"].startswith(f"failed: {words[0]}"), row["status"]
    for word in words:
        assert word in row["status"]
    assert "\n" not in row["status"] and "\\n" not in row["status"]  # one line of the `kdpm2 backends` table
    assert any(w.startswith("PluginWarning:") and repr(plugin) in w and dist in w for w in broken["warnings"]), broken[
        "warnings"
    ]
    assert plugin not in broken["available"]
    assert "halfway" not in broken["report"]  # nothing of a plugin that failed half-way is registered


@pytest.mark.parametrize(
    "name, words",
    [("noxp", ["malformed", "missing", "xp"]), ("factoryraises", ["failed to load", "shared library is missing"])],
)
def test_malformed_backend_is_reported_when_first_built(broken, name, words):
    # A factory runs lazily (it may import a framework), so the problem shows on first use: a clear
    # BackendError, a PluginWarning, and from then on a failed status row, outside available_backends().
    kind, _, message = broken["lookups"][name].partition(":")
    assert kind == "BackendError"
    for word in words:
        assert word in message
    assert broken["report"][name]["status"] == "ok"  # not yet known before the first lookup
    assert broken["report_after"][name]["status"].startswith("failed: ")
    assert any(w.startswith("PluginWarning:") and repr(name) in w for w in broken["warnings"])


def test_missing_framework_is_reported_not_raised(broken):
    assert broken["report"]["ghost"]["status"] == "not installed (needs no_such_module)"
    assert "ghost" not in broken["available"]
    kind, _, message = broken["lookups"]["ghost"].partition(":")
    assert kind == "BackendError" and "no_such_module" in message and "not installed" in message
    assert any(w.startswith("PluginWarning:") and "'ghost'" in w and "no_such_module" in w for w in broken["warnings"])


def test_duplicate_backend_names_error_naming_both_distributions(broken):
    kind, _, message = broken["lookups"]["twin"].partition(":")
    assert kind == "BackendError"
    assert "kdpm2-twin-one" in message and "kdpm2-twin-two" in message and "KDPM2_LOAD_PLUGINS" in message
    assert broken["report"]["twin"]["status"].startswith("failed: ")
    assert any(
        w.startswith("PluginWarning:") and "kdpm2-twin-one" in w and "kdpm2-twin-two" in w for w in broken["warnings"]
    )
    assert "twin" not in broken["available"]


def test_entry_point_name_clash_with_first_party_is_not_dropped(broken):
    # "kdpm2-sneaky" names its entry point "torch", like the first-party plugin: both load, both work
    assert broken["lookups"]["sneaky"] == "ok:ArrayAPIBackend"
    assert broken["report"]["sneaky"]["distribution"] == "kdpm2-sneaky"
    assert broken["lookups"]["torch"] == "ok:TorchBackend"


def test_first_party_name_stays_with_kdpm2(broken):
    # "kdpm2-impostor" registers numpy, jax and impostor: kdpm2 keeps the first two, the third is the plugin's
    for name in ("numpy", "jax"):
        assert broken["report"][name]["distribution"] == "kdpm2" and broken["report"][name]["status"] == "ok"
        refused = broken["report"][f"{name} (kdpm2-impostor)"]
        assert refused["plugin"] == "impostor" and refused["distribution"] == "kdpm2-impostor"
        assert refused["status"].startswith(f"failed: backend {name!r} belongs to kdpm2"), refused["status"]
        assert "'impostor'" in refused["status"] and "kdpm2-impostor" in refused["status"]
        assert any(
            w.startswith("PluginWarning:") and f"{name!r} belongs to kdpm2" in w and "kdpm2-impostor" in w
            for w in broken["warnings"]
        ), broken["warnings"]
    assert broken["lookups"]["numpy"] == "ok:NumpyBackend" and broken["lookups"]["jax"] == "ok:JaxBackend"
    assert broken["lookups"]["impostor"] == "ok:ArrayAPIBackend"


def test_unknown_backend_lists_available_ones_and_failed_plugins(broken):
    kind, _, message = broken["lookups"]["nonexistent"].partition(":")
    assert kind == "BackendError" and "'nonexistent'" in message and "numpy" in message
    # the backend may be one that a broken plugin would have registered: each failure, on one line
    assert "plugin 'raises' (kdpm2-raises-on-import) failed: import failed: RuntimeError('plugin exploded" in message
    assert "plugin 'typo' (kdpm2-typo) failed: invalid hook" in message and "\n" not in message


def test_cli_and_pytest_show_the_failed_plugins_for_an_unknown_backend(broken_site):
    only = {"KDPM2_LOAD_PLUGINS": "numpy,raises"}
    cli = run_in(broken_site, "-m", "kdpm2core.cli", "conformance", "nonexistent", **only)
    error = cli.stderr.strip().splitlines()[-1]  # after the PluginWarning
    assert cli.returncode == 2 and error.startswith("kdpm2 conformance: error: "), cli.stderr
    suite = run_in(
        broken_site,
        "-m",
        "pytest",
        "-c",
        os.devnull,
        "-p",
        "no:cacheprovider",
        "--pyargs",
        "kdpm2core.testing",
        "--kdpm2-backend=nonexistent",
        **only,
    )
    assert suite.returncode == 4, suite.stdout + suite.stderr  # pytest's usage error
    for output in (error, suite.stderr):
        assert "unknown backend 'nonexistent'" in output and "kdpm2-raises-on-import" in output
        assert "plugin exploded while importing" in output


# every plugin of the site but those that import torch or jax (`kdpm2 backends` builds every backend); a fixed
# hash seed, so that pluggy's message on badsig lists the same set in the same order in each process
NO_FRAMEWORKS = {
    "KDPM2_LOAD_PLUGINS": "numpy,noxp,factoryraises,badsig,typo,impostor,yamlish,twinone,twintwo,raises",
    "PYTHONHASHSEED": "0",
}
BUILT_REPORT = "import json, kdpm2core; print(json.dumps(kdpm2core.backend_report(build=True)))"


def test_backends_command_shows_the_report_with_build(broken_site):
    # backend_report() builds nothing, so a factory that raises is "ok" there until first use (see above);
    # backend_report(build=True) builds every backend, and `kdpm2 backends` shows exactly its statuses
    built = {
        row["name"]: row["status"] for row in last_json_line(run_in(broken_site, "-c", BUILT_REPORT, **NO_FRAMEWORKS))
    }
    listed = json.loads(run_in(broken_site, "-m", "kdpm2core.cli", "backends", "--json", **NO_FRAMEWORKS).stdout)[
        "backends"
    ]
    assert {row["name"]: row["status"] for row in listed} == built
    assert (
        built["factoryraises"].startswith("failed: backend 'factoryraises'")
        and "shared library" in built["factoryraises"]
    )
    assert built["noxp"].startswith("failed: backend 'noxp'") and built["numpy"] == "ok"
    table = run_in(broken_site, "-m", "kdpm2core.cli", "backends", **NO_FRAMEWORKS).stdout
    assert len(table.strip().splitlines()) == 2 + len(built)  # header, rule, one line per row


def test_backends_command_version_is_the_required_modules_distribution(broken_site):
    import importlib.metadata

    pytest.importorskip("yaml")
    listed = json.loads(
        run_in(broken_site, "-m", "kdpm2core.cli", "backends", "--json", KDPM2_LOAD_PLUGINS="yamlish").stdout
    )["backends"]
    assert listed == [
        {
            "name": "yamlish",
            "version": importlib.metadata.version("PyYAML"),
            "devices": ["cpu"],
            "float64": True,
            "distribution": "kdpm2-yamlish",
            "status": "ok",
        }
    ]


WARNINGS_AS_ERRORS = """
import json, kdpm2core
outcomes = []
for _ in range(3):
    try:
        outcomes.append(kdpm2core.get_backend("numpy").name)
    except Warning as warning:
        outcomes.append(f"{type(warning).__name__}:{warning}")
print(json.dumps({"outcomes": outcomes, "report": kdpm2core.backend_report()}))
"""


def test_under_warnings_as_errors_only_the_first_lookup_raises(broken_site):
    result = last_json_line(
        run_in(broken_site, "-W", "error", "-c", WARNINGS_AS_ERRORS, KDPM2_LOAD_PLUGINS="numpy,raises")
    )
    first, *later = result["outcomes"]
    assert first.startswith("PluginWarning:") and "'raises'" in first and "plugin exploded" in first
    assert later == ["numpy", "numpy"]  # the registry was stored before warning: later lookups work
    assert {row["name"]: row["status"][:21] for row in result["report"]} == {
        "numpy": "ok",
        "raises": "failed: import failed",
    }


def test_env_var_limits_loaded_plugins(broken_site, clean):
    only = probe(broken_site, ["numpy", "twin", "torch"], KDPM2_LOAD_PLUGINS="numpy, twinone")
    assert only["warnings"] == []  # the broken plugins were never imported
    assert sorted(only["report"]) == ["numpy", "twin"]
    assert only["lookups"]["numpy"] == "ok:NumpyBackend"
    assert only["lookups"]["twin"] == "ok:ArrayAPIBackend"  # one claimant left: no clash
    assert (
        only["lookups"]["torch"].startswith("BackendError:") and "unknown backend 'torch'" in only["lookups"]["torch"]
    )
    assert only["final"] == clean["final"]


def test_env_var_can_select_a_broken_plugin_alone(broken_site):
    only = probe(broken_site, ["numpy"], KDPM2_LOAD_PLUGINS="numpy,raises")
    assert sorted(only["report"]) == ["numpy", "raises"]
    assert [w for w in only["warnings"] if "'raises'" in w]


def test_get_backend_from_eight_threads_at_once(broken_site):
    script = r"""
import json, threading, warnings
warnings.simplefilter("ignore")
import kdpm2core
names = ["numpy", "torch", "jax", "sneaky", "twin", "noxp", "ghost"]
barrier = threading.Barrier(8)
results = [None] * 8
def work(i):
    barrier.wait()
    got = {}
    for name in names[i % len(names):] + names[:i % len(names)]:
        try:
            got[name] = id(kdpm2core.get_backend(name))
        except kdpm2core.BackendError as exc:
            got[name] = type(exc).__name__
    results[i] = got
threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(results))
"""
    results = last_json_line(run_in(broken_site, "-c", script))
    assert all(r == results[0] for r in results)  # every thread got the same single instance, or the same error
    assert all(isinstance(results[0][n], int) for n in ("numpy", "torch", "jax", "sneaky"))
    assert results[0]["twin"] == results[0]["noxp"] == results[0]["ghost"] == "BackendError"
