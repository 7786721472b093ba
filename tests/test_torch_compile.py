"""torch.compile(fullgraph=True): the stateful scheduler in at most 4 graphs over a whole loop, the functional
step in one, both with the eager numbers.

Graphs are counted with a custom compiler backend that records each graph and runs it as traced (like
``backend="eager"``): the number of graphs is decided by Dynamo, before any compiler backend runs, and
Inductor would spend minutes of the CI budget on 2 cores compiling C++ for the same count.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import kdpm2core  # noqa: E402
from kdpm2core import functional as F  # noqa: E402

from conftest import initial_noise  # noqa: E402


class GraphCounter:
    """A torch.compile backend that counts the graphs Dynamo hands it and runs them unchanged."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return graph_module.forward


def _model(scaled, timestep):
    return torch.tanh(0.7 * scaled) + 0.2 * scaled * torch.sin(timestep / 200.0)


def _loop(compiler, *, closure=False, begin_index=True, fullgraph=True, prediction_type="epsilon"):
    """A 25-step loop of the stateful scheduler; its body is compiled with ``compiler`` (None: eager) and takes
    the scheduler as an argument, or captures it from the enclosing scope (``closure``), as users often write it.
    Returns ``(scaled, prev, pred)`` of every substep."""
    scheduler = kdpm2core.KDPM2DiscreteScheduler(backend="torch", prediction_type=prediction_type)
    scheduler.set_timesteps(25)
    if begin_index:
        scheduler.set_begin_index(0)  # as pipelines do; the timestep look-up reads the host otherwise

    def substep(scheduler, x, t):
        scaled = scheduler.scale_model_input(x, t)
        return scaled, scheduler.step(_model(scaled, t), t, x, return_dict=False)

    def body(x, t):
        return substep(scheduler, x, t)

    body, arguments = (body, ()) if closure else (substep, (scheduler,))
    if compiler is not None:
        torch._dynamo.reset()
        body = torch.compile(body, backend=compiler, fullgraph=fullgraph)
    x = torch.from_numpy(initial_noise((1, 4, 8, 8)) * scheduler.init_noise_sigma)
    history = []
    for t in scheduler.timesteps:
        scaled, (x, pred) = body(*arguments, x, t)
        history.append((scaled, x, pred))
    assert scheduler.step_index == len(scheduler.timesteps) == 49
    return history


def _assert_same_substeps(compiled, eager):
    for k, (ours, reference) in enumerate(zip(compiled, eager)):
        assert all(torch.equal(a, b) for a, b in zip(ours, reference)), f"substep {k} differs from eager"


@pytest.mark.parametrize("closure", [False, True])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "flow_prediction"])
def test_stateful_loop_compiles_into_at_most_four_graphs(prediction_type, closure):
    counter = GraphCounter()
    compiled = _loop(counter, closure=closure, prediction_type=prediction_type)
    assert 1 <= counter.graphs <= 4, f"{counter.graphs} graphs for one 25-step loop: a recompilation per substep"
    _assert_same_substeps(compiled, _loop(None, prediction_type=prediction_type))


@pytest.mark.parametrize(
    "options",
    [
        {"prediction_type": "v_prediction", "use_karras_sigmas": True},
        {"prediction_type": "flow_prediction", "use_dynamic_shifting": True, "mu": 0.8},
    ],
    ids=["v-karras", "flow-dynamic-shift"],
)
def test_functional_step_compiles_into_one_graph(options):
    plan = F.make_plan(num_inference_steps=10, backend="torch", **options)
    counter = GraphCounter()
    torch._dynamo.reset()

    def substep(state, x):
        scaled, timestep = F.model_inputs(plan, state, x)
        return F.step(plan, state, _model(scaled, timestep), x)

    compiled = torch.compile(substep, backend=counter, fullgraph=True)
    x0 = torch.from_numpy(initial_noise((2, 4, 8, 8)) * F.init_noise_sigma(plan))
    x, state = x0, F.init(plan, x0)
    y, reference = x0, F.init(plan, x0)
    for _ in range(F.num_substeps(plan)):
        (x, _), state = compiled(state, x)
        (y, _), reference = substep(reference, y)
        assert torch.equal(x, y)
    assert counter.graphs == 1
    assert int(state.index) == F.num_substeps(plan) == 19
    assert np.all(np.isfinite(x.numpy()))


