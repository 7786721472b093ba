"""The config: a read-only dict with attribute access that diffusers accepts, and diffusers-format JSON files.

Checked against diffusers itself: its schedulers' configs load into ours, ours loads into its
``KDPM2DiscreteScheduler``, and each side reads the other's ``scheduler_config.json``.
"""

from __future__ import annotations

import builtins
import copy
import json
import pickle
import warnings

import numpy as np
import pytest

from kdpm2core import KDPM2DiscreteScheduler
from kdpm2core.config import DEFAULTS, FLOW_OPTIONS, FrozenConfig

from conftest import comparable_config, diffusers_kdpm2

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' numpy 2 interop noise
diffusers = pytest.importorskip("diffusers")
from diffusers.configuration_utils import FrozenDict  # noqa: E402

SETTINGS = {
    "num_train_timesteps": 1200,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "scaled_linear",
    "use_karras_sigmas": True,
    "prediction_type": "v_prediction",
    "timestep_spacing": "leading",
    "steps_offset": 1,
}


def settings_of(config) -> dict:
    """The KDPM2 options of any scheduler config (ours, diffusers', a plain dict), trained betas as a list; an
    option a config lacks (diffusers' KDPM2 has no flow-matching options) is at its default."""
    out = {key: config.get(key, DEFAULTS[key]) for key in DEFAULTS}
    if out["trained_betas"] is not None:
        out["trained_betas"] = [float(v) for v in out["trained_betas"]]
    return out


def expected_settings(**changes) -> dict:
    return {**DEFAULTS, **SETTINGS, **changes}


# ---- the mapping ---------------------------------------------------------------------------------------------
def test_config_is_a_read_only_dict_with_attributes():
    config = KDPM2DiscreteScheduler(**SETTINGS).config
    assert isinstance(config, dict) and isinstance(config, FrozenConfig)
    assert config.prediction_type == config["prediction_type"] == "v_prediction"
    # as diffusers: the options left at their defaults are listed, so that other schedulers use their own
    assert list(config) == [*DEFAULTS, "_use_default_values"]
    assert config._use_default_values == [key for key in DEFAULTS if key not in SETTINGS]
    with pytest.raises(AttributeError, match="no_such_key"):
        _ = config.no_such_key
    mutations = [
        lambda: config.__setitem__("steps_offset", 2),
        lambda: config.__delitem__("steps_offset"),
        lambda: setattr(config, "steps_offset", 2),
        lambda: config.update(steps_offset=2),
        lambda: config.pop("steps_offset"),
        lambda: config.popitem(),
        lambda: config.setdefault("x", 1),
        lambda: config.clear(),
    ]
    for mutate in mutations:
        with pytest.raises(TypeError, match="read-only"):
            mutate()
    with pytest.raises(TypeError, match="read-only"):
        config |= {"steps_offset": 2}
    assert config["steps_offset"] == 1


def test_config_copies_and_pickles_as_frozen_config():
    config = KDPM2DiscreteScheduler(**SETTINGS, trained_betas=np.linspace(1e-4, 0.02, 1200)).config
    for clone in (copy.copy(config), copy.deepcopy(config), pickle.loads(pickle.dumps(config))):
        assert type(clone) is FrozenConfig and clone == config
        with pytest.raises(TypeError, match="read-only"):
            clone["steps_offset"] = 3
    assert dict(config) == config and type(dict(config)) is dict  # what pipelines do before patching


# ---- from_config ---------------------------------------------------------------------------------------------
def test_from_config_of_our_own_config_and_overrides():
    original = KDPM2DiscreteScheduler(**SETTINGS)
    again = KDPM2DiscreteScheduler.from_config(original.config)
    assert settings_of(again.config) == expected_settings()
    changed = KDPM2DiscreteScheduler.from_config(original.config, prediction_type="epsilon", backend="numpy")
    assert settings_of(changed.config) == expected_settings(prediction_type="epsilon")
    assert original.config.prediction_type == "v_prediction"  # the source is untouched


def test_from_config_of_diffusers_kdpm2_config_gives_the_same_schedule():
    ref = diffusers_kdpm2(**SETTINGS)
    ours = KDPM2DiscreteScheduler.from_config(ref.config)
    assert settings_of(ours.config) == settings_of(ref.config) == expected_settings()
    ref.set_timesteps(15)
    ours.set_timesteps(15)
    from test_schedule_parity import assert_schedule_matches  # needs torch: imported where it is used

    # the bounds derived for every schedule comparison with diffusers' float32 arithmetic (test_schedule_parity)
    assert_schedule_matches(ours, ref, context="from_config of diffusers' config")


