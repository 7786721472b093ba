"""The ``kdpm2`` command: each subcommand prints the right facts, and bad input is one line with status 2."""

import json
import math
import os
import re
import signal
import struct
import subprocess
import sys

import numpy as np
import pytest

click_testing = pytest.importorskip("click.testing")
pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")

from float32_bounds import assert_within, geometric_mean_error  # noqa: E402

from kdpm2core import KDPM2DiscreteScheduler, available_backends, cli, toy  # noqa: E402

EXACT_WITHIN_3_STD = 1 - math.exp(-4.5)  # P(|x - mu| <= 3 std) for a 2-D isotropic Gaussian
EXACT_MEAN_DISTANCE = 0.2 * math.sqrt(math.pi / 2)  # E|x - mu| for std 0.2 in 2-D


def invoke(*args):
    return click_testing.CliRunner().invoke(cli.cli, list(args), catch_exceptions=False)


def invoke_json(*args):
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def png_size(path):
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG file"
    return struct.unpack(">II", data[16:24])


# -- sample ------------------------------------------------------------------------------------------------------
def test_sample_without_arguments_says_what_it_did_and_lands_on_the_truth():
    result = invoke("sample")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "backend numpy" in out and "float32" in out and "25 steps = 49 model calls" in out and "seed 0" in out
    assert re.search(r"wall time \d+\.\d+ s", out)
    within = float(re.search(r"([\d.]+)% within 3 std of a mode", out).group(1)) / 100
    error = float(re.search(r"max error vs the exact probability-flow solution ([\d.e+-]+)", out).group(1))
    assert "8/8 modes hit" in out
    assert within > EXACT_WITHIN_3_STD - 0.03  # 2000 points: exact sampling would give 98.9% +- 0.2%
    assert error < 0.2 * 0.5  # within a fifth of the Gaussian's standard deviation, on every point


def test_gaussian_error_shrinks_at_second_order():
    runs = [invoke_json("sample", "--toy", "gaussian", "--dtype", "float64", "--steps", str(n)) for n in (20, 40)]
    errors = [run["results"]["gaussian"]["max_error"] for run in runs]
    # a second-order method divides the error by ~4 when the steps double; a first-order one only by 2
    assert errors[0] / errors[1] > 2.8, errors


def test_mixture_points_land_on_the_modes():
    data = invoke_json("sample", "--toy", "mixture", "--sigmas", "karras", "--steps", "40", "--samples", "4000")
    result = data["results"]["mixture"]
    assert result["modes_hit"] == result["modes"] == 8
    assert abs(result["within_3_std"] - EXACT_WITHIN_3_STD) < 0.01
    assert abs(result["mean_distance_to_mode"] - EXACT_MEAN_DISTANCE) < 0.1 * EXACT_MEAN_DISTANCE


def test_sample_json_has_the_run_and_the_results():
    data = invoke_json("sample", "--steps", "6", "--seed", "3", "--samples", "100", "--sigmas", "exponential")
    keys = {"backend", "version", "device", "dtype", "steps", "model_calls", "seed", "config", "sigmas", "results"}
    assert keys | {"wall_time_s"} <= set(data)
    run = (data["backend"], data["dtype"], data["steps"], data["model_calls"], data["seed"])
    assert run == ("numpy", "float32", 6, 11, 3)
    assert data["config"]["use_exponential_sigmas"] is True
    assert len(data["sigmas"]) == 11 and set(data["results"]) == {"mixture", "gaussian"}
    assert all(math.isfinite(data["results"]["gaussian"][key]) for key in ("max_error", "mean_error"))


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_every_prediction_type_gives_the_same_samples(prediction_type):
    # the exact model answers in whatever form the scheduler expects, so the trajectory must not change
    runs = {}
    for kind in ("epsilon", prediction_type):
        scheduler = KDPM2DiscreteScheduler(prediction_type=kind)
        scheduler.set_timesteps(8)
        runs[kind] = toy.run("mixture", scheduler, num_samples=200, dtype="float64")["samples"]
    np.testing.assert_allclose(runs[prediction_type], runs["epsilon"], rtol=0, atol=1e-9)


def test_sample_plot_is_a_png(tmp_path):
    path = tmp_path / "samples.png"
    result = invoke("sample", "--steps", "5", "--samples", "200", "--plot", str(path))
    assert result.exit_code == 0, result.output
    assert f"plot written to {path}" in result.stdout
    width, height = png_size(path)
    assert width > 2 * height > 0  # three panels side by side


