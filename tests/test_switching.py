"""Switching schedulers goes through ours as it goes through diffusers' own KDPM2.

A user starts from a pipeline's scheduler (Stable Diffusion 1.5's PNDM config), swaps ours in with
``from_config``, and later swaps in another diffusers scheduler from ours. Every config along the way must be
the one the all-diffusers chain gives: the options the source left at its defaults stay listed in
``_use_default_values`` (so the next scheduler takes its own defaults), and the source's other keys stay in the
config (so DDIM gets its ``clip_sample`` back). ``compatibles`` lists the classes to switch to.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from conftest import comparable_config

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers import KDPM2DiscreteScheduler as Reference

from kdpm2core import KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler
from kdpm2core.checkpoint import load_checkpoint, save_checkpoint
from kdpm2core.config import DEFAULTS

import tiny_pipelines as tiny

TARGETS = ["DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "KDPM2DiscreteScheduler"]
SETTINGS = {
    "beta_schedule": "scaled_linear",
    "prediction_type": "v_prediction",
    "timestep_spacing": "leading",
    "steps_offset": 1,
}


def assert_same_config(ours, theirs):
    assert comparable_config(ours) == comparable_config(theirs)
    assert list(comparable_config(ours)) == list(comparable_config(theirs))  # the same keys in the same order


def both_from(config):
    """(ours, diffusers' KDPM2), each built from ``config``."""
    return KDPM2DiscreteScheduler.from_config(config, backend="torch"), Reference.from_config(config)


# ---- Stable Diffusion 1.5 -> KDPM2 -> another scheduler ---------------------------------------------------------
def test_ours_from_sd15_has_the_config_diffusers_kdpm2_has():
    ours, theirs = both_from(tiny.sd15_scheduler().config)
    assert_same_config(ours.config, theirs.config)
    assert ours.config["clip_sample"] is False and ours.config["set_alpha_to_one"] is False  # PNDM's, kept
    assert ours.config["_class_name"] == "KDPM2DiscreteScheduler" and ours.config["_diffusers_version"] == "0.6.0"


@pytest.mark.parametrize("name", TARGETS)
def test_sd15_through_ours_to_another_scheduler_gives_the_all_diffusers_config(name):
    target = getattr(diffusers, name)
    ours, theirs = both_from(tiny.sd15_scheduler().config)
    after_ours, after_theirs = target.from_config(ours.config), target.from_config(theirs.config)
    assert_same_config(after_ours.config, after_theirs.config)
    if name == "DDIMScheduler":  # DDIM's own default spacing, and the source's DDIM keys, not KDPM2's
        assert after_ours.config.timestep_spacing == "leading"
        assert (after_ours.config.clip_sample, after_ours.config.set_alpha_to_one) == (False, False)
    # and back to ours: the same config as back to diffusers' KDPM2
    back_ours, back_theirs = both_from(after_ours.config)
    assert_same_config(back_ours.config, back_theirs.config)


@pytest.mark.parametrize("name", TARGETS)
def test_defaults_of_a_scheduler_built_directly_stay_defaults_after_a_switch(name):
    """KDPM2's default beta_start (0.00085) is not Euler's (0.0001): a switch from a KDPM2 built with its
    defaults must give the target its own, as diffusers does."""
    target = getattr(diffusers, name)
    ours, theirs = KDPM2DiscreteScheduler(prediction_type="v_prediction"), Reference(prediction_type="v_prediction")
    assert_same_config(ours.config, theirs.config)
    after_ours = target.from_config(ours.config)
    assert_same_config(after_ours.config, target.from_config(theirs.config).config)
    assert after_ours.config.prediction_type == "v_prediction"
    if name == "EulerDiscreteScheduler":
        assert after_ours.config.beta_start == 0.0001


def test_a_pipeline_switched_from_ours_to_ddim_draws_the_all_diffusers_images():
    """The user's flow in a pipeline: SD 1.5's scheduler, then ours, then DDIM; the images are those of the
    all-diffusers chain (both are diffusers' DDIM with one config: the same operations, so equal bits)."""
    pipe = StableDiffusionPipeline(**{**tiny.tiny_components(), "scheduler": tiny.sd15_scheduler()})
    sd15 = pipe.scheduler.config
    pipe.scheduler = KDPM2DiscreteScheduler.from_config(sd15, backend="torch")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    ours = tiny.txt2img(pipe, steps=5)
    pipe.scheduler = DDIMScheduler.from_config(Reference.from_config(sd15).config)
    theirs = tiny.txt2img(pipe, steps=5)
    assert np.all(np.isfinite(theirs)) and theirs.std() > 1e-3  # a real image
    np.testing.assert_array_equal(ours, theirs)


# ---- files ----------------------------------------------------------------------------------------------------
def test_saved_config_files_match_diffusers(tmp_path):
    ours, theirs = both_from(tiny.sd15_scheduler().config)
    ours.save_config(tmp_path / "ours")
    theirs.save_config(tmp_path / "theirs")
    written = {side: json.loads((tmp_path / side / "scheduler_config.json").read_text()) for side in ("ours", "theirs")}
    assert written["ours"] == written["theirs"]  # _diffusers_version is the installed diffusers' on both sides
    assert "_use_default_values" not in written["ours"] and written["ours"]["clip_sample"] is False
    for side in ("ours", "theirs"):  # each side reads either file to the same config
        loaded_ours = KDPM2DiscreteScheduler.from_pretrained(tmp_path / side)
        assert_same_config(loaded_ours.config, Reference.from_pretrained(tmp_path / side).config)
        assert_same_config(
            DDIMScheduler.from_pretrained(tmp_path / side).config,
            DDIMScheduler.from_pretrained(tmp_path / "theirs").config,
        )


# ---- compatibles ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler])
def test_compatibles_are_diffusers_list_and_ours(cls):
    """This class first, our other scheduler second, then diffusers' list; each builds from the config."""
    other = KDPM2AncestralDiscreteScheduler if cls is KDPM2DiscreteScheduler else KDPM2DiscreteScheduler
    ours = cls()
    assert cls.has_compatibles is True
    assert cls._compatibles == Reference._compatibles
    assert ours.compatibles[:2] == [cls, other]
    assert ours.compatibles[2:] == [getattr(diffusers, name) for name in Reference._compatibles]
    assert set(ours.compatibles) == set(Reference().compatibles) | {cls, other}
    for target in ours.compatibles:
        assert type(target.from_config(ours.config)) is target


@pytest.mark.parametrize("cls", [KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler])
def test_compatibles_without_diffusers_are_ours(monkeypatch, cls):
    other = KDPM2AncestralDiscreteScheduler if cls is KDPM2DiscreteScheduler else KDPM2DiscreteScheduler
    monkeypatch.setitem(__import__("sys").modules, "diffusers", None)  # import diffusers now raises ImportError
    assert cls().compatibles == [cls, other]


@pytest.mark.parametrize("name", Reference._compatibles)
def test_each_compatible_scheduler_round_trips_both_ways(name):
    target = getattr(diffusers, name)
    if type(target).__name__ == "DummyObject":  # diffusers lists it, but its dependency (torchsde) is missing
        pytest.skip(f"{name} needs a package that is not installed")
    ours, theirs = KDPM2DiscreteScheduler(**SETTINGS), Reference(**SETTINGS)
    after_ours, after_theirs = target.from_config(ours.config), target.from_config(theirs.config)
    assert_same_config(after_ours.config, after_theirs.config)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the other scheduler's own keys are expected, not unknown
        back = KDPM2DiscreteScheduler.from_config(after_ours.config)
    assert_same_config(back.config, Reference.from_config(after_theirs.config).config)
    assert {key: back.config[key] for key in DEFAULTS} == {key: ours.config[key] for key in DEFAULTS}


# ---- checkpoints keep the whole config ------------------------------------------------------------------------
@pytest.mark.parametrize("through", ["state_dict", "checkpoint"])
def test_a_resumed_scheduler_switches_as_the_original_would(tmp_path, through):
    ours = KDPM2DiscreteScheduler.from_config(tiny.sd15_scheduler().config, backend="torch")
    ours.set_timesteps(4)
    x = torch.linspace(-14.0, 14.0, 8)
    x = ours.step(0.3 * torch.tanh(x), ours.timesteps[0], x).prev_sample
    if through == "checkpoint":
        save_checkpoint(tmp_path, ours, sample=x)
        resumed, _ = load_checkpoint(tmp_path)
    else:
        resumed = KDPM2DiscreteScheduler(backend="torch")
        resumed.load_state_dict(ours.state_dict())
    assert_same_config(resumed.config, ours.config)
    assert_same_config(DDIMScheduler.from_config(resumed.config).config, DDIMScheduler.from_config(ours.config).config)
    assert resumed.step_index == ours.step_index == 1