def test_dynamic_shapes_compile_for_both_apis():
    """``dynamic=True`` (and Dynamo's own switch to dynamic shapes when a second latent size arrives) traces the
    backend's size checks on symbolic sizes: they must stay expressible there (``numel() * element_size()``,
    not ``nbytes``), with the eager numbers for every latent size."""
    plan = F.make_plan(num_inference_steps=4, backend="torch")

    def stateful(scheduler, x, t):
        scaled = scheduler.scale_model_input(x, t)
        return scaled, scheduler.step(_model(scaled, t), t, x, return_dict=False)

    def functional(state, x):
        scaled, timestep = F.model_inputs(plan, state, x)
        return F.step(plan, state, _model(scaled, timestep), x)

    torch._dynamo.reset()
    compiled_stateful = torch.compile(stateful, backend=GraphCounter(), fullgraph=True, dynamic=True)
    compiled_functional = torch.compile(functional, backend=GraphCounter(), fullgraph=True, dynamic=True)
    for shape in [(1, 4, 8, 8), (2, 4, 16, 16), (1, 4, 24, 24)]:
        x0 = torch.from_numpy(initial_noise(shape) * 14.6)
        runs = []
        for substep in (compiled_stateful, stateful):
            scheduler = kdpm2core.KDPM2DiscreteScheduler(backend="torch")
            scheduler.set_timesteps(4)
            scheduler.set_begin_index(0)
            x, outputs = x0, []
            for t in scheduler.timesteps:
                scaled, (x, pred) = substep(scheduler, x, t)
                outputs += [scaled, x, pred]
            runs.append(outputs)
        assert all(torch.equal(a, b) for a, b in zip(*runs)), shape
        x, state = x0, F.init(plan, x0)
        y, reference = x0, F.init(plan, x0)
        for _ in range(F.num_substeps(plan)):
            (x, _), state = compiled_functional(state, x)
            (y, _), reference = functional(reference, y)
            assert torch.equal(x, y), shape


def test_closure_without_begin_index_asks_for_it():
    """The first substep must find the timestep in the schedule, which a traced timestep allows only with a host
    sync: kdpm2 stops with its own one-line message. Under fullgraph=True Dynamo reports an exception raised while
    tracing as an "Observed exception" whose context is that message; without fullgraph the message itself
    reaches the caller, unless Dynamo runs the look-up eagerly at a graph break: then the eager numbers."""
    with pytest.raises(Exception) as raised:
        _loop(GraphCounter(), closure=True, begin_index=False)
    assert "call scheduler.set_begin_index(0)" in str(raised.value), str(raised.value)
    assert "'torch.compile the stateful loop' in docs/torch.md" in str(raised.value)
    assert "Could not guard on data-dependent expression" not in str(raised.value)
    try:
        compiled = _loop(GraphCounter(), closure=True, begin_index=False, fullgraph=False)
    except RuntimeError as exc:
        assert str(exc).startswith("under torch.compile the scheduler cannot find") and "\n" not in str(exc), str(exc)
    else:
        _assert_same_substeps(compiled, _loop(None, begin_index=False))


def test_functional_ancestral_step_compiles_into_one_graph():
    """DPM2 a: the step with its noise argument is one graph, with the eager numbers bit for bit."""
    plan = F.make_plan(num_inference_steps=10, backend="torch", eta=1.0, use_karras_sigmas=True)
    counter = GraphCounter()
    torch._dynamo.reset()

    def substep(state, x, noise):
        scaled, timestep = F.model_inputs(plan, state, x)
        return F.step(plan, state, _model(scaled, timestep), x, noise=noise)

    compiled = torch.compile(substep, backend=counter, fullgraph=True)
    x0 = torch.from_numpy(initial_noise((2, 4, 8, 8)) * F.init_noise_sigma(plan))
    x, state = x0, F.init(plan, x0)
    y, reference = x0, F.init(plan, x0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(F.num_substeps(plan)):
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        (x, _), state = compiled(state, x, noise)
        (y, _), reference = substep(reference, y, noise)
        assert torch.equal(x, y)
    assert counter.graphs == 1


@pytest.mark.parametrize("options", [{}, {"prediction_type": "flow_prediction", "shift": 3.0}], ids=["beta", "flow"])
def test_stateful_ancestral_loop_compiles_into_at_most_four_graphs(options):
    """DPM2 a's stateful loop without a generator (the portable noise of noise_seed and the substep, whose index
    the traced step reads from Python state): at most 4 graphs for 25 steps, and the eager numbers bit for bit.
    On a flow schedule the midpoint rows' ``a`` is ``alpha_ratio``, read from the device rows too."""

    def loop(compiler):
        scheduler = kdpm2core.KDPM2AncestralDiscreteScheduler(backend="torch", noise_seed=5, **options)
        scheduler.set_timesteps(25)
        scheduler.set_begin_index(0)

        def substep(scheduler, x, t):
            return scheduler.step(_model(scheduler.scale_model_input(x, t), t), t, x, return_dict=False)[0]

        if compiler is not None:
            torch._dynamo.reset()
            substep = torch.compile(substep, backend=compiler, fullgraph=True)
        x = torch.from_numpy(initial_noise((1, 4, 8, 8)) * scheduler.init_noise_sigma).float()
        history = []
        for t in scheduler.timesteps:
            x = substep(scheduler, x, t)
            history.append(x)
        return history

    counter = GraphCounter()
    compiled, eager = loop(counter), loop(None)
    assert 1 <= counter.graphs <= 4, f"{counter.graphs} graphs for one 25-step loop"
    assert all(torch.equal(a, b) for a, b in zip(compiled, eager))
