"""CUDA: sync-free loops (stateful and functional) and the functional step captured in a CUDA graph.

Skipped, with the reason, where torch has no CUDA device; ``benchmarks/gpu_check.sh`` runs it on a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device: torch.cuda.is_available() is False on this machine"
)

import kdpm2core  # noqa: E402
from kdpm2core import functional as F  # noqa: E402
from kdpm2core import noise  # noqa: E402

from conftest import initial_noise, relative_error  # noqa: E402

DEVICE = "cuda"


def _model(scaled, timestep):
    return torch.tanh(0.7 * scaled) + 0.2 * scaled * torch.sin(timestep / 200.0)


def _noise(shape, sigma):
    return torch.from_numpy(initial_noise(shape) * sigma).to(DEVICE)


def test_stateful_loop_never_synchronizes():
    scheduler = kdpm2core.KDPM2DiscreteScheduler(backend="torch", use_karras_sigmas=True)
    scheduler.set_timesteps(25, device=DEVICE)
    scheduler.set_begin_index(0)
    x = _noise((2, 4, 32, 32), scheduler.init_noise_sigma)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in scheduler.timesteps:
            x = scheduler.step(_model(scheduler.scale_model_input(x, t), t), t, x, return_dict=False)[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(x).all()


def test_functional_loop_never_synchronizes_and_matches_the_scheduler():
    scheduler = kdpm2core.KDPM2DiscreteScheduler(backend="torch", prediction_type="v_prediction")
    scheduler.set_timesteps(10, device=DEVICE)
    plan = F.make_plan(scheduler)
    churned_plan = F.make_plan(scheduler, s_churn=1.0)  # built (host to device copies) before the check
    x0 = _noise((2, 4, 32, 32), scheduler.init_noise_sigma)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ours = F.sample(plan, _model, x0)
        churned = F.sample(churned_plan, _model, x0, seed=0)  # portable noise computed on the device: no copies
    finally:
        torch.cuda.set_sync_debug_mode("default")
    x = x0
    for t in scheduler.timesteps:
        x = scheduler.step(_model(scheduler.scale_model_input(x, t), t), t, x, return_dict=False)[0]
    # the same kernels in the same order; only the coefficients' types differ (0-d tensors vs Python floats)
    assert relative_error(ours.cpu().numpy(), x.cpu().numpy()) < 1e-6
    assert torch.isfinite(churned).all() and not torch.equal(churned, ours)


PLANS = {
    "dpm2": {"use_karras_sigmas": True},
    "dpm2-a": {"use_karras_sigmas": True, "eta": 1.0},  # the step noise drawn inside the graph
    "flow": {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 3.0},
}


@pytest.mark.parametrize("kind", list(PLANS))
def test_functional_step_replays_as_a_cuda_graph(kind):
    plan = F.make_plan(num_inference_steps=8, backend="torch", device=DEVICE, **PLANS[kind])
    x0 = _noise((1, 4, 64, 64), F.init_noise_sigma(plan))
    # static buffers: the graph reads the state, input and model output from them and writes its outputs
    state = F.init(plan, x0)
    index, stored = state.index.clone(), state.stored.clone()
    sample, output = x0.clone(), torch.zeros_like(x0)
    prev, pred = torch.empty_like(x0), torch.empty_like(x0)

    def step_noise(at):
        # the portable noise of seed 7 at the substep held on the device: no host value is read
        if not plan.info.ancestral:
            return None
        return noise.normal(plan.info.backend.xp, 7, tuple(x0.shape), substep=at, dtype=x0.dtype, device=x0.device)

    def captured():
        _, new = F.step(plan, F.State(index, stored), output, sample, out=(prev, pred), noise=step_noise(index))
        stored.copy_(sample)
        index.copy_(new.index)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph, as torch.cuda.graphs requires
        warm = F.State(index.clone(), stored.clone())
        F.step(plan, warm, output, sample, out=(torch.empty_like(x0), torch.empty_like(x0)), noise=step_noise(index))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured()

    reference, x = F.init(plan, x0), x0
    for _ in range(F.num_substeps(plan)):
        scaled, timestep = F.model_inputs(plan, F.State(index, stored), sample)
        output.copy_(_model(scaled, timestep))
        graph.replay()
        (x, _), reference = F.step(plan, reference, output, x, noise=step_noise(reference.index))
        assert torch.equal(prev, x), f"{kind}, substep {int(index) - 1}: the replayed graph differs from eager"
        sample.copy_(prev)
    assert int(index) == F.num_substeps(plan)
    assert np.all(np.isfinite(x.cpu().numpy()))


def test_ancestral_loops_never_synchronize_and_match_the_cpu():
    """DPM2 a on CUDA: the stateful loop without a generator and the functional loop with seed= draw the portable
    noise on the device (no host sync), and give the CPU's result: the noise agrees within 1.2e-6 relative per
    value (docs/noise.md), the rest is the deterministic loop's float32 rounding (1e-5 relative for both)."""

    def stateful(device):
        scheduler = kdpm2core.KDPM2AncestralDiscreteScheduler(backend="torch", noise_seed=3)
        scheduler.set_timesteps(10, device=device)
        scheduler.set_begin_index(0)
        x = _noise((2, 4, 32, 32), scheduler.init_noise_sigma).to(device)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if device == DEVICE else "default")
        try:
            for t in scheduler.timesteps:
                x = scheduler.step(_model(scheduler.scale_model_input(x, t), t), t, x, return_dict=False)[0]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return x.cpu()

    def functional(device):
        plan = F.make_plan(num_inference_steps=10, backend="torch", device=device, eta=1.0)
        x0 = _noise((2, 4, 32, 32), F.init_noise_sigma(plan)).to(device)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if device == DEVICE else "default")
        try:
            x = F.sample(plan, _model, x0, seed=3)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return x.cpu()

    for run in (stateful, functional):
        assert relative_error(run(DEVICE).numpy(), run("cpu").numpy()) < 1e-5, run.__name__
