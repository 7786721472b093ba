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


def test_flow_plan_under_jit_and_vmap_equals_the_eager_scheduler():
    def model(x, timestep):  # a velocity; the flow model's input is the sample itself
        return jnp.tanh(0.7 * x) - 0.3 * x * (timestep / 1000.0)

    options = {"prediction_type": "flow_prediction", "use_dynamic_shifting": True}
    plan = F.make_plan(num_inference_steps=6, backend="jax", mu=0.9, **options)
    x0 = jnp.asarray(initial_noise((3, 4, 8, 8)))
    batched = jax.jit(jax.vmap(lambda x: F.sample(plan, model, x)))(x0)
    scheduler = kdpm2core.KDPM2DiscreteScheduler(backend="jax", **options)
    scheduler.set_timesteps(6, mu=0.9)
    x = x0
    for t in scheduler.timesteps:
        x = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x, return_dict=False)[0]
    assert relative_error(np.asarray(batched), np.asarray(x)) < 1e-6  # XLA may fuse a multiply-add


def test_plans_made_alike_share_one_compiled_loop():
    """PlanInfo is static under jit, so it compares by value: a server that makes a plan per request compiles
    once per distinct schedule, not once per plan."""
    traces = []

    def model(scaled, timestep):
        traces.append(1)
        return 0.3 * scaled

    def plan(steps):
        return F.make_plan(num_inference_steps=steps, backend="jax", use_karras_sigmas=True)

    run = jax.jit(lambda p, x: F.sample(p, model, x))
    x0 = jnp.ones((2, 3))
    results = [run(plan(6), x0) for _ in range(3)]
    assert len(traces) == 1 and plan(6).info == plan(6).info and hash(plan(6).info) == hash(plan(6).info)
    assert all(np.array_equal(np.asarray(r), np.asarray(results[0])) for r in results)
    for other in (
        plan(7),
        F.make_plan(num_inference_steps=6, backend="jax"),
        F.make_plan(num_inference_steps=6, backend="jax", use_karras_sigmas=True, s_churn=1.0),
    ):
        assert other.info != plan(6).info
    run(plan(7), x0)
    assert len(traces) == 2  # another schedule: another table shape, another compilation


@pytest.mark.parametrize("begin_index", [None, 0])
@pytest.mark.parametrize("transform", ["jit", "vmap"])
def test_stateful_scheduler_under_a_trace_refuses_and_points_to_functional(begin_index, transform):
    """Under a trace the step index would be read once and frozen: the traced function would replay the first
    substep's coefficients on every call. The scheduler refuses instead, before changing any state."""
    scheduler = kdpm2core.KDPM2DiscreteScheduler(backend="jax")
    scheduler.set_timesteps(5)
    if begin_index is not None:
        scheduler.set_begin_index(begin_index)
    x = jnp.ones((2, 3))
    t = scheduler.timesteps[0]
    traced = jax.jit if transform == "jit" else jax.vmap
    for call in (lambda x: scheduler.step(x, t, x).prev_sample, lambda x: scheduler.scale_model_input(x, t)):
        with pytest.raises(RuntimeError, match="cannot run inside jax.jit.*kdpm2core.functional"):
            traced(call)(x)
    assert scheduler.step_index is None and scheduler._stored is None
    eager = scheduler.step(x, t, x).prev_sample  # outside a trace it works as before
    assert scheduler.step_index == 1 and eager.shape == x.shape


def test_churn_must_be_a_host_number():
    plan = F.make_plan(num_inference_steps=3, backend="jax")
    with pytest.raises(TypeError, match="s_churn must be a real Python number.*cannot be an array or a traced value"):
        jax.jit(lambda c: F.sample(plan, lambda a, t: a, jnp.ones(2), s_churn=c, seed=0))(1.0)


