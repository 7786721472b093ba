"""Real diffusers Stable Diffusion pipelines give the same images with our scheduler as with diffusers' own.

The pipelines are tiny and randomly initialised (tests/tiny_pipelines.py, nothing downloaded); 10 steps.
Bound: max abs pixel difference <= 1e-4 in float32 (the issue's).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
from diffusers import (  # noqa: E402
    KDPM2AncestralDiscreteScheduler as AncestralReference,
)
from diffusers import (
    KDPM2DiscreteScheduler as Reference,
)
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)

from kdpm2core import KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler  # noqa: E402

import tiny_pipelines as tiny  # noqa: E402

ATOL = 1e-4
STEPS = 10


@pytest.fixture(scope="module")
def components():
    return tiny.tiny_components()


@pytest.fixture(scope="module")
def inpaint_components():
    return tiny.inpaint_components()


def ours_from(pipe, **overrides):
    return KDPM2DiscreteScheduler.from_config(pipe.scheduler.config, backend="torch", **overrides)


def compare(pipe, run, *, classes=(Reference, KDPM2DiscreteScheduler), **overrides):
    """Run ``run(pipe)`` with diffusers' KDPM2 (built from the pipeline's config) and with ours (``classes``:
    diffusers', ours); returns the max abs pixel difference and asserts the images are not trivially equal
    (blank, or NaN)."""
    config = dict(pipe.scheduler.config)
    reference, ours = classes
    pipe.scheduler = reference.from_config(config, **overrides)
    expected = run(pipe)
    pipe.scheduler = ours.from_config(config, backend="torch", **overrides)
    got = run(pipe)
    assert np.all(np.isfinite(expected)) and expected.std() > 1e-3  # a real image, not a constant
    assert got.shape == expected.shape
    return float(np.abs(got - expected).max())


@pytest.mark.parametrize(
    "overrides",
    [{}, {"use_karras_sigmas": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}],
    ids=["sd", "karras-v-trailing"],
)
def test_txt2img(components, overrides):
    pipe = StableDiffusionPipeline(**components)
    assert compare(pipe, lambda p: tiny.txt2img(p, steps=STEPS), **overrides) <= ATOL


def test_img2img(components):
    pipe = StableDiffusionImg2ImgPipeline(**components)
    assert compare(pipe, lambda p: tiny.img2img(p, steps=STEPS, strength=0.6)) <= ATOL


def test_inpaint_nine_channel_unet(inpaint_components):
    pipe = StableDiffusionInpaintPipeline(**inpaint_components)
    assert compare(pipe, lambda p: tiny.inpaint(p, steps=STEPS, strength=0.8)) <= ATOL


def test_inpaint_four_channel_unet_calls_add_noise_mid_loop(components):
    """With a 4-channel UNet the inpainting pipeline re-noises the kept region after every step with
    ``add_noise(image_latents, noise, [next timestep])``: the path where begin_index is set and step_index
    is not None."""
    pipe = StableDiffusionInpaintPipeline(**components)
    calls = []
    original = KDPM2DiscreteScheduler.add_noise

    def spy(self, *args, **kwargs):
        calls.append(self.step_index)
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(KDPM2DiscreteScheduler, "add_noise", spy)
        assert compare(pipe, lambda p: tiny.inpaint(p, steps=STEPS, strength=0.8)) <= ATOL
    assert len(calls) > 2 and any(index is not None for index in calls)


def test_pipeline_patches_steps_offset_of_a_legacy_config(components):
    """Built with a scheduler whose config has steps_offset=0, the pipeline replaces the scheduler's
    ``_internal_dict`` with a patched copy (steps_offset=1); ours must follow it like diffusers' does."""
    legacy = dict(tiny.SCHEDULER_CONFIG, steps_offset=0, timestep_spacing="leading")
    images = []
    for scheduler in (Reference(**legacy), KDPM2DiscreteScheduler(**legacy, backend="torch")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe = StableDiffusionPipeline(**{**components, "scheduler": scheduler})
        assert pipe.scheduler is scheduler and scheduler.config.steps_offset == 1  # the patch happened
        images.append(tiny.txt2img(pipe, steps=STEPS))
        assert float(scheduler.timesteps[-1]) == 1.0  # leading spacing ends at steps_offset
    assert np.abs(images[0] - images[1]).max() <= ATOL


def test_saved_pipeline_reloads_with_our_scheduler_passed_in(components, tmp_path):
    """diffusers' save_pretrained saves only components of libraries it knows, so it leaves our scheduler out
    (model_index.json says null). The documented way back: save the scheduler's config beside the pipeline and
    hand a scheduler built from it to from_pretrained. The images are the same."""
    pipe = StableDiffusionPipeline(**components)
    pipe.scheduler = ours_from(pipe, use_karras_sigmas=True)
    expected = tiny.txt2img(pipe, steps=STEPS)
    pipe.save_pretrained(tmp_path)
    assert not (tmp_path / "scheduler").exists()  # what diffusers does with a class it does not know
    pipe.scheduler.save_config(tmp_path / "scheduler")
    scheduler = KDPM2DiscreteScheduler.from_pretrained(tmp_path, subfolder="scheduler", backend="torch")
    again = StableDiffusionPipeline.from_pretrained(tmp_path, scheduler=scheduler)
    assert isinstance(again.scheduler, KDPM2DiscreteScheduler) and again.scheduler.config.use_karras_sigmas
    np.testing.assert_array_equal(tiny.txt2img(again, steps=STEPS), expected)


# ---- DPM2 a: the pipelines pass their generator to step (it has a ``generator`` parameter) ---------------------
ANCESTRAL = (AncestralReference, KDPM2AncestralDiscreteScheduler)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"use_karras_sigmas": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}],
    ids=["sd", "karras-v-trailing"],
)
def test_ancestral_txt2img(components, overrides):
    pipe = StableDiffusionPipeline(**components)
    assert compare(pipe, lambda p: tiny.txt2img(p, steps=STEPS), classes=ANCESTRAL, **overrides) <= ATOL


def test_ancestral_img2img(components):
    pipe = StableDiffusionImg2ImgPipeline(**components)
    assert compare(pipe, lambda p: tiny.img2img(p, steps=STEPS, strength=0.6), classes=ANCESTRAL) <= ATOL


@pytest.mark.parametrize("nine_channels", [True, False], ids=["9-channel", "4-channel"])
def test_ancestral_inpaint(components, inpaint_components, nine_channels):
    pipe = StableDiffusionInpaintPipeline(**(inpaint_components if nine_channels else components))
    assert compare(pipe, lambda p: tiny.inpaint(p, steps=STEPS, strength=0.8), classes=ANCESTRAL) <= ATOL


def test_ancestral_images_depend_on_the_step_noise(components):
    """The bound above is tight enough to see the step noise: with the initial latents fixed, another generator
    (which then only feeds step()) moves the image far beyond it."""
    pipe = StableDiffusionPipeline(**components)
    pipe.scheduler = KDPM2AncestralDiscreteScheduler.from_config(pipe.scheduler.config, backend="torch")
    size = tiny.IMAGE_SIZE // pipe.vae_scale_factor  # the latents the pipeline would draw
    latents = torch.randn((1, 4, size, size), generator=torch.Generator().manual_seed(5))

    def image(seed):
        kwargs = tiny._common_kwargs(pipe, STEPS, seed)
        images = pipe(latents=latents.clone(), **kwargs).images
        assert images.shape == tiny.txt2img(pipe, steps=1).shape  # latents of the pipeline's own shape
        return images

    assert float(np.abs(image(0) - image(1)).max()) > 100 * ATOL