@pytest.mark.parametrize(
    "name",
    [
        "EulerDiscreteScheduler",
        "PNDMScheduler",
        "DPMSolverMultistepScheduler",
        "DDIMScheduler",
        "UniPCMultistepScheduler",
        "HeunDiscreteScheduler",
    ],
)
def test_from_config_of_other_diffusers_schedulers_ignores_their_keys_quietly(name):
    other = getattr(diffusers, name)(beta_schedule="scaled_linear", prediction_type="v_prediction", steps_offset=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # their own keys (clip_sample, solver_order, ...) must not warn
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        ours = KDPM2DiscreteScheduler.from_config(other.config)
    # keys the other scheduler left at its own defaults take ours, as in diffusers (Euler's beta_start is 1e-4)
    defaulted = set(other.config.get("_use_default_values", ()))
    assert {"beta_start", "beta_end"} <= defaulted
    for key in DEFAULTS:
        expected = DEFAULTS[key] if key in defaulted or key not in other.config else other.config[key]
        assert ours.config[key] == expected, key
    assert (ours.config.prediction_type, ours.config.steps_offset) == ("v_prediction", 1)
    # and diffusers builds its KDPM2 from the same config to the same settings
    assert settings_of(diffusers.KDPM2DiscreteScheduler.from_config(other.config).config) == settings_of(ours.config)


def test_from_config_returns_unused_keys_when_asked_as_diffusers_does():
    config = {**SETTINGS, "my_custom_knob": 3, "clip_sample": False}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the caller asked for the unused keys: no warning about them
        ours, unused = KDPM2DiscreteScheduler.from_config(config, return_unused_kwargs=True, another=1)
    assert isinstance(ours, KDPM2DiscreteScheduler) and settings_of(ours.config) == expected_settings()
    assert unused == {"my_custom_knob": 3, "clip_sample": False, "another": 1}
    with pytest.warns(UserWarning, match="my_custom_knob"):
        assert isinstance(KDPM2DiscreteScheduler.from_config(config, False), KDPM2DiscreteScheduler)


def test_numpy_bools_are_bools():
    ours = KDPM2DiscreteScheduler(use_karras_sigmas=np.bool_(True), use_beta_sigmas=np.False_)
    assert ours.config.use_karras_sigmas is True and ours.config.use_beta_sigmas is False


def test_truly_unknown_keys_warn_and_name_the_key():
    source = {"my_custom_knob": 3, "clip_sample": False, "_private": 1}
    with pytest.warns(UserWarning, match="my_custom_knob"):
        ours = KDPM2DiscreteScheduler.from_config(source)
    # kept in the config, unused, as diffusers keeps every key of the config it was built from
    assert {key: ours.config[key] for key in source} == source
    assert {key: diffusers.KDPM2DiscreteScheduler.from_config(source).config[key] for key in source} == source


def test_diffusers_from_config_of_our_config_gets_the_same_settings():
    ours = KDPM2DiscreteScheduler(**SETTINGS)
    ref = diffusers.KDPM2DiscreteScheduler.from_config(ours.config)
    assert settings_of(ref.config) == expected_settings()
    ours_betas = KDPM2DiscreteScheduler(**SETTINGS, trained_betas=np.geomspace(1e-4, 0.02, 1200))
    ref = diffusers.KDPM2DiscreteScheduler.from_config(ours_betas.config)
    np.testing.assert_array_equal(ref.betas.numpy(), np.asarray(ours_betas.betas))


def test_trained_betas_as_numpy_array():
    betas = np.geomspace(1e-4, 0.02, 1000)
    ours = KDPM2DiscreteScheduler.from_config({"trained_betas": betas})
    ref = diffusers_kdpm2(trained_betas=betas)
    assert isinstance(ours.config.trained_betas, tuple)  # hashable, immutable, JSON-friendly
    np.testing.assert_array_equal(np.asarray(ours.betas), ref.betas.numpy())
    np.testing.assert_array_equal(np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy())
    float32_betas = KDPM2DiscreteScheduler(trained_betas=betas.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(float32_betas.betas), betas.astype(np.float32))


# ---- files -----------------------------------------------------------------------------------------------------
def test_save_and_load_round_trip(tmp_path):
    original = KDPM2DiscreteScheduler(**SETTINGS, trained_betas=np.geomspace(1e-4, 0.02, 1200), backend="numpy")
    path = original.save_config(tmp_path / "a")
    assert path.name == "scheduler_config.json"
    saved = json.loads(path.read_text())
    assert saved["_class_name"] == "KDPM2DiscreteScheduler"
    assert "backend" not in saved and "check_finite" not in saved
    assert settings_of(KDPM2DiscreteScheduler.from_pretrained(tmp_path / "a").config) == settings_of(original.config)
    original.save_pretrained(tmp_path / "model" / "scheduler")
    loaded = KDPM2DiscreteScheduler.from_pretrained(tmp_path / "model", subfolder="scheduler", backend="torch")
    assert settings_of(loaded.config) == settings_of(original.config) and loaded.backend.name == "torch"
    override = KDPM2DiscreteScheduler.from_pretrained(tmp_path / "model", subfolder="scheduler", steps_offset=0)
    assert override.config.steps_offset == 0


def test_each_side_reads_the_others_files(tmp_path):
    ref = diffusers.KDPM2DiscreteScheduler(**SETTINGS)
    ref.save_config(tmp_path / "theirs")
    ours = KDPM2DiscreteScheduler.from_pretrained(tmp_path / "theirs")
    assert settings_of(ours.config) == expected_settings()
    ours.save_config(tmp_path / "ours")
    back = diffusers.KDPM2DiscreteScheduler.from_pretrained(tmp_path / "ours")
    assert settings_of(back.config) == expected_settings()


def test_loading_never_unpickles_or_evaluates(tmp_path, monkeypatch):
    """A pickle, or strings that look like code, are rejected as data; nothing is ever executed."""

    def forbidden(*args, **kwargs):
        raise AssertionError("loading a config must not unpickle or evaluate")

    for name in ("eval", "exec", "compile"):
        monkeypatch.setattr(builtins, name, forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "scheduler_config.json").write_bytes(pickle.dumps({"prediction_type": "epsilon"}))
    with pytest.raises(ValueError, match="not valid JSON"):
        KDPM2DiscreteScheduler.from_pretrained(tmp_path / "pickled")
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "scheduler_config.json").write_text(
        json.dumps({"num_train_timesteps": "__import__('os').getpid()"})
    )
    with pytest.raises(TypeError, match="num_train_timesteps"):
        KDPM2DiscreteScheduler.from_pretrained(tmp_path / "code")


