"""The torch backend: its multiply-add primitive keeps the stateful and functional paths bit-identical, results
never alias inputs, and mixed dtypes, sparse tensors and large latents behave as torch and diffusers do."""

from __future__ import annotations

import pytest

import kdpm2core
from kdpm2core.backend import update

torch = pytest.importorskip("torch")
from test_lincomb import ROWS

from conftest import diffusers_kdpm2, initial_noise, relative_error


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [7, 40_961])  # a vector tail; and more than one grain of torch's parallel loop
def test_float_and_tensor_coefficients_give_the_same_bits(dtype, n):
    """Python-float rows (the stateful scheduler) and 0-d tensor rows (the functional API, nothing dropped)
    give the same bits, into fresh arrays and into out= buffers: add(alpha=) and addcmul round alike on
    whatever CPU capability runs this (it must pass under ATEN_CPU_CAPABILITY=default and avx2). A float32
    result is within the combination's rounding of the float64 value; no result is an input."""
    backend = kdpm2core.get_backend("torch")
    stored, sample, model_output = (torch.from_numpy(initial_noise((n,), seed)).to(dtype) for seed in (1, 2, 3))
    originals = [x.clone() for x in (stored, sample, model_output)]
    inputs = {x.untyped_storage().data_ptr() for x in (stored, sample, model_output)}
    eps = torch.finfo(dtype).eps
    for row in ROWS:
        a, b, c, p, q = row
        floats = update(backend, a, b, c, p, q, stored, sample, model_output)
        tensors = update(backend, *(torch.tensor(v, dtype=dtype) for v in row), stored, sample, model_output)
        buffers = (torch.empty_like(sample), torch.empty_like(sample))
        into = update(backend, *(torch.tensor(v, dtype=dtype) for v in row), stored, sample, model_output, out=buffers)
        assert into[0] is buffers[0] and into[1] is buffers[1]
        for name, terms, results in (
            ("prev", ((a, stored), (b, sample), (c, model_output)), (floats[0], tensors[0], into[0])),
            ("pred", ((p, sample), (q, model_output)), (floats[1], tensors[1], into[1])),
        ):
            assert all(torch.equal(r, results[0]) for r in results[1:]), (row, name)
            assert results[0].dtype == dtype and results[0].untyped_storage().data_ptr() not in inputs, (row, name)
            if dtype == torch.float32:  # against float64, exact enough here (2**-53 against 2**-24)
                # the coefficients round to float32 (eps/2 of each term), each product and each sum rounds once
                # at most (eps/2 of the terms' magnitudes, or less when fused): (terms + 1) * eps/2 in all
                exact = sum(coef * x.double() for coef, x in terms)
                scale = sum(abs(coef) * x.double().abs() for coef, x in terms)
                bound = (len(terms) + 1) * eps / 2 * scale * 1.001  # 1.001: second-order products of roundings
                assert torch.all((results[0].double() - exact).abs() <= bound), (row, name)
    assert all(torch.equal(x, y) for x, y in zip((stored, sample, model_output), originals)), "an input changed"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_scale_model_input_multiplies_as_the_python_float(dtype):
    """A float32 sample is scaled by the backend's 0-d factors, others by the Python floats: either way the bits
    and dtype of ``sample * float(scale)``, for the whole schedule, and on a 0-d sample too."""
    scheduler = kdpm2core.KDPM2DiscreteScheduler(backend="torch", use_karras_sigmas=True)
    scheduler.set_timesteps(12)
    scales = 1 / (scheduler.schedule.sigma_in**2 + 1) ** 0.5
    for shape in [(2, 4, 8, 8), ()]:
        sample = torch.from_numpy(initial_noise(shape, 4)).to(dtype)
        for k, t in enumerate(scheduler.timesteps):
            scheduler._step_index = k
            scaled = scheduler.scale_model_input(sample, t)
            expected = sample * float(scales[k])
            assert scaled.dtype == dtype and torch.equal(scaled, expected), (shape, k)