def test_grad_through_the_whole_loop():
    """With a linear model the loop is x -> m * x for one number m (every coefficient is a number), so the
    gradient of sum(sample(x)) is m everywhere; m comes from a float64 NumPy run of the stateful scheduler."""
    plan = F.make_plan(num_inference_steps=5, backend="jax")
    grad = jax.grad(lambda x: F.sample(plan, lambda a, t: 0.3 * a, x).sum())(jnp.ones((2, 3)))
    scheduler = kdpm2core.KDPM2DiscreteScheduler()
    scheduler.set_timesteps(5)
    m = np.ones(1)
    for t in scheduler.timesteps:
        m = scheduler.step(0.3 * scheduler.scale_model_input(m, t), t, m).prev_sample
    np.testing.assert_allclose(np.asarray(grad), np.full((2, 3), m[0]), rtol=2e-6)


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


def test_ancestral_loop_traces_once_under_jit():
    """DPM2 a under one jax.jit: the noise callable gets the traced substep index; the result equals the same
    loop on NumPy given the same noise (float32 both sides; 1e-5 relative: each substep rounds a handful of
    times per side, over 11 substeps, and XLA may fuse a multiply-add)."""
    traces = []

    def model(scaled, timestep):
        traces.append(1)
        return jnp.tanh(0.7 * scaled) + 0.2 * scaled * jnp.sin(timestep / 200.0)

    plan = F.make_plan(num_inference_steps=6, backend="jax", eta=1.0)
    noises = np.random.default_rng(3).standard_normal((F.num_substeps(plan), 2, 4, 8, 8)).astype(np.float32)
    on_device = jnp.asarray(noises)
    run = jax.jit(lambda p, x: F.sample(p, model, x, noise=lambda index: on_device[index]))
    x0 = initial_noise((2, 4, 8, 8)) * F.init_noise_sigma(plan)
    got = np.asarray(run(plan, jnp.asarray(x0)))
    run(plan, jnp.asarray(x0) * 0.5)
    assert len(traces) == 1
    host = F.make_plan(num_inference_steps=6, backend="numpy", eta=1.0)
    expected = F.sample(
        host,
        lambda scaled, t: np.tanh(0.7 * scaled) + 0.2 * scaled * np.sin(t / 200.0),
        x0.astype(np.float32),
        noise=lambda index: noises[int(index)],
    )
    assert relative_error(got, expected) < 1e-5
    deterministic = F.sample(
        F.make_plan(num_inference_steps=6, backend="numpy"),
        lambda s, t: np.tanh(0.7 * s) + 0.2 * s * np.sin(t / 200.0),
        x0.astype(np.float32),
    )
    assert relative_error(got, deterministic) > 1e-2  # the noise is there


def test_ancestral_with_a_key_under_jit():
    """seed= draws the noise from JAX keys carried through lax.fori_loop: the same seed gives the same result."""
    plan = F.make_plan(num_inference_steps=4, backend="jax", eta=1.0)
    run = jax.jit(lambda p, x, key: F.sample(p, lambda s, t: 0.3 * s, x, rng=key))
    x0 = jnp.asarray(initial_noise((1, 4, 8, 8)) * F.init_noise_sigma(plan))
    a, b = run(plan, x0, jax.random.key(0)), run(plan, x0, jax.random.key(0))
    c = run(plan, x0, jax.random.key(1))
    assert np.array_equal(np.asarray(a), np.asarray(b)) and not np.allclose(np.asarray(a), np.asarray(c))


def test_ancestral_vmap_over_seeds_equals_one_run_per_seed():
    """seed= may be a traced 0-d array (the portable noise takes one): vmap over seeds gives each seed's run."""
    plan = F.make_plan(num_inference_steps=4, backend="jax", eta=1.0)
    x0 = jnp.asarray(initial_noise((2, 8)) * F.init_noise_sigma(plan), dtype=jnp.float32)

    def one(seed):
        return F.sample(plan, lambda s, t: 0.5 * jnp.sin(s), x0, seed=seed)

    seeds = jnp.arange(3, dtype=jnp.int32)
    batched = jax.jit(jax.vmap(one))(seeds)
    for i in range(3):
        np.testing.assert_allclose(np.asarray(batched[i]), np.asarray(jax.jit(one)(seeds[i])), rtol=1e-5, atol=1e-6)
    assert len({np.asarray(b).tobytes() for b in batched}) == 3