@pytest.mark.skipif("torch" not in available_backends(), reason="torch backend not installed")
def test_sample_on_torch_matches_numpy():
    numpy_run, torch_run = (
        invoke_json("sample", "--backend", name, "--dtype", "float64", "--steps", "5", "--samples", "100")
        for name in ("numpy", "torch")
    )
    assert torch_run["backend"] == "torch"
    for name in ("mixture", "gaussian"):
        for key in ("within_3_std", "mean_distance_to_mode"):
            assert torch_run["results"][name][key] == pytest.approx(
                numpy_run["results"][name][key], rel=1e-9, abs=1e-12
            )


# -- the toys' exact denoiser and flow ---------------------------------------------------------------------------
def test_mixture_denoiser_is_the_posterior_weighted_mean_of_component_denoisers():
    from kdpm2core import get_backend

    mixture, sigma = toy.TOYS["mixture"], 1.7
    x = np.random.default_rng(1).standard_normal((50, 2)) * 3
    variances = mixture.stds**2 + sigma**2
    # the textbook form: w_k N(x; mu_k, v_k I), normalised, times (s_k^2 x + sigma^2 mu_k) / v_k
    density = mixture.weights * np.exp(-np.sum((x[:, None] - mixture.means) ** 2, -1) / (2 * variances)) / variances
    posterior = density / density.sum(1, keepdims=True)
    components = (mixture.stds[:, None] ** 2 * x[:, None] + sigma**2 * mixture.means) / variances[:, None]
    expected = np.sum(posterior[..., None] * components, axis=1)
    np.testing.assert_allclose(mixture.denoise(x, sigma, get_backend("numpy")), expected, rtol=1e-12, atol=1e-12)


def test_gaussian_exact_flow_solves_the_probability_flow_ode():
    from kdpm2core import get_backend

    gaussian, h = toy.TOYS["gaussian"], 1e-5
    x_start = np.array([[4.0, -7.0], [0.3, 2.0]])
    for sigma in (0.2, 1.0, 5.0):
        x = gaussian.exact_flow(x_start, 10.0, sigma)
        slope = (gaussian.exact_flow(x_start, 10.0, sigma + h) - gaussian.exact_flow(x_start, 10.0, sigma - h)) / (
            2 * h
        )
        ode = (x - gaussian.denoise(x, sigma, get_backend("numpy"))) / sigma  # dx/dsigma = (x - D(x, sigma)) / sigma
        np.testing.assert_allclose(slope, ode, rtol=1e-7)


# -- the sigma each substep's model call sees --------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' own numpy 2 deprecations
@pytest.mark.parametrize(
    "options",
    [{}, {"use_karras_sigmas": True}, {"timestep_spacing": "leading", "steps_offset": 1}, {"use_beta_sigmas": True}],
)
def test_model_sigmas_match_what_diffusers_feeds_its_model(options):
    diffusers = pytest.importorskip("diffusers")
    reference = diffusers.KDPM2DiscreteScheduler(**options)
    reference.set_timesteps(7)
    expected = []
    for t in reference.timesteps:  # diffusers: sigmas on first-order substeps, sigmas_interpol on second-order ones
        index = reference.step_index if reference.step_index is not None else reference.index_for_timestep(t)
        table = reference.sigmas if reference.state_in_first_order else reference.sigmas_interpol
        expected.append(float(table[index]))
        reference.step(reference.scale_model_input(reference.sigmas[:1] * 0, t), t, reference.sigmas[:1] * 0)
    ours = KDPM2DiscreteScheduler(**options)
    ours.set_timesteps(7)
    # The step sigmas of the two schedules differ by the whole ulps test_schedule_parity bounds; diffusers' midpoint
    # sigma is its float32 exp(lerp(log a, log b, 0.5)) of its step sigmas a, b (geometric_mean_error: 2 ulps of
    # |log sigma| plus exp's ulp, relative), ours the float64 geometric mean of ours: half the relative step-sigma
    # differences on top.
    step = np.asarray(ours.sigmas, dtype=np.float64)[: len(expected) + 1 : 2]
    ref_step = reference.sigmas.numpy().astype(np.float64)[: len(expected) + 1 : 2]
    relative = np.abs(step - ref_step) / ref_step
    midpoint = geometric_mean_error(ref_step[:-1], ref_step[1:]) + (relative[:-1] + relative[1:]) / 2
    rtol = np.empty(len(expected))
    rtol[0::2], rtol[1::2] = relative[: len(rtol[0::2])], midpoint[: len(rtol[1::2])]
    expected = np.asarray(expected)
    assert_within(toy.model_sigmas(ours), expected, rtol * expected, f"{options}")


