"""The step's output reads as diffusers' outputs do: an ordered dict of its non-None fields, whose values are
also attributes and positions (diffusers' ``BaseOutput``), without depending on diffusers.

Each behaviour is checked on ours and, where diffusers is installed, on diffusers' own
``KDPM2DiscreteSchedulerOutput`` holding the same arrays, so the two are held to one description.
"""

from __future__ import annotations

import copy
import pickle
from collections import OrderedDict

import numpy as np
import pytest

from kdpm2core import KDPM2DiscreteScheduler, KDPM2DiscreteSchedulerOutput

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' numpy 2 interop noise


def output_classes():
    classes = [KDPM2DiscreteSchedulerOutput]
    try:
        from diffusers.schedulers.scheduling_k_dpm_2_discrete import (
            KDPM2DiscreteSchedulerOutput as Theirs,
        )
    except ImportError:
        return classes
    return classes + [Theirs]


@pytest.fixture(params=output_classes(), ids=lambda cls: cls.__module__.split(".")[0])
def output_class(request):
    return request.param


def test_an_output_is_an_ordered_dict_of_its_fields(output_class):
    prev, pred = np.ones(3), np.zeros(3)
    out = output_class(prev, pred)
    assert isinstance(out, OrderedDict)
    assert "prev_sample" in out and "pred_original_sample" in out and "sample" not in out
    assert list(out) == list(out.keys()) == ["prev_sample", "pred_original_sample"] and len(out) == 2
    assert [id(v) for v in out.values()] == [id(prev), id(pred)]
    assert [(k, id(v)) for k, v in out.items()] == [("prev_sample", id(prev)), ("pred_original_sample", id(pred))]
    # keys, positions and attributes name the same arrays
    assert out["prev_sample"] is out[0] is out.prev_sample is prev
    assert out["pred_original_sample"] is out[1] is out[-1] is out.pred_original_sample is pred
    assert out.to_tuple() == out[:] == (prev, pred) and out[:1] == (prev,)
    first, second = out  # iterating gives the keys, as for any dict (diffusers says: use to_tuple())
    assert (first, second) == ("prev_sample", "pred_original_sample")
    with pytest.raises(KeyError):
        out["sample"]
    with pytest.raises(IndexError):
        out[2]


def test_fields_left_none_are_not_keys(output_class):
    prev = np.ones(3)
    out = output_class(prev_sample=prev, pred_original_sample=None)
    assert list(out) == ["prev_sample"] and out.to_tuple() == (prev,)
    assert out.pred_original_sample is None and "pred_original_sample" not in out


def test_fields_are_reassigned_by_key_or_attribute_but_never_removed(output_class):
    a, b, c = np.ones(2), np.zeros(2), np.full(2, 2.0)
    out = output_class(a, b)
    out.prev_sample = c  # an attribute write changes the key
    assert out["prev_sample"] is c and out[0] is c
    out["pred_original_sample"] = a  # and a key write the attribute
    assert out.pred_original_sample is a
    removals = [
        lambda: out.pop("prev_sample"),
        lambda: out.__delitem__("prev_sample"),
        lambda: out.setdefault("x", 1),
        lambda: out.update(x=1),
    ]
    for remove in removals:
        with pytest.raises(Exception):  # noqa: B017 -- diffusers raises Exception itself, ours a TypeError
            remove()
    assert list(out) == ["prev_sample", "pred_original_sample"]


def test_copies_and_pickles_keep_the_fields(output_class):
    out = output_class(np.ones(2), np.zeros(2))
    for clone in (pickle.loads(pickle.dumps(out)), copy.deepcopy(out)):
        assert type(clone) is output_class and list(clone) == list(out)
        assert all(np.array_equal(clone[k], out[k]) for k in out)


def test_our_copy_method_keeps_the_fields():
    out = KDPM2DiscreteSchedulerOutput(np.ones(2), np.zeros(2))
    clone = out.copy()  # OrderedDict.copy() builds the class from the dict
    assert type(clone) is KDPM2DiscreteSchedulerOutput and list(clone) == list(out)
    assert clone.prev_sample is out.prev_sample and clone[1] is out[1]
    assert repr(out).startswith("KDPM2DiscreteSchedulerOutput(prev_sample=array(")


def test_step_returns_the_output_with_the_same_arrays_as_return_dict_false():
    scheduler, twin = KDPM2DiscreteScheduler(), KDPM2DiscreteScheduler()
    for s in (scheduler, twin):
        s.set_timesteps(4)
    x = np.linspace(-1.0, 1.0, 6).reshape(2, 3) * scheduler.init_noise_sigma
    for t in scheduler.timesteps[:3]:
        out = scheduler.step(0.3 * np.tanh(x), t, x)
        prev, pred = twin.step(0.3 * np.tanh(x), t, x, return_dict=False)
        assert isinstance(out, KDPM2DiscreteSchedulerOutput) and "prev_sample" in out
        np.testing.assert_array_equal(out.prev_sample, prev)  # the same operations in the same order
        np.testing.assert_array_equal(out["pred_original_sample"], pred)
        x = out[0]


def test_the_output_traces_under_torch_compile_fullgraph():
    """Loops compiled with ``fullgraph=True`` may read the output object (``.prev_sample``, ``["..."]``, ``[0]``)
    or return it: Dynamo must trace it without a graph break, with the eager numbers."""
    torch = pytest.importorskip("torch")

    def substep(scheduler, x, t):
        out = scheduler.step(torch.tanh(scheduler.scale_model_input(x, t)), t, x)
        return out.prev_sample + 0 * out[0], out

    def run(function):
        scheduler = KDPM2DiscreteScheduler(backend="torch")
        scheduler.set_timesteps(3)
        scheduler.set_begin_index(0)
        x, history = torch.linspace(-14.0, 14.0, 16).reshape(1, 1, 4, 4), []
        for t in scheduler.timesteps:
            x, out = function(scheduler, x, t)
            assert type(out) is KDPM2DiscreteSchedulerOutput and list(out) == ["prev_sample", "pred_original_sample"]
            history += [x, out["pred_original_sample"]]
        return history

    torch._dynamo.reset()
    compiled = torch.compile(substep, backend="eager", fullgraph=True)
    for ours, eager in zip(run(compiled), run(substep)):
        assert torch.equal(ours, eager)  # the same operations in the same order
