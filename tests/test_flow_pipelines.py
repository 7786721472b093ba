"""Our scheduler dropped into tiny Stable Diffusion 3 and Flux pipelines (torch CPU, offline).

Each pipeline runs with ``KDPM2DiscreteScheduler.from_config(pipe.scheduler.config)``; a forward hook records
every transformer call. Two checks:

* replay: each model input the pipeline makes is the float64 DPM2 update (written here from the step values
  of ``s``: Euler to the geometric-mean midpoint, then the midpoint step) of the previous input and model
  output, to float32 rounding. The float32 update ``x + c * v`` rounds ``c`` to float32, the product and the
  sum once each: at most ``2 u |c v| + u |x + c v| <= 3 u (|x| + |c v|)``, asserted with ``4 u``;
* end to end: the output equals a float64 DPM2 run of the same transformer (in float64) from the same
  latents on the same ``s`` values, to the float32 rounding of the run. What separates the two is the float32
  rounding of the transformer (a one-layer network: some hundred float32 operations per output, each ``u``
  relative) and of the updates (bounded by the replay check), summed over the substeps, whose step lengths
  add up to 1, and carried by a flow with a Lipschitz constant of order 1: well inside ``2**-16`` (256 ``u``)
  of the latents' largest magnitude (the runs print the figure, about 1e-7 here).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import tiny_flow_pipelines as tiny  # noqa: E402

from kdpm2core import KDPM2DiscreteScheduler  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
U = 2.0**-24
PIPELINES = {"sd3": tiny.sd3_pipeline, "flux": tiny.flux_pipeline}
# what a pipeline divides the scheduler's timestep by for its transformer (Flux's takes t / 1000)
TIMESTEP_DIVISOR = {"sd3": 1, "flux": 1000}


def record_calls(transformer):
    calls = []

    def hook(module, args, kwargs, output):
        calls.append({**kwargs, "output": output[0]})

    return calls, transformer.register_forward_hook(hook, with_kwargs=True)


def dpm2_substeps(step_values):
    """``(s, s_next, midpoint)`` per substep of DPM2 on the step values of ``s`` (final 0 included)."""
    rows = []
    for s, s_next in zip(step_values[:-1], step_values[1:]):
        if s_next > 0:
            mid = np.sqrt(s * s_next)
            rows += [(s, mid, False), (s, s_next, True)]
        else:
            rows.append((s, 0.0, False))
    return rows


def float64_dpm2(transformer, first_call, latents, rows, divisor):
    """DPM2 in float64 with the transformer in float64, called as the pipeline called it."""
    model = transformer.to(torch.float64)
    fixed = {
        key: value.to(torch.float64) if torch.is_tensor(value) and value.is_floating_point() else value
        for key, value in first_call.items()
        if key not in ("hidden_states", "timestep", "output")
    }
    x = latents.to(torch.float64)
    stored = x
    with torch.no_grad():
        for s, target, midpoint in rows:
            s_model = np.sqrt(s * target) if midpoint else s  # the midpoint substep evaluates at sqrt(s s_next)
            t = torch.full((x.shape[0],), s_model * 1000 / divisor, dtype=torch.float64)
            v = model(hidden_states=x, timestep=t, **fixed)[0]
            if midpoint:
                x = stored + (target - s) * v
            else:
                stored = x
                x = x + (target - s) * v
    return x


@pytest.mark.parametrize("name", PIPELINES)
@pytest.mark.parametrize("request_kind", ["steps", "sigmas"])
def test_pipeline_runs_float64_dpm2_to_float32_rounding(name, request_kind):
    pipe = PIPELINES[name]()
    pipe.scheduler = KDPM2DiscreteScheduler.from_config(pipe.scheduler.config, backend="torch")
    inputs = tiny.prompt_inputs(pipe)
    steps = 5
    request = {"steps": steps} if request_kind == "steps" else {"sigmas": list(np.linspace(1.0, 0.15, steps))}
    if name == "flux" and request_kind == "steps":
        request["sigmas"] = None  # Flux makes its own linspace sigmas when none are given
    calls, handle = record_calls(pipe.transformer)
    out = tiny.run(pipe, **request, **inputs)
    handle.remove()

    host = pipe.scheduler.schedule
    step_values = np.append(host.sigma_in[host.table[:, 5] == 1], 0.0)
    rows = dpm2_substeps(step_values)
    assert len(calls) == len(rows) == len(pipe.scheduler.timesteps) == 2 * steps - 1
    # the model sees the sample as it is, at timestep s * 1000
    timesteps = np.asarray([float(call["timestep"][0]) for call in calls])
    expected_t = pipe.scheduler.timesteps.numpy() / np.float32(TIMESTEP_DIVISOR[name])  # one float32 rounding, as torch
    np.testing.assert_array_equal(timesteps, expected_t)
    torch.testing.assert_close(calls[0]["hidden_states"], inputs["latents"], rtol=0, atol=0)

    # replay: every next input is the float64 DPM2 update of the recorded input and output
    stored = None
    for k, (s, target, midpoint) in enumerate(rows):
        x = calls[k]["hidden_states"].double()
        v = calls[k]["output"].double()
        start = stored if midpoint else x
        stored = None if midpoint else x
        exact = start + (target - s) * v
        got = (calls[k + 1]["hidden_states"] if k + 1 < len(rows) else out).double()
        bound = 4 * U * (start.abs() + ((target - s) * v).abs())
        assert torch.all((got - exact).abs() <= bound), f"substep {k}: {(got - exact).abs().max()}"

    # end to end against a float64 run of the same transformer on the same s values
    reference = float64_dpm2(pipe.transformer, calls[0], inputs["latents"], rows, TIMESTEP_DIVISOR[name])
    difference = (out.double() - reference).abs().max().item()
    print(f"{name} {request_kind}: max |float32 pipeline - float64 DPM2| = {difference:.3g}")
    assert difference <= 2.0**-16 * reference.abs().max().item()