# -- backends, compare, schedule -----------------------------------------------------------------------------------
def test_backends_table_and_json():
    result = invoke("backends")
    assert result.exit_code == 0, result.output
    header, rule, *rows = result.stdout.splitlines()
    assert header.split() == ["backend", "version", "devices", "float64", "distribution", "status"]
    numpy_row = next(row.split() for row in rows if row.startswith("numpy "))
    assert numpy_row == ["numpy", np.__version__, "cpu", "yes", "kdpm2", "ok"]
    data = {row["name"]: row for row in invoke_json("backends")["backends"]}
    assert set(available_backends()) <= set(data)
    if "torch" in available_backends():
        import torch

        assert data["torch"]["version"] == torch.__version__ and "cpu" in data["torch"]["devices"]
        assert data["torch"]["float64"] is True


def test_backends_reports_a_broken_backend_and_carries_on(monkeypatch):
    real_get_backend = cli.get_backend

    def get_backend(name):
        if name == "numpy":
            raise RuntimeError("driver exploded")
        return real_get_backend(name)

    monkeypatch.setattr(cli, "get_backend", get_backend)
    rows = {row["name"]: row for row in invoke_json("backends")["backends"]}
    assert rows["numpy"]["status"] == "failed: driver exploded"
    assert all(row["status"] == "ok" for name, row in rows.items() if name in available_backends() and name != "numpy")


def test_compare_agrees_across_backends():
    names = [name for name in ("numpy", "torch", "jax", "array-api-strict") if name in available_backends()]
    data = invoke_json("compare", "--backends", ",".join(names), "--steps", "6", "--samples", "200")
    rows = {row["backend"]: row for row in data["backends"]}
    assert list(rows) == names and all(row["status"] == "ok" for row in rows.values())
    assert rows["numpy"]["max_diff_mixture"] == rows["numpy"]["max_diff_gaussian"] == 0
    for row in rows.values():  # float32, values up to ~25 at the start: a few ulps of the data after 11 substeps
        assert row["max_diff_mixture"] < 5e-5 and row["max_diff_gaussian"] < 5e-5
        assert row["gaussian_error"] == pytest.approx(rows["numpy"]["gaussian_error"], rel=1e-3)