# ---- pipelines patch _internal_dict ---------------------------------------------------------------------------
def test_pipeline_style_internal_dict_patch_is_followed():
    """StableDiffusion pipelines replace ``scheduler._internal_dict`` with a patched FrozenDict (steps_offset=1
    for legacy configs); the next set_timesteps must use it, as diffusers' scheduler does."""
    ours = KDPM2DiscreteScheduler(timestep_spacing="leading", steps_offset=0)
    ref = diffusers_kdpm2(timestep_spacing="leading", steps_offset=0)
    for scheduler in (ours, ref):
        patched = dict(scheduler.config)
        patched["steps_offset"] = 1
        scheduler._internal_dict = FrozenDict(patched)
        scheduler.set_timesteps(10)
    assert ours.config.steps_offset == 1
    np.testing.assert_array_equal(np.asarray(ours.timesteps)[0::2], ref.timesteps.numpy()[0::2])
    assert float(ours.timesteps[-1]) == 1.0  # leading spacing with offset 1 ends at t = 1
    fresh = KDPM2DiscreteScheduler(timestep_spacing="leading", steps_offset=1)
    fresh.set_timesteps(10)
    np.testing.assert_array_equal(np.asarray(ours.timesteps), np.asarray(fresh.timesteps))
    # a patch with a wrong type is reported at the next set_timesteps, naming the key
    bad = dict(ours.config)
    bad["steps_offset"] = "1"
    ours._internal_dict = FrozenDict(bad)
    with pytest.raises(TypeError, match="steps_offset"):
        ours.set_timesteps(10)


# ---- diffusers' ConfigMixin / SchedulerMixin conventions ---------------------------------------------------------
def test_class_level_conventions_are_diffusers():
    for name in ("config_name", "has_compatibles", "_compatibles", "_deprecated_kwargs", "order"):
        assert getattr(KDPM2DiscreteScheduler, name) == getattr(diffusers.KDPM2DiscreteScheduler, name), name
    assert KDPM2DiscreteScheduler.config_name == "scheduler_config.json"


def test_config_keys_read_as_attributes_answer_with_a_deprecation_warning_as_in_diffusers():
    ours = KDPM2DiscreteScheduler.from_config({**SETTINGS, "clip_sample": False})
    theirs = diffusers.KDPM2DiscreteScheduler.from_config({**SETTINGS, "clip_sample": False})
    for scheduler in (ours, theirs):
        with pytest.warns(FutureWarning, match="num_train_timesteps.*config"):
            assert scheduler.num_train_timesteps == 1200
        with pytest.warns(FutureWarning, match="clip_sample"):  # a key kept from another scheduler's config
            assert scheduler.clip_sample is False
        with pytest.raises(AttributeError, match="no_such_option"):
            _ = scheduler.no_such_option
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the scheduler's own attributes never warn
        assert ours.order == 2 and ours.config.steps_offset == 1 and ours.step_index is None
    assert not hasattr(ours, "no_such_option")


