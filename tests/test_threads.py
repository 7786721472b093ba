"""Concurrency: independent scheduler instances, and the functional API with one shared plan, used from 8
threads at once give exactly the results of sequential runs; the plugin registry loads safely when 8 threads
ask for backends at the same moment in a fresh process.

(One stateful instance must NOT be shared between concurrent loops: its step index and stored sample are
per-loop state. docs/robustness.md says so.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from kdpm2core import KDPM2DiscreteScheduler

THREADS = 8
CONFIGS = [  # one per thread: different options so that a mix-up between threads would show
    {},
    {"prediction_type": "v_prediction"},
    {"use_karras_sigmas": True},
    {"timestep_spacing": "trailing"},
    {"beta_schedule": "scaled_linear"},
    {"prediction_type": "sample", "use_exponential_sigmas": True},
    {"timestep_spacing": "leading", "steps_offset": 1},
    {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"},
]


def in_threads(job, count=THREADS):
    """Run ``job(i)`` for i in range(count) on ``count`` threads released at once; returns the results."""
    barrier = threading.Barrier(count)
    results, errors = [None] * count, []

    def work(i):
        try:
            barrier.wait()
            results[i] = job(i)
        except BaseException as exc:  # reported below with the thread's index
            errors.append((i, exc))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return results


def stateful_job(backend_name: str):
    def job(i):
        s = KDPM2DiscreteScheduler(**CONFIGS[i], backend=backend_name)
        s.set_timesteps(6 + i)
        b = s.backend
        x = b.asarray(
            np.random.default_rng(i).standard_normal((2, 32, 32)) * s.init_noise_sigma, dtype=b.dtype("float32")
        )
        xp = b.xp
        for t in s.timesteps:
            x = s.step(xp.tanh(s.scale_model_input(x, t)) * 0.7, t, x).prev_sample
        return b.to_numpy(x).tobytes()

    return job


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
def test_independent_instances_in_threads_match_sequential(backend_name):
    pytest.importorskip(backend_name)
    job = stateful_job(backend_name)
    sequential = [job(i) for i in range(THREADS)]
    assert len(set(sequential)) == THREADS  # every thread computes something different
    for _ in range(2):  # more than one round: interleavings differ from run to run
        assert in_threads(job) == sequential


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
def test_functional_api_with_a_shared_plan_in_threads_matches_sequential(backend_name):
    pytest.importorskip(backend_name)
    functional = pytest.importorskip("kdpm2core.functional")
    plan = functional.make_plan(num_inference_steps=8, backend=backend_name, prediction_type="v_prediction")
    b = plan.info.backend
    xp = b.xp

    def job(i):
        noise = np.random.default_rng(100 + i).standard_normal((2, 32, 32)) * functional.init_noise_sigma(plan)
        start = b.asarray(noise, dtype=b.dtype("float32"))
        scale = 0.5 + 0.05 * i  # each thread its own model
        x, state = start, functional.init(plan, start)
        for _ in range(functional.num_substeps(plan)):  # driven by hand
            scaled, _t = functional.model_inputs(plan, state, x)
            (x, _), state = functional.step(plan, state, xp.tanh(scaled) * scale, x)
        whole = functional.sample(plan, lambda scaled, t: xp.tanh(scaled) * scale, start)  # the library's loop
        return b.to_numpy(x).tobytes(), b.to_numpy(whole).tobytes()

    sequential = [job(i) for i in range(THREADS)]
    assert all(step_by_step == whole for step_by_step, whole in sequential)
    for _ in range(2):
        assert in_threads(job) == sequential


def test_large_torch_loops_in_threads_match_sequential():
    """Large CPU latents, where torch runs each kernel on several threads of its own: 4 scheduler threads at
    once give the bytes of sequential runs, and no result a thread still holds is changed by a later step."""
    torch = pytest.importorskip("torch")

    def job(i):
        s = KDPM2DiscreteScheduler(**CONFIGS[i], backend="torch")
        s.set_timesteps(3)
        noise = np.random.default_rng(i).standard_normal((4, 4, 128, 128)) * s.init_noise_sigma  # 1 MiB float32
        x = torch.from_numpy(noise.astype(np.float32))
        kept = []
        for t in s.timesteps:
            out = s.step(torch.tanh(s.scale_model_input(x, t)) * 0.7, t, x)
            kept.append((out.pred_original_sample, out.pred_original_sample.clone()))  # held across later steps
            x = out.prev_sample
        assert all(torch.equal(alive, copy) for alive, copy in kept)
        return x.numpy().tobytes()

    sequential = [job(i) for i in range(4)]
    assert len(set(sequential)) == 4
    for _ in range(2):
        assert in_threads(job, count=4) == sequential


def test_registry_loads_once_when_eight_threads_race_in_a_fresh_process():
    script = r"""
import json, threading
import kdpm2core
from kdpm2core import plugins
loads = []
original = plugins._load
def counting_load():
    loads.append(threading.get_ident())
    return original()
plugins._load = counting_load
barrier = threading.Barrier(8)
out = [None] * 8
def work(i):
    barrier.wait()
    name = ("numpy", "torch")[i % 2]
    s = kdpm2core.KDPM2DiscreteScheduler(backend=name)  # the first lookup loads the registry
    out[i] = [name, id(kdpm2core.get_backend(name)), id(s.backend), kdpm2core.available_backends()]
threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({"loads": len(loads), "out": out}))
"""
    environ = {k: v for k, v in os.environ.items() if k not in ("KDPM2_LOAD_PLUGINS", "KDPM2_BACKEND")}
    done = subprocess.run([sys.executable, "-c", script], env=environ, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["loads"] == 1  # the entry points were read once, not once per thread
    rows = result["out"]
    assert all(row is not None for row in rows)
    for name in ("numpy", "torch"):
        ids = {row[1] for row in rows if row[0] == name} | {row[2] for row in rows if row[0] == name}
        assert len(ids) == 1, f"{name}: {len(ids)} backend objects were built"
    assert all(row[3] == rows[0][3] and {"numpy", "torch"} <= set(row[3]) for row in rows)
