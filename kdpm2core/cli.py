"""The ``kdpm2`` command: list backends, sample toy models with an exact denoiser, compare backends, print
schedules, run the conformance suite and start a backend plugin.

User errors (an unknown backend, a bad option) print one line and exit with status 2; Ctrl-C exits with
status 130. Both without a traceback. A missing optional part (matplotlib for ``--plot``, a backend's framework,
pytest for ``conformance``) is such a user error, naming the extra that installs it.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import math
import os
import sys
import time

import click
import numpy as np

from kdpm2core import __version__, toy
from kdpm2core.config import CHOICES, is_flow
from kdpm2core.plugins import BackendError, available_backends, backend_report, get_backend, registry
from kdpm2core.schedule import flow_shift
from kdpm2core.scheduler import KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler

__all__ = ["main", "cli"]

SIGMA_FAMILIES = ("default", "karras", "exponential", "beta")
#: --sampler: the scheduler class of each name (the names web UIs give them, "DPM2" and "DPM2 a")
SAMPLERS = {"dpm2": KDPM2DiscreteScheduler, "dpm2-a": KDPM2AncestralDiscreteScheduler}
DTYPES = ("float32", "float64", "float16", "bfloat16")
TOY_TITLES = {
    "mixture": "8 Gaussians on a ring of radius 3, std 0.2",
    "gaussian": "one Gaussian, mean (1, -0.5), std 0.5",
}
# For exact samples of a 2-D isotropic Gaussian: P(r <= 3 std) = 1 - exp(-9/2); E[r] = std * sqrt(pi/2).
EXACT_WITHIN_3_STD = 1.0 - math.exp(-4.5)
EXACT_MEAN_DISTANCE = 0.2 * math.sqrt(math.pi / 2)


class UserError(click.UsageError):
    """Bad input from the user: one line, exit status 2."""


@contextlib.contextmanager
def user_errors():
    """Turn the library's input errors (raised while setting things up from options) into :class:`UserError`."""
    try:
        yield
    except (BackendError, ValueError, TypeError) as exc:
        raise UserError(str(exc)) from None