def test_compare_reports_results_that_are_not_finite():
    args = ["compare", "--backends", "numpy", "--dtype", "float16", "--custom-sigmas", "1000,1,0", "--samples", "20"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    numpy_row = next(line.split() for line in result.stdout.splitlines() if line.startswith("numpy "))
    assert numpy_row[1:3] == ["not", "finite"] and numpy_row[-4:] == ["-"] * 4
    result = invoke(*args, "--json")

    def reject(constant):
        raise AssertionError(f"{constant} is not JSON")

    (row,) = json.loads(result.stdout, parse_constant=reject)["backends"]
    assert row["status"] == "not finite" and row["max_diff_mixture"] is None and row["gaussian_error"] is None


def test_compare_json_has_what_repeats_the_run_as_sample_json_does():
    options = ["--dtype", "float64", "--seed", "4", "--samples", "30", "--custom-sigmas", "10,3,1,0"]
    compared = invoke_json("compare", "--backends", "numpy", *options)
    sampled = invoke_json("sample", "--backend", "numpy", *options)
    assert set(compared) - {"backends"} == set(sampled) - {"backend", "version", "results", "wall_time_s", "plot"}
    for key in set(compared) - {"backends"}:
        assert compared[key] == sampled[key], key
    settings = [compared[key] for key in ("device", "dtype", "seed", "samples", "steps", "custom_sigmas")]
    assert settings == ["default", "float64", 4, 30, 3, [10, 3, 1, 0]]


@pytest.mark.skipif("torch" not in available_backends(), reason="torch backend not installed")
def test_compare_runs_each_backend_once():
    data = invoke_json("compare", "--backends", "torch,numpy,torch", "--steps", "2", "--samples", "20")
    assert [row["backend"] for row in data["backends"]] == ["numpy", "torch"]


@pytest.mark.skipif("torch" not in available_backends(), reason="torch backend not installed")
def test_compare_skips_a_default_backend_that_cannot_run_but_refuses_a_named_one(monkeypatch):
    monkeypatch.setattr(cli, "available_backends", lambda: ["numpy", "torch"])
    data = invoke_json("compare", "--device", "tpu:7", "--steps", "2", "--samples", "20")
    statuses = {row["backend"]: row["status"] for row in data["backends"]}
    assert statuses["numpy"] == "ok" and statuses["torch"].startswith("skipped:") and "tpu:7" in statuses["torch"]
    runs = []
    monkeypatch.setattr(toy, "run", lambda *args, **kwargs: runs.append(args))
    result = invoke("compare", "--backends", "numpy,torch", "--device", "tpu:7")
    assert result.exit_code == 2 and "tpu:7" in result.stderr
    assert runs == []  # refused before anything ran


@pytest.mark.skipif("torch" not in available_backends(), reason="torch backend not installed")
def test_compare_table_in_float64():
    result = invoke("compare", "--backends", "torch", "--dtype", "float64", "--steps", "4", "--samples", "50")
    assert result.exit_code == 0, result.output
    torch_row = next(line.split() for line in result.stdout.splitlines() if line.startswith("torch "))
    assert torch_row[1] == "ok" and float(torch_row[4]) < 1e-12 and float(torch_row[5]) < 1e-12


def test_schedule_prints_one_row_per_substep(tmp_path):
    path = tmp_path / "schedule.png"
    result = invoke("schedule", "--steps", "4", "--sigmas", "karras", "--plot", str(path))
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.stdout.splitlines() if re.match(r"^\d+\s+\d+\s+(euler|midpoint)\s", line)]
    scheduler = KDPM2DiscreteScheduler(use_karras_sigmas=True)
    scheduler.set_timesteps(4)
    assert [row[2] for row in rows] == ["euler", "midpoint"] * 3 + ["euler"]
    np.testing.assert_allclose([float(row[3]) for row in rows], np.asarray(scheduler.timesteps), atol=1e-4)
    np.testing.assert_allclose([float(row[4]) for row in rows], toy.model_sigmas(scheduler), rtol=1e-5)
    assert png_size(path)[0] > 0


def test_plot_without_an_extension_reports_the_png_it_writes(tmp_path):
    data = invoke_json("schedule", "--steps", "2", "--plot", str(tmp_path / "noext"))
    assert data["plot"] == str(tmp_path / "noext.png") and png_size(tmp_path / "noext.png")[0] > 0
    assert os.listdir(tmp_path) == ["noext.png"]
    result = invoke("schedule", "--steps", "2", "--plot", str(tmp_path / "again"))
    assert result.stdout.endswith(f"plot written to {tmp_path / 'again.png'}\n")
    assert "extension" in invoke("schedule", "--help").stdout  # the help says what decides the format