def test_scales_made_under_inference_mode_serve_autograd():
    """A schedule set under ``torch.inference_mode`` (its factors included) still scales a sample that needs
    gradients: the gradient of the sum of the model input is the scale."""
    scheduler = kdpm2core.KDPM2DiscreteScheduler(backend="torch")
    with torch.inference_mode():
        scheduler.set_timesteps(5)
    sample = torch.ones(2, 3, requires_grad=True)
    scheduler.scale_model_input(sample, scheduler.timesteps[0]).sum().backward()
    scale = float(1 / (scheduler.schedule.sigma_in[0] ** 2 + 1) ** 0.5)
    assert torch.equal(sample.grad, torch.full((2, 3), scale, dtype=torch.float32))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_large_latent_loop_matches_diffusers(prediction_type):
    """A 25-step loop on a 1 MiB latent (torch splits each kernel over threads) against diffusers' scheduler on
    the same inputs (the same tolerance as tests/test_trajectory_parity.py)."""
    pytest.importorskip("diffusers")
    options = {"beta_schedule": "scaled_linear", "use_karras_sigmas": True, "prediction_type": prediction_type}
    ours, theirs = kdpm2core.KDPM2DiscreteScheduler(**options, backend="torch"), diffusers_kdpm2(**options)
    noise = torch.from_numpy(initial_noise((4, 4, 128, 128), 11))
    results = []
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(25)
        x = noise * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(x, t)
            x = scheduler.step(torch.tanh(0.7 * model_input) - 0.1 * model_input, t, x, return_dict=False)[0]
        results.append(x.numpy())
    assert relative_error(*results) <= 1e-4


def test_sparse_tensors():
    """Sparse COO latents (no data pointer, no in-place add of a dense tensor): the loop stays sparse and gives
    the dense loop's numbers."""
    sparse, dense = (kdpm2core.KDPM2DiscreteScheduler(backend="torch") for _ in range(2))
    for scheduler in (sparse, dense):
        scheduler.set_timesteps(3)
        scheduler.set_begin_index(0)
    x = torch.from_numpy(initial_noise((6, 6))) * torch.eye(6)
    y = x.to_sparse()
    for t in sparse.timesteps:
        model_output = torch.tanh(x) * torch.eye(6)
        scaled = sparse.scale_model_input(y, t)
        assert scaled.is_sparse and torch.equal(scaled.to_dense(), dense.scale_model_input(x, t))
        (y, pred_sparse), (x, pred) = (
            sparse.step(model_output.to_sparse(), t, y, return_dict=False),
            dense.step(model_output, t, x, return_dict=False),
        )
        assert y.is_sparse and torch.equal(y.to_dense(), x) and torch.equal(pred_sparse.to_dense(), pred)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
@pytest.mark.parametrize("dtypes", [(torch.float16, torch.float32), (torch.float32, torch.float64)])
def test_mixed_dtypes_give_the_promoted_dtype_as_diffusers(prediction_type, dtypes):
    """A float16 sample with a float32 model output: torch's operators, and diffusers, give float32."""
    sample_dtype, output_dtype = dtypes
    ours = kdpm2core.KDPM2DiscreteScheduler(backend="torch", prediction_type=prediction_type)
    ours.set_timesteps(10)
    x = torch.linspace(-3, 3, 4096).reshape(1, 4, 32, 32).to(sample_dtype)
    output = torch.linspace(1, -1, 4096).reshape(1, 4, 32, 32).to(output_dtype)
    first = ours.step(output, ours.timesteps[0], x)
    second = ours.step(output, ours.timesteps[1], first.prev_sample)  # a midpoint: stored is the float16 sample
    for result in (*first.values(), *second.values()):  # the arrays: iterating an output gives its keys
        assert result.dtype == output_dtype
    if prediction_type == "v_prediction":  # diffusers has no "sample" prediction
        reference = diffusers_kdpm2(prediction_type=prediction_type)
        reference.set_timesteps(10)
        expected = reference.step(output, reference.timesteps[0], x).prev_sample
        assert expected.dtype == output_dtype
        assert relative_error(first.prev_sample.double().numpy(), expected.double().numpy()) < 1e-6