class Kdpm2Group(click.Group):
    """A click group whose errors are one line on stderr: status 2 for usage errors, 130 for Ctrl-C."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            code = super().main(args, prog_name or "kdpm2", complete_var, standalone_mode=False, **extra)
            code = code if isinstance(code, int) else 0
        except click.ClickException as exc:
            where = exc.ctx.command_path if getattr(exc, "ctx", None) is not None else "kdpm2"
            message = " ".join(exc.format_message().split())
            ours = isinstance(exc, UserError)  # our messages say what to fix; click's own get a pointer to --help
            hint = f" (see '{where} --help')" if isinstance(exc, click.UsageError) and not ours else ""
            click.echo(f"{where}: error: {message}{hint}", err=True)
            code = exc.exit_code
        except (click.exceptions.Abort, KeyboardInterrupt):
            click.echo("kdpm2: interrupted", err=True)
            code = 130
        if not standalone_mode:
            return code
        sys.exit(code)


def _table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _emit_json(payload: dict) -> None:
    click.echo(json.dumps(_jsonable(payload), indent=2, allow_nan=False))


def _jsonable(value):
    """``value`` with NumPy types made plain and NaN or infinity made ``None``: strict JSON has neither."""
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _check_plot(ctx, param, path: str | None) -> str | None:
    """The file --plot will write, checked before any work: its folder exists and matplotlib writes its format."""
    if path is None:
        return None
    try:
        from matplotlib.figure import Figure
    except ModuleNotFoundError:
        raise click.BadParameter(
            "needs matplotlib, which is not installed (pip install 'kdpm2[cli]')", ctx, param
        ) from None

    folder, name = os.path.split(path)
    if folder and not os.path.isdir(folder):
        raise click.BadParameter(f"folder {folder!r} does not exist", ctx, param)
    extension = os.path.splitext(name)[1].lstrip(".").lower()
    if not extension:  # matplotlib would add .png itself; adding it here reports the name really written
        return path + ".png"
    formats = Figure().canvas.get_supported_filetypes()
    if extension not in formats:
        supported = ", ".join(sorted(formats))
        raise click.BadParameter(f"cannot write {extension!r} files; use one of {supported}", ctx, param)
    return path


def plot_option(what: str):
    return click.option(
        "--plot",
        type=click.Path(dir_okay=False, writable=True),
        default=None,
        callback=_check_plot,
        help=f"Write {what} to this file, in the format its extension names (png, pdf, svg, ...; none: .png added).",
    )


def _save(fig, path: str) -> None:
    try:
        fig.savefig(path)
    except OSError as exc:  # no permission, a full disk: found only when writing
        raise UserError(f"--plot: cannot write {path}: {exc.strerror or exc}") from None


# -- scheduler options, shared by sample, compare and schedule -------------------------------------------------
def scheduler_options(command):
    """The scheduler's configuration as command-line options."""
    options = [
        click.option(
            "--sampler",
            type=click.Choice(list(SAMPLERS)),
            default="dpm2",
            show_default=True,
            help="DPM2, or DPM2 a (ancestral: adds noise at each step, from kdpm2core.noise with --seed).",
        ),
        click.option(
            "--steps",
            default=25,
            show_default=True,
            type=click.IntRange(min=1),
            help="Number of sampling steps (two model calls each, one for the last).",
        ),
        click.option(
            "--sigmas",
            "sigma_family",
            type=click.Choice(SIGMA_FAMILIES),
            default="default",
            show_default=True,
            help="Sigma family: interpolated from training (default), Karras, exponential or beta.",
        ),
        click.option(
            "--spacing",
            type=click.Choice(CHOICES["timestep_spacing"]),
            default="linspace",
            show_default=True,
            help="Timestep spacing.",
        ),
        click.option(
            "--prediction-type",
            type=click.Choice(CHOICES["prediction_type"]),
            default="epsilon",
            show_default=True,
            help="What the model predicts.",
        ),
        click.option(
            "--beta-schedule",
            type=click.Choice(CHOICES["beta_schedule"]),
            default="linear",
            show_default=True,
            help="Training beta schedule.",
        ),
        click.option("--beta-start", type=float, default=None, help="First training beta [scheduler default 0.00085]."),
        click.option("--beta-end", type=float, default=None, help="Last training beta [scheduler default 0.012]."),
        click.option(
            "--num-train-timesteps",
            type=click.IntRange(min=1),
            default=None,
            help="Training timesteps [scheduler default 1000].",
        ),
        click.option(
            "--steps-offset",
            type=click.IntRange(min=0),
            default=None,
            help="Offset added to 'leading' timesteps [default 0].",
        ),
        click.option(
            "--custom-sigmas",
            default=None,
            metavar="S0,S1,...,0",
            help="Explicit decreasing sigmas, final one included (overrides --steps and --sigmas).",
        ),
        click.option(
            "--shift",
            type=float,
            default=None,
            help="Shift of a flow-matching schedule (--prediction-type flow_prediction; SD3: 3) [default 1].",
        ),
        click.option(
            "--mu",
            type=float,
            default=None,
            help="Dynamic shift of a flow-matching schedule, shift e^mu (as Flux pipelines compute it).",
        ),
    ]
    return _with_options(command, options)


def run_options(*, samples: int, device_help: str):
    """The options of a sampling run, shared by sample and compare: device, dtype, seed and point count."""
    options = [
        click.option("--device", default=None, help=device_help),
        click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True, help="Array dtype."),
        click.option(
            "--seed",
            type=click.IntRange(min=0),
            default=0,
            show_default=True,
            help="Seed of the starting noise (drawn with NumPy).",
        ),
        click.option(
            "--samples",
            "num_samples",
            type=click.IntRange(min=1),
            default=samples,
            show_default=True,
            help="Points per toy.",
        ),
    ]
    return lambda command: _with_options(command, options)


def _with_options(command, options):
    for option in reversed(options):
        command = option(command)
    return command


def _config_from(opts: dict) -> dict:
    config = {
        "timestep_spacing": opts["spacing"],
        "prediction_type": opts["prediction_type"],
        "beta_schedule": opts["beta_schedule"],
    }
    for key in ("beta_start", "beta_end", "num_train_timesteps", "steps_offset"):
        if opts[key] is not None:
            config[key] = opts[key]
    if opts["sigma_family"] != "default":
        config[f"use_{opts['sigma_family']}_sigmas"] = True
    if opts["shift"] is not None:
        config["shift"] = opts["shift"]
    if opts["mu"] is not None:
        config["use_dynamic_shifting"] = True
    return config