def test_plot_format_follows_the_extension(tmp_path):
    result = invoke("schedule", "--steps", "2", "--plot", str(tmp_path / "s.svg"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "s.svg").read_text().lstrip().startswith("<?xml")


def test_schedule_json_with_custom_sigmas():
    data = invoke_json("schedule", "--custom-sigmas", "10,3,1,0")
    assert data["steps"] == 3 and data["init_noise_sigma"] == 10 and data["final_sigma"] == 0
    np.testing.assert_allclose(data["sigmas"], [10, math.sqrt(30), 3, math.sqrt(3), 1], rtol=1e-7)
    assert len(data["timesteps"]) == 5


def test_schedule_of_a_flow_model_shows_s_and_the_shifted_timesteps():
    result = invoke("schedule", "--steps", "3", "--prediction-type", "flow_prediction", "--shift", "3")
    assert result.exit_code == 0, result.output
    assert "flow matching, shift 3" in result.stdout
    header = next(line.split() for line in result.stdout.splitlines() if line.startswith("substep"))
    assert header == ["substep", "step", "kind", "timestep", "s"]
    rows = [line.split() for line in result.stdout.splitlines() if re.match(r"^\d+\s+\d+\s+(euler|midpoint)\s", line)]
    s = np.array([float(row[4]) for row in rows])

    def shifted(value, shift):
        return shift * value / (1 + (shift - 1) * value)

    middle = (1 + shifted(1e-3, 3)) / 2  # FlowMatchEuler's spacing: from 1 to its shifted 1/1000, then shifted
    np.testing.assert_allclose(s[[0, 2]], [1.0, shifted(middle, 3)], rtol=1e-5)  # printed to 6 digits
    np.testing.assert_allclose([float(row[3]) for row in rows], 1000 * s, rtol=1e-5)
    data = invoke_json("schedule", "--steps", "3", "--prediction-type", "flow_prediction", "--mu", "0.7")
    assert data["init_noise_sigma"] == 1.0 and data["config"]["use_dynamic_shifting"] is True
    # dynamic shifting spaces 1 to 1/1000 unshifted and shifts by e^mu; float32 values, within 1e-6
    assert math.isclose(data["sigmas"][2], shifted((1 + 1e-3) / 2, math.exp(0.7)), rel_tol=1e-6)
    result = invoke("schedule", "--steps", "3", "--mu", "0.7")  # an epsilon model: the option is refused, named
    assert result.exit_code == 2 and "use_dynamic_shifting" in result.output


def test_sample_runs_the_flow_gaussian_near_its_exact_solution():
    data = invoke_json(
        "sample", "--toy", "gaussian", "--prediction-type", "flow_prediction", "--steps", "32", "--dtype", "float64"
    )
    result = data["results"]["gaussian"]
    # 32 steps of a second-order method: the error is about 0.0064 (the conformance suite measures the order)
    assert result["finite"] and result["max_error"] < 0.01


# -- conformance -----------------------------------------------------------------------------------------------
def test_conformance_passes_the_backend_and_pytest_arguments(monkeypatch):
    import kdpm2core.testing

    calls = []

    def run(backend, extra_args=()):
        calls.append((backend, extra_args))
        return 3

    monkeypatch.setattr(kdpm2core.testing, "run", run, raising=False)
    result = invoke("conformance", "numpy", "-x", "-k", "gaussian")
    assert calls == [("numpy", ("-x", "-k", "gaussian"))]
    assert result.exit_code == 3


def test_conformance_runs_the_real_suite(tmp_path):
    # a subprocess: pytest inside this pytest process would share its plugins and capture
    script = "import sys; from kdpm2core.cli import main; main(sys.argv[1:])"
    args = ["conformance", "numpy", "-q", "-k", "protocol"]
    done = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert re.search(r"\d+ passed", done.stdout) and "failed" not in done.stdout


def test_conformance_without_the_suite_is_one_clear_line(monkeypatch):
    import kdpm2core.testing

    monkeypatch.delattr(kdpm2core.testing, "run", raising=False)
    result = invoke("conformance", "numpy")
    assert result.exit_code != 0
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "conformance suite is not available" in result.stderr


# -- a plain install: the base dependencies only ------------------------------------------------------------------
REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def plain_install(tmp_path_factory):
    """``pip install kdpm2`` without extras, into a fresh venv, without a registry: the venv gets exactly the
    base dependencies of pyproject.toml (linked from this environment, with its build requirements), and pip
    installs a copy of the project with ``--no-deps --no-index``. Returns the venv's ``bin`` folder."""
    tomllib = pytest.importorskip("tomllib")
    import importlib.metadata
    import shutil
    from pathlib import Path

    root = tmp_path_factory.mktemp("plain")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True, timeout=60)
    site = Path(
        subprocess.check_output(
            [str(root / "venv/bin/python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], text=True
        ).strip()
    )
    with open(os.path.join(REPOSITORY, "pyproject.toml"), "rb") as file:
        pyproject = tomllib.load(file)
    requirements = pyproject["project"]["dependencies"] + pyproject["build-system"]["requires"]
    for name in [re.match(r"[A-Za-z0-9_.-]+", requirement).group() for requirement in requirements]:
        distribution = importlib.metadata.distribution(name)
        for top in {Path(str(path)).parts[0] for path in distribution.files or ()} - {"..", "__pycache__"}:
            if not (site / top).exists():
                (site / top).symlink_to(Path(distribution.locate_file(top)).resolve())
    source = root / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info")
    for folder in ("kdpm2core", "backends"):
        shutil.copytree(os.path.join(REPOSITORY, folder), source / folder, ignore=ignore)
    for file in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPOSITORY, file), source / file)
    pip = [sys.executable, "-m", "pip", "--python", str(root / "venv/bin/python"), "install", "-q"]
    subprocess.run(
        [*pip, "--no-deps", "--no-index", "--no-build-isolation", str(source)],
        check=True,
        timeout=300,
        env=plain_environment(),
    )
    return root / "venv" / "bin"


