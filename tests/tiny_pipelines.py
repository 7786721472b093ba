"""Tiny, randomly initialised Stable Diffusion pipelines for compatibility tests.

Everything here is built offline: the UNet, VAE and CLIP text encoder are
constructed from small configs with weights drawn from ``torch.manual_seed``,
and the CLIP tokenizer is built from a byte-level ``vocab.json`` /
``merges.txt`` pair written into a fresh temporary directory.  Nothing is
downloaded from any hub.

The component dicts use diffusers' own ``KDPM2DiscreteScheduler`` with a
Stable-Diffusion-like config; tests can swap in another scheduler with
``pipe.scheduler = ...`` before calling one of the run helpers
(:func:`txt2img`, :func:`img2img`, :func:`inpaint`), which all return a
``numpy`` image array of shape ``(1, IMAGE_SIZE, IMAGE_SIZE, 3)`` in [0, 1].
Each helper seeds its own ``torch.Generator``, so repeated calls on the same
pipeline (or on pipelines built with the same ``seed``) give identical output.
"""

import json
import os
import shutil
import tempfile

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    KDPM2DiscreteScheduler,
    PNDMScheduler,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

IMAGE_SIZE = 32  # pixels; the tiny VAE downsamples by 2, so latents are 16x16
LATENT_SIZE = IMAGE_SIZE // 2
TEXT_DIM = 32
MAX_TOKENS = 32
PROMPT = "a small red cube on a table"
GUIDANCE_SCALE = 6.0

SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,  # as in SD checkpoints; avoids the pipeline's config patch
}

# the scheduler_config.json of Stable Diffusion 1.5 as published (a PNDM config written by diffusers 0.6.0):
# the starting point of users who swap schedulers
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

_BOS = "<|startoftext|>"
_EOS = "<|endoftext|>"


def _byte_alphabet():
    """Return the 256 printable characters a byte-level BPE maps bytes onto."""
    printable = list(range(ord("!"), ord("~") + 1))
    printable += list(range(ord("\xa1"), ord("\xac") + 1))
    printable += list(range(ord("\xae"), ord("\xff") + 1))
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _write_tokenizer_files(directory):
    """Write a character-level ``vocab.json`` and an empty ``merges.txt``."""
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + [_BOS, _EOS]
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({tok: i for i, tok in enumerate(tokens)}, f)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")


def tiny_tokenizer():
    """Build a ``CLIPTokenizer`` from files generated in a temporary directory."""
    directory = tempfile.mkdtemp(prefix="tiny_clip_tok_")
    try:
        _write_tokenizer_files(directory)
        return CLIPTokenizer.from_pretrained(directory, model_max_length=MAX_TOKENS, local_files_only=True)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def tiny_text_encoder(vocab_size):
    """Build a two-layer ``CLIPTextModel`` (weights from the current RNG state)."""
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_DIM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        projection_dim=TEXT_DIM,
    )
    return CLIPTextModel(config).eval()


def tiny_unet(in_channels=4):
    """Build a two-level ``UNet2DConditionModel`` with cross-attention."""
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=32,
    ).eval()


def tiny_vae():
    """Build a two-level ``AutoencoderKL`` (downsampling factor 2, 4 latent channels)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=IMAGE_SIZE,
    ).eval()


def kdpm2_scheduler():
    """Return diffusers' ``KDPM2DiscreteScheduler`` with a Stable-Diffusion config."""
    return KDPM2DiscreteScheduler(**SCHEDULER_CONFIG)


def sd15_scheduler():
    """diffusers' ``PNDMScheduler`` as ``from_pretrained`` builds it from Stable Diffusion 1.5's config."""
    return PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG)


def _components(unet_in_channels, seed):
    """Assemble the pipeline component dict with deterministic weights."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    unet = tiny_unet(unet_in_channels)
    torch.manual_seed(seed)
    vae = tiny_vae()
    torch.manual_seed(seed)
    text_encoder = tiny_text_encoder(len(tokenizer))
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": kdpm2_scheduler(),
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }


def tiny_components(seed: int = 0) -> dict:
    """Components for ``StableDiffusionPipeline`` / ``StableDiffusionImg2ImgPipeline``."""
    return _components(4, seed)


def inpaint_components(seed: int = 0) -> dict:
    """Components for ``StableDiffusionInpaintPipeline`` (9-channel UNet input)."""
    return _components(9, seed)


def gradient_image(size: int = IMAGE_SIZE) -> Image.Image:
    """A deterministic RGB gradient test image."""
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    red = np.tile(ramp[None, :], (size, 1))
    green = np.tile(ramp[:, None], (1, size))
    blue = 0.5 + 0.5 * np.sin(6.0 * (red + green))
    rgb = np.stack([red, green, blue], axis=-1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def rectangle_mask(size: int = IMAGE_SIZE) -> Image.Image:
    """A deterministic mask: white (repaint) rectangle on black (keep)."""
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[size // 4 : 3 * size // 4, size // 8 : 5 * size // 8] = 255
    return Image.fromarray(mask)


def _common_kwargs(pipe, steps, seed):
    """Shared call arguments; also silences the pipeline's progress bar."""
    pipe.set_progress_bar_config(disable=True)
    return {
        "prompt": PROMPT,
        "num_inference_steps": steps,
        "guidance_scale": GUIDANCE_SCALE,
        "generator": torch.Generator().manual_seed(seed),
        "output_type": "np",
        "height": IMAGE_SIZE,
        "width": IMAGE_SIZE,
    }


def txt2img(pipe, steps: int = 10, seed: int = 0) -> np.ndarray:
    """Run a text-to-image pipeline and return the image array."""
    return pipe(**_common_kwargs(pipe, steps, seed)).images


def img2img(pipe, steps: int = 10, seed: int = 0, strength: float = 0.6) -> np.ndarray:
    """Run an image-to-image pipeline on :func:`gradient_image`."""
    kwargs = _common_kwargs(pipe, steps, seed)
    del kwargs["height"], kwargs["width"]
    return pipe(image=gradient_image(), strength=strength, **kwargs).images


def inpaint(pipe, steps: int = 10, seed: int = 0, strength: float = 1.0) -> np.ndarray:
    """Run an inpainting pipeline on :func:`gradient_image` / :func:`rectangle_mask`."""
    kwargs = _common_kwargs(pipe, steps, seed)
    return pipe(image=gradient_image(), mask_image=rectangle_mask(), strength=strength, **kwargs).images