def _parse_sigmas(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise UserError(f"--custom-sigmas must be comma-separated numbers, got {text!r}") from None


def _make_scheduler(opts: dict, backend_name: str = "numpy", device=None, seed: int = 0) -> KDPM2DiscreteScheduler:
    with user_errors():
        cls = SAMPLERS[opts["sampler"]]
        extra = {"noise_seed": seed} if cls is KDPM2AncestralDiscreteScheduler else {}
        scheduler = cls(**_config_from(opts), backend=backend_name, **extra)
        _reset(scheduler, opts, device)
    return scheduler


def _reset(scheduler, opts: dict, device=None) -> None:
    sigmas = _parse_sigmas(opts["custom_sigmas"])
    if sigmas is None:
        scheduler.set_timesteps(opts["steps"], device=device, mu=opts["mu"])
    else:
        scheduler.set_timesteps(device=device, sigmas=sigmas, mu=opts["mu"])


def _describe_schedule(scheduler) -> str:
    sigmas = np.asarray(scheduler.backend.to_numpy(scheduler.sigmas), dtype=np.float64)
    config = scheduler.config
    family = next((name for name in SIGMA_FAMILIES[1:] if config.get(f"use_{name}_sigmas")), "default")
    if is_flow(config):
        shift = _flow_shift_of(scheduler)
        return (
            f"s {sigmas[0]:.4g} -> {sigmas[sigmas > 0].min():.4g} -> {sigmas[-1]:.4g}, flow matching, "
            f"shift {shift:.4g}, {family} sigmas, flow_prediction"
        )
    return (
        f"sigma {sigmas[0]:.4g} -> {sigmas[sigmas > 0].min():.4g} -> {sigmas[-1]:.4g}, "
        f"{config.timestep_spacing} spacing, {family} sigmas, {config.beta_schedule} betas, "
        f"{config.prediction_type} prediction"
    )


def _flow_shift_of(scheduler) -> float:
    """The shift the scheduler's flow schedule was built with (``e^mu`` or ``mu`` with dynamic shifting)."""
    return flow_shift(scheduler.config, scheduler.state_dict()["schedule"]["mu"])


# -- running the toys ------------------------------------------------------------------------------------------
def _prepare(backend_name: str, device: str | None, dtype: str, opts: dict, seed: int = 0):
    """Backend, parsed device and scheduler, with every input checked up front (UserError otherwise)."""
    with user_errors():
        backend = get_backend(backend_name)
        if dtype == "float64" and not backend.float64:
            raise ValueError(f"backend {backend_name!r} has no float64 support in this process (--dtype)")
        placed = backend.device(device)
        try:  # the device and dtype together ("cuda" without CUDA), and data we can read back (not torch's "meta")
            backend.to_numpy(backend.asarray(np.zeros(1), dtype=backend.dtype(dtype), device=placed) + 1)
        except Exception as exc:  # torch raises RuntimeError or AssertionError here, other frameworks their own
            where = f"--device {device!r}" if device else "the default device"
            raise ValueError(f"{where} with --dtype {dtype} does not work on backend {backend_name!r}: {exc}") from None
    scheduler = _make_scheduler(opts, backend_name, placed, seed)
    return backend, placed, scheduler


def _run_toys(scheduler, toys, opts, *, placed, device, dtype, seed, num_samples, progress) -> dict:
    from tqdm import tqdm

    results = {}
    with np.errstate(all="ignore"):  # overflow shows in the results, reported as not finite; no warnings besides
        for name in toys:
            _reset(scheduler, opts, placed)  # fresh scheduler state for each toy
            label = f"{name} on {scheduler.backend.name}"
            total = scheduler.timesteps.shape[0]
            with tqdm(total=total, desc=label, unit="call", disable=not progress, leave=False, file=sys.stderr) as bar:
                results[name] = toy.run(
                    name,
                    scheduler,
                    num_samples=num_samples,
                    seed=seed,
                    dtype=dtype,
                    device=device,
                    callback=lambda _: bar.update(),
                )
    return results


def _out_of_memory(exc: MemoryError, num_samples: int) -> UserError:
    return UserError(f"out of memory for --samples {num_samples}: {exc}")


def _framework_version(backend, name: str) -> str:
    """``backend.version``, else the version of the distribution that installs the module the backend needs
    (``yaml`` comes from PyYAML), else its plugin's."""
    version = getattr(backend, "version", None)
    if version:
        return str(version)
    entry = registry().entries.get(name)
    if entry is None:
        return "?"
    owners = importlib.metadata.packages_distributions() if entry.requires else {}
    for module in entry.requires:
        for dist in owners.get(module) or [module]:  # a module no distribution records: try its own name
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                return importlib.metadata.version(dist)
    if entry.distribution:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return f"{entry.distribution} {importlib.metadata.version(entry.distribution)}"
    return "?"


def _summary_lines(name: str, result: dict) -> str:
    head = f"{name:<8} ({TOY_TITLES[name]}): {len(result['samples'])} points"
    if not result["finite"]:
        return head + ": NOT FINITE (nan or inf in the result)"
    if name == "gaussian":
        return (
            head + f", max error vs the exact probability-flow solution {result['max_error']:.2e} "
            f"(mean {result['mean_error']:.2e}) [{result['wall_time_s']:.3f} s]"
        )
    return (
        head + f", {100 * result['within_3_std']:.1f}% within 3 std of a mode (exact samples: "
        f"{100 * EXACT_WITHIN_3_STD:.1f}%), mean distance to the nearest mode {result['mean_distance_to_mode']:.3f} "
        f"(exact: {EXACT_MEAN_DISTANCE:.3f}), {result['modes_hit']}/{result['modes']} modes hit "
        f"[{result['wall_time_s']:.3f} s]"
    )


def _compare_figures(row: dict) -> list[str]:
    def show(key, form, scale=1, unit=""):
        value = row.get(key)  # absent for a row that did not run; None or NaN for a result that is not finite
        return "-" if value is None or not math.isfinite(value) else format(scale * value, form) + unit

    return [
        show("wall_time_s", ".3f", unit=" s"),
        show("max_diff_mixture", ".2e"),
        show("max_diff_gaussian", ".2e"),
        show("gaussian_error", ".2e"),
        show("within_3_std", ".1f", 100, "%"),
    ]


def _run_settings(scheduler, opts: dict, *, device, dtype: str, seed: int, num_samples: int) -> dict:
    """What repeats a run, for the JSON of ``sample`` and ``compare``."""
    return {
        "device": device or "default",
        "dtype": dtype,
        "steps": scheduler.num_inference_steps,
        "model_calls": scheduler.timesteps.shape[0],
        "seed": seed,
        "samples": num_samples,
        "custom_sigmas": _parse_sigmas(opts["custom_sigmas"]),
        "config": dict(scheduler.config),
        "sigmas": toy.model_sigmas(scheduler).tolist(),
    }


def _public(result: dict) -> dict:
    return {key: value for key, value in result.items() if key != "samples"}


# -- commands --------------------------------------------------------------------------------------------------
@click.group(
    name="kdpm2", cls=Kdpm2Group, invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]}
)
@click.version_option(__version__, prog_name="kdpm2")
@click.pass_context
def cli(ctx):
    """The KDPM2 diffusion sampler on NumPy, PyTorch, JAX and any backend plugin."""
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


