"""Checkpoints (:mod:`kdpm2core.checkpoint`) on every backend: a run saved between an Euler and a midpoint
substep, loaded onto the same backend and device, finishes bit for bit as the uninterrupted run (the same
operations on the same values), for the stateful scheduler and for the functional state."""

from __future__ import annotations

import numpy as np

from kdpm2core import functional as F
from kdpm2core.checkpoint import (
    load_checkpoint,
    load_functional_checkpoint,
    save_checkpoint,
    save_functional_checkpoint,
)
from kdpm2core.testing.cases import NOISE, array_toy_model, toy_model

CONFIG = {"beta_schedule": "scaled_linear", "prediction_type": "v_prediction"}
STEPS = 3  # 5 substeps
SAVE_AT = 3  # after substeps 0, 1 and 2: the next, substep 3, is a midpoint that needs the stored sample


def _stepper(case, scheduler):
    """``step(x, k)``: substep ``k`` of ``scheduler`` with the suite's toy model; returns the next sample."""
    host_t = case.to_numpy(scheduler.timesteps)

    def step(x, k):
        t = scheduler.timesteps[k]
        return scheduler.step(
            toy_model(scheduler.scale_model_input(x, t), float(host_t[k]), xp=case.xp), t, x
        ).prev_sample

    return step


def _equal(case, ours, theirs, what: str) -> None:
    assert case.backend.owns(ours) and ours.dtype == theirs.dtype, f"{case.label} [{what}]: {type(ours)} {ours.dtype}"
    assert np.array_equal(case.to_numpy(ours), case.to_numpy(theirs)), f"{case.label} [{what}]: values differ"


def test_scheduler_checkpoint_resumes_bit_for_bit(kdpm2_case, tmp_path):
    case = kdpm2_case
    scheduler = case.scheduler(**CONFIG)
    scheduler.set_timesteps(STEPS, device=case.device_name)
    n = scheduler.timesteps.shape[0]
    x = case.array(NOISE * scheduler.init_noise_sigma)
    step = _stepper(case, scheduler)
    for k in range(SAVE_AT):
        x = step(x, k)
    assert not scheduler.state_in_first_order, f"{case.label}: substep {SAVE_AT} should be a midpoint"
    save_checkpoint(tmp_path, scheduler, sample=x)
    expected = x
    for k in range(SAVE_AT, n):
        expected = step(expected, k)

    resumed, arrays = load_checkpoint(tmp_path, device=case.device_name)
    assert resumed.backend.name == case.backend_name and resumed.step_index == SAVE_AT
    _equal(case, arrays["sample"], x, "the saved sample")
    y, step = arrays["sample"], _stepper(case, resumed)
    for k in range(SAVE_AT, n):
        y = step(y, k)
    _equal(case, y, expected, f"the run resumed at substep {SAVE_AT}")


def test_functional_checkpoint_resumes_bit_for_bit(kdpm2_case, tmp_path):
    case = kdpm2_case
    scheduler = case.scheduler(**CONFIG)
    scheduler.set_timesteps(STEPS, device=case.device_name)
    plan = F.make_plan(scheduler, dtype=case.dtype)
    model = array_toy_model(case.xp)

    def run(state, x, stop):
        for _ in range(int(case.to_numpy(state.index)), stop):
            (x, _), state = F.step(plan, state, model(*F.model_inputs(plan, state, x)), x)
        return state, x

    x = case.array(NOISE * F.init_noise_sigma(plan))
    state, x = run(F.init(plan, x), x, SAVE_AT)
    save_functional_checkpoint(tmp_path, plan, state, sample=x)
    _, expected = run(state, x, F.num_substeps(plan))

    loaded, arrays = load_functional_checkpoint(tmp_path, plan)
    assert loaded.index.dtype == state.index.dtype == plan.info.index_dtype, (
        f"{case.label}: the index is {loaded.index.dtype} after loading, {state.index.dtype} before"
    )
    _equal(case, loaded.stored, state.stored, "the stored sample")
    _, y = run(loaded, arrays["sample"], F.num_substeps(plan))
    _equal(case, y, expected, f"the functional run resumed at substep {SAVE_AT}")
