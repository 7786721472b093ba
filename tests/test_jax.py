"""JAX: the whole sampling loop under one jax.jit, vmap over seeds, and sharded arrays that stay sharded."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy

import kdpm2core  # noqa: E402
from kdpm2core import functional as F  # noqa: E402

from conftest import initial_noise, relative_error  # noqa: E402


def _eager_stateful(x0, model, **options):
    scheduler = kdpm2core.KDPM2DiscreteScheduler(backend="jax", **options)
    scheduler.set_timesteps(6)
    x = x0
    for t in scheduler.timesteps:
        x = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x, return_dict=False)[0]
    return x


def test_whole_loop_traces_once_under_jit():
    traces = []

    def model(scaled, timestep):
        traces.append(1)  # runs only while tracing
        return jnp.tanh(0.7 * scaled) + 0.2 * scaled * jnp.sin(timestep / 200.0)

    plan = F.make_plan(num_inference_steps=6, backend="jax", use_karras_sigmas=True)
    run = jax.jit(lambda p, x: F.sample(p, model, x))  # the plan is an argument: its host facts are static
    x0 = jnp.asarray(initial_noise((2, 4, 8, 8)) * F.init_noise_sigma(plan))
    first = run(plan, x0)
    second = run(plan, x0 * 0.5)
    assert len(traces) == 1, "the loop body was traced once per step, not once"
    assert run._cache_size() == 1
    reference = _eager_stateful(x0, model, use_karras_sigmas=True)
    assert relative_error(np.asarray(first), np.asarray(reference)) < 1e-6
    assert not np.allclose(np.asarray(first), np.asarray(second))


def test_vmap_over_seeds_equals_one_run_per_seed():
    plan = F.make_plan(num_inference_steps=4, backend="jax", s_churn=1.5)

    def model(scaled, timestep):
        return 0.5 * jnp.sin(scaled)

    def one(seed):
        key = jax.random.key(seed)
        noise = jax.random.normal(jax.random.fold_in(key, 1), (3, 5)) * F.init_noise_sigma(plan)
        return F.sample(plan, model, noise, rng=key)

    seeds = jnp.arange(4)
    batched = jax.jit(jax.vmap(one))(seeds)
    singles = jax.jit(one)
    for i, seed in enumerate(seeds):
        np.testing.assert_allclose(np.asarray(batched[i]), np.asarray(singles(seed)), rtol=1e-5, atol=1e-6)
    assert len({np.asarray(b).tobytes() for b in batched}) == 4  # every seed its own noise


SHARDING_SCRIPT = textwrap.dedent(
    """
    import json, re
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from kdpm2core import functional as F

    assert len(jax.devices()) == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("batch", "channel"))
    sharding = NamedSharding(mesh, P("batch", "channel"))
    plan = F.make_plan(num_inference_steps=5, backend="jax")
    x = jax.device_put(jnp.asarray(np.random.default_rng(0).standard_normal((8, 4, 16, 16)), jnp.float32), sharding)
    output = jax.device_put(jnp.tanh(x), sharding)

    def model(scaled, timestep):
        return jnp.tanh(scaled) * jnp.cos(timestep / 300.0)

    step = jax.jit(lambda state, mo, x: F.step(plan, state, mo, x))
    loop = jax.jit(lambda x: F.sample(plan, model, x))
    state = F.init(plan, x)
    (prev, pred), new_state = step(state, output, x)
    final = loop(x)
    collective = re.compile(r"all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter")
    report = {
        "prev": prev.sharding == x.sharding,
        "pred": pred.sharding == x.sharding,
        "stored": new_state.stored.sharding == x.sharding,
        "final": final.sharding == x.sharding,
        "step_collectives": collective.findall(step.lower(state, output, x).compile().as_text()),
        "loop_collectives": collective.findall(loop.lower(x).compile().as_text()),
        "finite": bool(jnp.all(jnp.isfinite(final))),
    }
    print("REPORT" + json.dumps(report))
    """
)


def test_sharded_steps_keep_their_sharding_and_never_gather():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    # the flag must be set before jax initialises, hence a fresh interpreter
    done = subprocess.run([sys.executable, "-c", SHARDING_SCRIPT], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    report = json.loads(done.stdout.split("REPORT", 1)[1])
    assert report == {
        "prev": True,
        "pred": True,
        "stored": True,
        "final": True,
        "step_collectives": [],
        "loop_collectives": [],
        "finite": True,
    }