def plain_environment() -> dict:
    """This process's environment without what would let the venv import from elsewhere."""
    return {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME", "KDPM2_PLUGINS")}


def run_plain(bin_folder, *args, cwd):
    return subprocess.run(
        [str(bin_folder / "kdpm2"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=plain_environment(),
    )


def test_plain_install_has_none_of_the_extras(plain_install, tmp_path):
    script = "import importlib.util as u; print([m for m in ('torch', 'jax', 'matplotlib', 'pytest', 'diffusers') if u.find_spec(m)])"
    done = subprocess.run(
        [str(plain_install / "python"), "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=plain_environment(),
    )
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_plain_install_lists_backends_and_samples(plain_install, tmp_path):
    backends = run_plain(plain_install, "backends", cwd=tmp_path)
    assert backends.returncode == 0, backends.stderr
    rows = {line.split()[0]: line for line in backends.stdout.splitlines()[2:]}
    assert rows["numpy"].rstrip().endswith("ok") and "not installed" in rows["torch"] and "not installed" in rows["jax"]
    sampled = run_plain(plain_install, "sample", "--steps", "5", "--samples", "200", "--seed", "1", cwd=tmp_path)
    assert sampled.returncode == 0, sampled.stderr
    assert "KDPM2 on backend numpy" in sampled.stdout and "8/8 modes hit" in sampled.stdout


@pytest.mark.parametrize(
    "args, extra",
    [
        (["sample", "--backend", "torch"], "kdpm2[torch]"),
        (["sample", "--backend", "jax"], "kdpm2[jax]"),
        (["compare", "--backends", "numpy,torch"], "kdpm2[torch]"),
        (["sample", "--plot", "samples.png"], "kdpm2[cli]"),
        (["schedule", "--plot", "schedule.svg"], "kdpm2[cli]"),
        (["conformance", "numpy"], "kdpm2[test]"),
    ],
)
def test_plain_install_names_the_missing_extra_in_one_line(plain_install, tmp_path, args, extra):
    done = run_plain(plain_install, *args, cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"pip install '{extra}'" in done.stderr, done.stderr
    assert not list(tmp_path.iterdir())  # nothing sampled or written before the error


# -- errors ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, words",
    [
        (["sample", "--backend", "nosuch"], "unknown backend 'nosuch'"),
        (["sample", "--steps", "0"], "--steps"),
        (["sample", "--sigmas", "fancy"], "--sigmas"),
        (["sample", "--stepz", "3"], "--stepz"),
        (["sample", "--device", "tpu:7"], "tpu:7"),
        (["sample", "--beta-start", "2"], "beta_start"),
        (["sample", "--dtype", "bfloat16"], "the default device with --dtype bfloat16"),
        (["sample", "--seed", "-1"], "--seed"),
        (["compare", "--seed", "-1"], "--seed"),
        (["sample", "--plot", "/nonexistent/dir/x.png"], "--plot"),
        (["schedule", "--plot", "/nonexistent/dir/x.png"], "--plot"),
        (["sample", "--plot", "out.txt"], "--plot"),
        pytest.param(
            ["sample", "--backend", "torch", "--device", "meta"],
            "--device 'meta'",
            marks=pytest.mark.skipif("torch" not in available_backends(), reason="torch backend not installed"),
        ),
        (["schedule", "--custom-sigmas", "1,2,3"], "strictly decreasing"),
        (["schedule", "--custom-sigmas", "1,x"], "--custom-sigmas"),
        (["compare", "--backends", "numpy,nosuch"], "unknown backend 'nosuch'"),
        (["conformance", "nosuch"], "unknown backend 'nosuch'"),
        (["frobnicate"], "frobnicate"),
    ],
)
def test_user_errors_are_one_line_with_status_2(args, words):
    result = invoke(*args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdpm2") and "error:" in lines[0] and words in lines[0], (
        result.stderr
    )
    assert "Traceback" not in result.output and result.stdout == ""


@pytest.mark.parametrize("command", ["sample", "compare"])
def test_running_out_of_memory_is_a_user_error(monkeypatch, command):
    def run(*args, **kwargs):
        raise MemoryError("Unable to allocate 1.46 TiB")  # what numpy says for --samples 100000000000

    monkeypatch.setattr(toy, "run", run)
    result = invoke(command, "--backends" if command == "compare" else "--backend", "numpy")
    assert result.exit_code == 2
    assert (
        result.stderr.strip() == f"kdpm2 {command}: error: out of memory for --samples "
        f"{2000 if command == 'sample' else 500}: Unable to allocate 1.46 TiB"
    )


def test_keyboard_interrupt_exits_130_without_traceback(monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(toy, "run", interrupted)
    result = invoke("sample")
    assert result.exit_code == 130
    assert result.stderr.strip() == "kdpm2: interrupted"


def test_ctrl_c_in_a_real_process():
    # Python's own Ctrl-C handler, installed explicitly: a shell's background jobs inherit SIGINT ignored
    script = (
        "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from kdpm2core.cli import main; main(sys.argv[1:])"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script, "sample", "--steps", "100000", "--progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    seen = b""
    while b"call" not in seen:  # the progress bar is up: we are inside the sampling loop
        chunk = os.read(process.stderr.fileno(), 256)
        assert chunk, "the process ended before sampling started"
        seen += chunk
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert b"Traceback" not in err and err.strip().endswith(b"kdpm2: interrupted")


@pytest.mark.skipif("jax" not in available_backends(), reason="jax backend not installed")
def test_compare_skips_a_backend_that_cannot_run_the_options(monkeypatch):
    import jax

    if jax.config.jax_enable_x64:
        pytest.skip("JAX float64 is enabled in this process")
    monkeypatch.setattr(cli, "available_backends", lambda: ["jax", "numpy"])
    data = invoke_json("compare", "--dtype", "float64", "--steps", "3", "--samples", "20")
    rows = {row["backend"]: row for row in data["backends"]}
    assert rows["numpy"]["status"] == "ok"
    assert rows["jax"]["status"].startswith("skipped:") and "float64" in rows["jax"]["status"]


def test_sampling_on_numpy_imports_neither_torch_nor_jax():
    script = (
        "import sys; from kdpm2core.cli import cli; "
        "code = cli.main(['sample', '--steps', '2', '--samples', '10'], standalone_mode=False); "
        "print('EXIT', code, 'torch' in sys.modules, 'jax' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "EXIT 0 False False", done.stdout + done.stderr


# -- --sampler dpm2-a ----------------------------------------------------------------------------------------------
def test_ancestral_sample_is_reproducible_from_the_seed_and_differs_from_dpm2():
    def mean_error(*args):
        data = invoke_json("sample", "--steps", "6", "--samples", "200", "--toy", "gaussian", *args)
        return data["results"]["gaussian"]["mean_error"]

    first = mean_error("--sampler", "dpm2-a", "--seed", "3")
    assert mean_error("--sampler", "dpm2-a", "--seed", "3") == first
    assert mean_error("--sampler", "dpm2-a", "--seed", "4") != first
    assert mean_error("--seed", "3") != first  # DPM2 follows the probability flow; DPM2 a adds noise
    text = invoke("sample", "--sampler", "dpm2-a", "--steps", "4", "--samples", "50").output
    assert text.startswith("DPM2 a on backend numpy")


def test_ancestral_compare_agrees_across_backends():
    """The step noise is kdpm2core.noise of --seed: the same on every backend, so DPM2 a agrees as DPM2 does."""
    names = [name for name in ("numpy", "torch", "jax") if name in available_backends()]
    data = invoke_json(
        "compare", "--sampler", "dpm2-a", "--backends", ",".join(names), "--steps", "6", "--samples", "200"
    )
    rows = {row["backend"]: row for row in data["backends"]}
    assert all(row["status"] == "ok" for row in rows.values())
    for row in rows.values():  # as test_compare_agrees_across_backends, plus the noise (within 1.2e-6 relative)
        assert row["max_diff_mixture"] < 5e-5 and row["max_diff_gaussian"] < 5e-5


def test_ancestral_schedule_evaluates_midpoints_between_sigma_and_sigma_down():
    data = invoke_json("schedule", "--sampler", "dpm2-a", "--steps", "4")
    sigmas = np.asarray(data["sigmas"])
    steps = sigmas[0::2]
    # DPM2 a (eta = 1) steps down to sigma_down = sigma_next^2 / sigma: the midpoint sqrt(sigma * sigma_down) is
    # sigma_next itself, where DPM2's is sqrt(sigma * sigma_next)
    np.testing.assert_allclose(sigmas[1::2], steps[1:], rtol=1e-12)
