"""Regenerate ``data/diffusers_reference.npz`` from diffusers' ``KDPM2DiscreteScheduler`` (run once, by hand).

    python -m kdpm2core.testing.make_reference_data

This script is the only part of :mod:`kdpm2core.testing` that imports diffusers (and torch); the suite reads
the file it writes. For every option combination of :func:`kdpm2core.testing.cases.grid` it stores diffusers'
``timesteps``, ``sigmas``, ``init_noise_sigma`` and input scale per substep; for most combinations also a full
trajectory of the toy model (float64 samples, float32 schedule as diffusers keeps it), an ``add_noise`` batch,
an img2img run started with ``set_begin_index`` and, for a few, the diffusers-format config JSON.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from kdpm2core.testing.cases import DATA_FILE, NOISE, ORIGINAL, ORIGINAL_NOISE, grid, toy_model, trained_betas


def _run(scheduler, x, timesteps, xp, scales=None):
    """Sample with the toy model; returns per-substep prev and pred samples (and appends input scales)."""
    prev, pred = [], []
    for t in timesteps:
        if scales is not None:
            scales.append(float(scheduler.scale_model_input(torch.ones((), dtype=torch.float64), t)))
        model_in = scheduler.scale_model_input(x, t)
        x, x0 = scheduler.step(toy_model(model_in, float(t), xp=xp), t, x, return_dict=False)
        prev.append(x.numpy().copy())
        pred.append(x0.numpy().copy())
    return np.array(prev), np.array(pred)


def generate() -> dict:
    import array_api_compat.torch as xp
    import diffusers

    flat: dict[str, list] = {}
    cases = []

    def put(case, name, values):
        values = np.asarray(values)
        chunks = flat.setdefault(name, [])
        start = sum(len(c) for c in chunks)
        chunks.append(values.reshape(len(values), *values.shape[1:]) if values.ndim else values.reshape(1))
        case["slices"][name] = [start, start + len(chunks[-1])]

    for key, config, steps, with_trajectory in grid():
        sched = diffusers.KDPM2DiscreteScheduler(**config)
        sched.set_timesteps(steps)
        stored_config = dict(config)
        if "trained_betas" in stored_config:
            stored_config["trained_betas"] = "quadratic-500"
        case = {"key": key, "config": stored_config, "steps": steps, "slices": {}}
        case["init_noise_sigma"] = float(sched.init_noise_sigma)
        put(case, "timesteps", sched.timesteps.double().numpy())
        put(case, "sigmas", sched.sigmas.numpy())
        # Start explicitly at substep 0: where rounding repeats timesteps[0] later in the schedule (Karras
        # sigmas on squaredcos_cap_v2), diffusers' duplicate-timestep rule would otherwise start at substep 2.
        sched.set_begin_index(0)
        x = torch.tensor(NOISE, dtype=torch.float64) * sched.init_noise_sigma
        scales = []  # the input scale depends on the solver state, so it is read along a real trajectory
        prev, pred = _run(sched, x, sched.timesteps, xp, scales)
        put(case, "scales", np.array(scales))
        if with_trajectory:
            put(case, "prev", prev)
            put(case, "pred", pred)
            if steps >= 2:  # training-style add_noise: each sample at its own timestep, no begin index
                sched.set_timesteps(steps)
                positions = [0, len(sched.timesteps) // 2, len(sched.timesteps) - 1]
                noisy = sched.add_noise(
                    torch.tensor(ORIGINAL), torch.tensor(ORIGINAL_NOISE), sched.timesteps[positions]
                )
                case["add_noise_positions"] = positions
                put(case, "add_noise", noisy.numpy())
            if steps >= 7:  # img2img: start at an even substep, noised with add_noise after set_begin_index
                sched.set_timesteps(steps)
                begin = 2 * (steps // 3)
                sched.set_begin_index(begin)
                start = sched.add_noise(
                    torch.tensor(NOISE * 0.3), torch.tensor(NOISE[::-1].copy()), sched.timesteps[begin : begin + 1]
                )
                prev, _ = _run(sched, start, sched.timesteps[begin:], xp)
                case["begin_index"] = begin
                put(case, "img2img_start", start.numpy())
                put(case, "img2img", prev[-1])
            if steps == 7 and key.split("/")[1] == "linspace":
                with tempfile.TemporaryDirectory() as tmp:
                    sched.save_config(tmp)
                    case["diffusers_config_json"] = (Path(tmp) / "scheduler_config.json").read_text()
        cases.append(case)

    arrays = {name: np.concatenate(chunks) for name, chunks in flat.items()}
    arrays["trained_betas"] = trained_betas()
    arrays["cases_json"] = np.array(json.dumps(cases, separators=(",", ":")))
    arrays["diffusers_version"] = np.array(diffusers.__version__)
    return arrays


def main(argv=None) -> int:
    target = Path(__file__).with_name("data") / DATA_FILE
    target.parent.mkdir(exist_ok=True)
    arrays = generate()
    np.savez_compressed(target, **arrays)
    print(
        f"wrote {target} ({target.stat().st_size / 1024:.0f} KiB, {len(json.loads(str(arrays['cases_json'])))} cases)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