def test_register_to_config_updates_the_config_as_diffusers_does():
    ours, theirs = KDPM2DiscreteScheduler(timestep_spacing="leading"), diffusers_kdpm2(timestep_spacing="leading")
    for scheduler in (ours, theirs):
        scheduler.register_to_config(steps_offset=1, clip_sample=False)  # as diffusers' conversion script does
        scheduler.set_timesteps(10)
    assert comparable_config(ours.config) == comparable_config(theirs.config)
    assert ours.config.steps_offset == 1 and ours.config.clip_sample is False
    np.testing.assert_array_equal(np.asarray(ours.timesteps)[0::2], theirs.timesteps.numpy()[0::2])
    fresh = KDPM2DiscreteScheduler(timestep_spacing="leading", steps_offset=1)
    fresh.set_timesteps(10)
    np.testing.assert_array_equal(np.asarray(ours.timesteps), np.asarray(fresh.timesteps))  # the new offset is used
    with pytest.raises(ValueError, match="prediction_type"):  # ours are checked at once, naming the key
        ours.register_to_config(prediction_type="x0")
    assert ours.config.prediction_type == "epsilon"


def test_from_config_returns_the_keys_diffusers_returns_as_unused():
    pndm = diffusers.PNDMScheduler.from_config({**SETTINGS, "_class_name": "PNDMScheduler", "skip_prk_steps": True})
    ours, unused = KDPM2DiscreteScheduler.from_config(pndm.config, return_unused_kwargs=True, another=1)
    theirs, their_unused = diffusers.KDPM2DiscreteScheduler.from_config(
        pndm.config, return_unused_kwargs=True, another=1
    )
    assert unused == their_unused and unused["another"] == 1 and unused["skip_prk_steps"] is True
    assert comparable_config(ours.config) == comparable_config(theirs.config)


@pytest.mark.parametrize(
    "where, subfolder",
    [("model", "scheduler"), ("flat", None), ("flat/scheduler_config.json", None), ("flat", "no_such_folder")],
    ids=["subfolder", "directory", "file", "missing-subfolder-falls-back"],
)
def test_from_pretrained_finds_the_file_where_diffusers_does(tmp_path, where, subfolder):
    saved = KDPM2DiscreteScheduler(**SETTINGS)
    saved.save_pretrained(tmp_path / "model" / "scheduler")
    saved.save_pretrained(tmp_path / "flat")
    download = {"local_files_only": True, "revision": "main", "cache_dir": str(tmp_path / "cache")}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # download options have nothing to do locally, quietly
        ours = KDPM2DiscreteScheduler.from_pretrained(tmp_path / where, subfolder=subfolder, **download)
    theirs = diffusers.KDPM2DiscreteScheduler.from_pretrained(tmp_path / where, subfolder=subfolder, **download)
    assert comparable_config(ours.config) == comparable_config(theirs.config)
    assert settings_of(ours.config) == expected_settings()
    loaded = KDPM2DiscreteScheduler.load_config(tmp_path / where, subfolder=subfolder)
    assert loaded == diffusers.KDPM2DiscreteScheduler.load_config(tmp_path / where, subfolder=subfolder)
    _, unused = KDPM2DiscreteScheduler.from_pretrained(tmp_path / where, subfolder, True, extra=1)
    assert unused == diffusers.KDPM2DiscreteScheduler.from_pretrained(tmp_path / where, subfolder, True, extra=1)[1]


def test_a_scheduler_loaded_from_its_saved_file_has_its_config(tmp_path):
    """As diffusers: saving records ``_class_name`` and ``_diffusers_version`` in the config, so the loaded
    scheduler's config is the saved one's, less ``_use_default_values`` (the file sets every option)."""
    for cls in (KDPM2DiscreteScheduler, diffusers.KDPM2DiscreteScheduler):
        saved = cls.from_config({**SETTINGS, "clip_sample": False})
        saved.save_pretrained(tmp_path / cls.__module__)
        loaded = cls.from_pretrained(tmp_path / cls.__module__)
        expected = {key: value for key, value in saved.config.items() if key != "_use_default_values"}
        loaded_config = dict(loaded.config)
        # our file leaves out the flow-matching options at their defaults (diffusers' KDPM2 does not know them),
        # so the loaded config lists exactly those as defaulted
        ours = cls is KDPM2DiscreteScheduler
        assert loaded_config.pop("_use_default_values", []) == (list(FLOW_OPTIONS) if ours else [])
        assert loaded_config == expected
        assert saved.config["_class_name"] == "KDPM2DiscreteScheduler"


def test_save_pretrained_does_not_pretend_to_push(tmp_path):
    with pytest.raises(NotImplementedError, match="push_to_hub"):
        KDPM2DiscreteScheduler().save_pretrained(tmp_path, push_to_hub=True)
    assert not (tmp_path / "scheduler_config.json").exists()