@cli.command(short_help="Registered backends and whether they work.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def backends(as_json):
    """List the registered backends: version, devices, float64 support, distribution and status.

    Every backend is built (its framework imported), so one that fails to build is listed as failed: the
    statuses are those of kdpm2core.backend_report(build=True).
    """
    rows = []
    for row in backend_report(build=True):
        info = {
            "name": row["name"],
            "version": None,
            "devices": [],
            "float64": None,
            "distribution": row["distribution"],
            "status": row["status"],
        }
        if row["status"] == "ok":
            try:
                backend = get_backend(row["name"])
                info.update(
                    version=_framework_version(backend, row["name"]),
                    devices=list(backend.devices()),
                    float64=bool(backend.float64),
                )
            except Exception as exc:  # a broken third-party backend is a row of the table, not a crash
                info["status"] = " ".join(f"failed: {exc}".split())  # one line: one table row
        rows.append(info)
    if as_json:
        _emit_json({"backends": rows})
        return
    yes_no = {True: "yes", False: "no", None: "-"}
    table = [
        [
            r["name"],
            r["version"] or "-",
            ", ".join(r["devices"]) or "-",
            yes_no[r["float64"]],
            r["distribution"] or "-",
            r["status"],
        ]
        for r in rows
    ]
    click.echo(_table(["backend", "version", "devices", "float64", "distribution", "status"], table))


@cli.command(short_help="Sample toy models with an exact denoiser.")
@click.option(
    "--backend",
    "backend_name",
    default="numpy",
    show_default=True,
    help="Registered backend name (see 'kdpm2 backends').",
)
@run_options(samples=2000, device_help="Device, e.g. cpu, cuda:0, mps, gpu:0 [backend default].")
@click.option(
    "--toy",
    "toy_name",
    type=click.Choice(("all",) + tuple(toy.TOYS)),
    default="all",
    show_default=True,
    help="Which toy model.",
)
@scheduler_options
@plot_option("the samples over each density, and the sigma schedule,")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.option("--progress/--no-progress", default=None, help="Show a progress bar [default: on a terminal].")
def sample(backend_name, device, dtype, seed, num_samples, toy_name, plot, as_json, progress, **opts):
    """Sample toy models whose denoiser is exact and report how close the samples are to the truth."""
    toys = list(toy.TOYS) if toy_name == "all" else [toy_name]
    backend, placed, scheduler = _prepare(backend_name, device, dtype, opts, seed)
    if progress is None:
        progress = sys.stderr.isatty()
    start = time.perf_counter()
    try:
        results = _run_toys(
            scheduler,
            toys,
            opts,
            placed=placed,
            device=device,
            dtype=dtype,
            seed=seed,
            num_samples=num_samples,
            progress=progress,
        )
    except MemoryError as exc:
        raise _out_of_memory(exc, num_samples) from None
    wall = time.perf_counter() - start
    if plot:
        plot_samples(plot, results, scheduler)
    model_calls = scheduler.timesteps.shape[0]
    if as_json:
        _emit_json(
            {
                "backend": backend_name,
                "version": _framework_version(backend, backend_name),
                **_run_settings(scheduler, opts, device=device, dtype=dtype, seed=seed, num_samples=num_samples),
                "results": {name: _public(result) for name, result in results.items()},
                "wall_time_s": wall,
                "plot": plot,
            }
        )
        return
    click.echo(
        f"{'DPM2 a' if opts['sampler'] == 'dpm2-a' else 'KDPM2'} on backend {backend_name} {_framework_version(backend, backend_name)}, device {device or 'default'}, "
        f"{dtype}, {scheduler.num_inference_steps} steps = {model_calls} model calls, seed {seed}"
    )
    click.echo(f"schedule: {_describe_schedule(scheduler)}")
    for name, result in results.items():
        click.echo(_summary_lines(name, result))
    click.echo(f"wall time {wall:.3f} s" + (f"; plot written to {plot}" if plot else ""))


@cli.command(short_help="The same sampling on every backend, side by side.")
@click.option("--backends", "names", default=None, metavar="A,B,...", help="Backends to compare [every available one].")
@run_options(samples=500, device_help="Device for every backend [backend default].")
@scheduler_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def compare(names, device, dtype, seed, num_samples, as_json, **opts):
    """Run the same sampling on every available backend and tabulate the largest differences from NumPy.

    A backend named in --backends that cannot run the options is an error (status 2); one picked by default is
    a skipped row.
    """
    chosen = [n.strip() for n in names.split(",") if n.strip()] if names else available_backends()
    chosen = ["numpy"] + [name for name in dict.fromkeys(chosen) if name != "numpy"]  # the reference runs first
    reference_scheduler = _make_scheduler(opts)
    rows, prepared = {}, {}
    for name in chosen:  # every backend checked before any runs
        try:
            prepared[name] = _prepare(name, device if name != "numpy" else None, dtype, opts, seed)
            rows[name] = {"backend": name, "status": "ok"}
        except UserError as exc:
            if name == "numpy" or names:  # the reference, or a backend the user asked for by name
                raise
            rows[name] = {"backend": name, "status": f"skipped: {exc.format_message()}"}
        except Exception as exc:  # one backend failing must not hide the others' results
            rows[name] = {"backend": name, "status": f"failed: {exc!r}"}
    reference = None
    for name, (_backend, placed, scheduler) in prepared.items():
        row = rows[name]
        try:
            results = _run_toys(
                scheduler,
                list(toy.TOYS),
                opts,
                placed=placed,
                device=device if name != "numpy" else None,
                dtype=dtype,
                seed=seed,
                num_samples=num_samples,
                progress=False,
            )
        except MemoryError as exc:
            raise _out_of_memory(exc, num_samples) from None
        except Exception as exc:  # as above: a row, and the others still run
            row["status"] = f"failed: {exc!r}"
            continue
        samples = {key: result["samples"] for key, result in results.items()}
        if reference is None:
            reference = samples
        row["wall_time_s"] = sum(result["wall_time_s"] for result in results.values())
        for key in samples:
            row[f"max_diff_{key}"] = float(np.max(np.abs(samples[key] - reference[key])))
        row["gaussian_error"] = results["gaussian"].get("max_error")
        row["within_3_std"] = results["mixture"].get("within_3_std")
        if not all(result["finite"] for result in results.values()):
            row["status"] = "not finite"
    rows = list(rows.values())
    failed = any(row["status"].startswith("failed") for row in rows)
    if as_json:
        settings = _run_settings(
            reference_scheduler, opts, device=device, dtype=dtype, seed=seed, num_samples=num_samples
        )
        _emit_json({**settings, "backends": rows})
    else:
        click.echo(
            f"{num_samples} points per toy, {dtype}, seed {seed}; "
            "differences are max |x - x_numpy| over all coordinates"
        )
        headers = [
            "backend",
            "status",
            "time",
            "max diff mixture",
            "max diff gaussian",
            "gaussian error",
            "within 3 std",
        ]
        click.echo(_table(headers, [[r["backend"], r["status"], *_compare_figures(r)] for r in rows]))
    if failed:
        sys.exit(1)


@cli.command(short_help="Timesteps and sigmas of a schedule.")
@scheduler_options
@plot_option("the timesteps and sigmas")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def schedule(plot, as_json, **opts):
    """Print the timesteps and sigmas of a schedule: one row per substep (model call)."""
    scheduler = _make_scheduler(opts)
    timesteps = np.asarray(scheduler.timesteps, dtype=np.float64)
    sigmas = toy.model_sigmas(scheduler)
    if plot:
        plot_schedules(plot, {_describe_schedule(scheduler): scheduler})
    if as_json:
        _emit_json(
            {
                "config": dict(scheduler.config),
                "steps": scheduler.num_inference_steps,
                "init_noise_sigma": scheduler.init_noise_sigma,
                "timesteps": timesteps.tolist(),
                "sigmas": sigmas.tolist(),
                "final_sigma": float(np.asarray(scheduler.sigmas)[-1]),
                "plot": plot,
            }
        )
        return
    click.echo(
        f"{scheduler.num_inference_steps} steps, {len(timesteps)} substeps; "
        f"init_noise_sigma {scheduler.init_noise_sigma:.6g}"
    )
    click.echo(f"schedule: {_describe_schedule(scheduler)}")
    rows = [
        [k, k // 2, "euler" if k % 2 == 0 else "midpoint", f"{t:.4f}", f"{s:.6g}"]
        for k, (t, s) in enumerate(zip(timesteps, sigmas))
    ]
    # a flow schedule's noise level is s in [0, 1], and its timesteps are the shifted s * num_train_timesteps
    click.echo(_table(["substep", "step", "kind", "timestep", "s" if is_flow(scheduler.config) else "sigma"], rows))
    if plot:
        click.echo(f"plot written to {plot}")


@cli.command(short_help="Run the conformance suite on one backend.", context_settings={"ignore_unknown_options": True})
@click.argument("backend_name", metavar="NAME")
@click.argument("pytest_args", nargs=-1, type=click.UNPROCESSED)
def conformance(backend_name, pytest_args):
    """Run the conformance suite on backend NAME; extra arguments go to pytest (e.g. -x -q)."""
    with user_errors():
        get_backend(backend_name)
    missing = [module for module in ("pytest", "hypothesis") if importlib.util.find_spec(module) is None]
    if missing:
        raise UserError(f"the conformance suite needs {', '.join(missing)}, not installed (pip install 'kdpm2[test]')")
    try:
        from kdpm2core.testing import run
    except ImportError as exc:
        raise click.ClickException(f"the conformance suite is not available in this installation: {exc}") from None
    code = run(backend_name, extra_args=tuple(pytest_args))
    sys.exit(int(code))


@cli.group(short_help="Tools for writing a backend plugin.")
def plugin():
    """Tools for writing a backend plugin (see docs/plugins.md)."""


@plugin.command(name="new", short_help="Write a new backend plugin distribution.")
@click.argument("name")
@click.option(
    "--directory", "-o", default=None, type=click.Path(file_okay=False), help="Where to write it [./kdpm2-NAME]."
)
def plugin_new(name, directory):
    """Write a plugin distribution for backend NAME: pyproject.toml with the kdpm2 entry point, the backend
    module (NumPy-backed, to adapt to your library) and a test that runs the conformance suite. Install it with
    'pip install -e DIRECTORY', then run 'kdpm2 conformance NAME'."""
    from kdpm2core.plugin_template import write_plugin

    directory = directory or f"kdpm2-{name}"
    with user_errors():
        written = write_plugin(name, directory)
    for path in written:
        click.echo(f"wrote {path}")
    click.echo(f"next: pip install -e {directory} && kdpm2 conformance {name}")


# -- plots -------------------------------------------------------------------------------------------------------
def _figure(width: float, height: float):
    # matplotlib's Figure without pyplot: no GUI backend, no global state
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=80, layout="constrained")


def _draw_sigmas(ax, label: str, scheduler) -> None:
    sigmas = toy.model_sigmas(scheduler)
    k = np.arange(len(sigmas))
    (line,) = ax.plot(k, sigmas, "-", lw=1, label=label)
    ax.plot(k[::2], sigmas[::2], "o", ms=3, color=line.get_color())
    ax.plot(k[1::2], sigmas[1::2], "x", ms=3, color=line.get_color())
    ax.set_xlabel("substep (o Euler, x midpoint)")
    if is_flow(scheduler.config):  # s in [0, 1]: a linear axis shows where a shift puts the steps
        ax.set_ylabel("s the model sees")
        return
    ax.set_yscale("log")
    ax.set_ylabel("sigma the model sees")


def plot_samples(path: str, results: dict, scheduler) -> None:
    """Samples of each toy over its density, and the sigma schedule, side by side in one figure."""
    fig = _figure(4 * (len(results) + 1), 4)
    axes = fig.subplots(1, len(results) + 1)
    grid = np.linspace(-4.5, 4.5, 181)
    points = np.stack(np.meshgrid(grid, grid), axis=-1)
    for ax, (name, result) in zip(axes, results.items()):
        density = np.exp(toy.TOYS[name].log_density(points))
        ax.contourf(grid, grid, density, levels=12, cmap="Blues")
        ax.scatter(result["samples"][:, 0], result["samples"][:, 1], s=2, c="tab:red", alpha=0.6, lw=0)
        ax.set_xlim(grid[0], grid[-1])
        ax.set_ylim(grid[0], grid[-1])
        ax.set_aspect("equal")
        ax.set_title(f"{name}: {len(result['samples'])} samples")
    _draw_sigmas(axes[-1], scheduler.backend.name, scheduler)
    axes[-1].set_title(f"{scheduler.num_inference_steps} steps")
    _save(fig, path)


def plot_schedules(path: str, schedulers: dict) -> None:
    """Sigma and timestep per substep of each labelled scheduler, in one figure."""
    fig = _figure(9, 3.6)
    left, right = fig.subplots(1, 2)
    for label, scheduler in schedulers.items():
        _draw_sigmas(left, label, scheduler)
        right.plot(np.asarray(scheduler.timesteps, dtype=np.float64), ".-", lw=1, ms=4, label=label)
    right.set_xlabel("substep")
    right.set_ylabel("timestep")
    if len(schedulers) == 1:
        fig.suptitle(next(iter(schedulers)), fontsize=9)
    else:
        right.legend(fontsize=8)
    _save(fig, path)


def main(argv=None):
    """Entry point of the ``kdpm2`` console script."""
    return cli.main(args=argv, prog_name="kdpm2")


if __name__ == "__main__":
    main()
