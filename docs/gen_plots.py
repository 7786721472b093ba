"""Draw the schedule plots of docs/options.md into docs/img/ (run from anywhere: ``python docs/gen_plots.py``).

Each picture shows, per substep (model call), the sigma the model sees and its timestep, for a few values of
one configuration option with every other option at its default. The images are committed; rerun this script
when the schedule code changes. ``--out DIR`` writes them elsewhere (the docs tests do, to check the set).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from kdpm2core import KDPM2DiscreteScheduler, toy
from kdpm2core.cli import _figure, plot_samples, plot_schedules
from kdpm2core.config import validate_config
from kdpm2core.schedule import build_schedule

STEPS = 10


def scheduler(steps: int = STEPS, sigmas=None, mu=None, **options) -> KDPM2DiscreteScheduler:
    s = KDPM2DiscreteScheduler(**options)
    if sigmas is None:
        s.set_timesteps(steps, mu=mu)
    else:
        s.set_timesteps(sigmas=sigmas, mu=mu)
    return s


def flux_mu(image_size: int) -> float:
    """The ``mu`` a Flux pipeline computes for a square image: linear in the number of 16x16-pixel latent
    tokens, from ``base_shift`` 0.5 at 256 tokens to ``max_shift`` 1.15 at 4096 (the Flux-dev config)."""
    tokens = (image_size // 16) ** 2
    return 0.5 + (1.15 - 0.5) * (tokens - 256) / (4096 - 256)


FLOW = {"prediction_type": "flow_prediction"}


def geometric_betas(num: int = 1000) -> list[float]:
    """An example ``trained_betas``: betas growing geometrically from 1e-4 to 0.02."""
    return np.geomspace(1e-4, 0.02, num).tolist()


FIGURES = {
    "steps.png": {f"{n} steps": scheduler(n) for n in (4, 10, 25)},
    "beta_schedule.png": {
        name: scheduler(beta_schedule=name) for name in ("linear", "scaled_linear", "squaredcos_cap_v2")
    },
    "beta_range.png": {
        "beta_start 0.00085, beta_end 0.012 (default)": scheduler(),
        "beta_end 0.02": scheduler(beta_end=0.02),
        "beta_start 0.0001": scheduler(beta_start=0.0001),
    },
    "num_train_timesteps.png": {f"num_train_timesteps {n}": scheduler(num_train_timesteps=n) for n in (1000, 500, 100)},
    "trained_betas.png": {
        "linear betas (default)": scheduler(),
        "trained_betas = geomspace(1e-4, 0.02)": scheduler(trained_betas=geometric_betas()),
    },
    "sigma_families.png": {
        "default (interpolated)": scheduler(),
        "use_karras_sigmas": scheduler(use_karras_sigmas=True),
        "use_exponential_sigmas": scheduler(use_exponential_sigmas=True),
        "use_beta_sigmas": scheduler(use_beta_sigmas=True),
    },
    "timestep_spacing.png": {name: scheduler(timestep_spacing=name) for name in ("linspace", "leading", "trailing")},
    "steps_offset.png": {
        f"leading, steps_offset {n}": scheduler(timestep_spacing="leading", steps_offset=n) for n in (0, 1, 50)
    },
    "flow_shift.png": {
        f"shift {shift}{label}": scheduler(shift=shift, **FLOW)
        for shift, label in ((1.0, ""), (3.0, " (SD3)"), (6.0, ""))
    },
    "flow_dynamic_shift.png": {
        f"{size}x{size} image: mu {flux_mu(size):.2f}": scheduler(
            sigmas=np.linspace(1.0, 1 / STEPS, STEPS), mu=flux_mu(size), use_dynamic_shifting=True, **FLOW
        )
        for size in (256, 512, 1024)
    },
    "custom_sigmas.png": {
        "10 default steps": scheduler(),
        "sigmas=[14.6, 8, 4, 2, 1, 0.5, 0.1, 0]": scheduler(sigmas=[14.6, 8, 4, 2, 1, 0.5, 0.1, 0]),
    },
}


def plot_prediction_types(path: Path) -> None:
    """The coefficients of ``model_output`` in the two combinations of each substep, per prediction type."""
    fig = _figure(9, 3.6)
    left, right = fig.subplots(1, 2)
    for name in ("epsilon", "v_prediction", "sample"):
        table = build_schedule(validate_config({"prediction_type": name}), STEPS).table  # rows a, b, c, p, q, first
        k = np.arange(len(table))
        left.plot(k, table[:, 2], ".-", lw=1, ms=4, label=name)
        right.plot(k, table[:, 4], ".-", lw=1, ms=4, label=name)
    left.set_xlabel("substep")
    left.set_ylabel("c: weight of model_output in prev_sample")
    right.set_xlabel("substep")
    right.set_ylabel("q: weight of model_output in pred_original")
    right.legend(fontsize=8)
    fig.savefig(path)


def main(argv=None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "img")
    out = parser.parse_args(argv).out
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schedulers in FIGURES.items():
        plot_schedules(out / name, schedulers)
        written.append(out / name)
    plot_prediction_types(out / "prediction_type.png")
    written.append(out / "prediction_type.png")
    # what `kdpm2 sample --plot sample.png` draws
    results = {name: toy.run(name, scheduler(25)) for name in toy.TOYS}
    plot_samples(out / "sample.png", results, scheduler(25))
    written.append(out / "sample.png")
    return written


if __name__ == "__main__":
    for path in main():
        print(f"{path} ({path.stat().st_size // 1024} KiB)")
