"""Tiny, randomly initialised flow-matching pipelines (Stable Diffusion 3 and Flux) for compatibility tests.

Built offline: a one-layer transformer from a small config with weights from ``torch.manual_seed``, no VAE
(the pipelines return latents) and no text encoders (the prompt embeddings are passed in, drawn at random).
The schedulers are diffusers' ``FlowMatchEulerDiscreteScheduler`` with the SD3-medium and Flux-dev configs.
"""

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from flow_configs import FLUX_DEV, SD3_MEDIUM

IMAGE_SIZE = 32  # pixels; without a VAE the pipelines take a latent 8 times smaller: 4x4
TEXT_DIM = 32
TEXT_TOKENS = 6


def sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // 8,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        caption_projection_dim=16,
        pooled_projection_dim=TEXT_DIM,
        out_channels=4,
        pos_embed_max_size=8,
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(SD3_MEDIUM)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )


def flux_pipeline(seed: int = 0) -> FluxPipeline:
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=TEXT_DIM,
        axes_dims_rope=[4, 4, 8],
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(FLUX_DEV)
    return FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
    )


def prompt_inputs(pipe, seed: int = 1, dtype=torch.float32) -> dict:
    """Random prompt embeddings of the shapes the pipeline's transformer takes, and the initial latents."""
    generator = torch.Generator().manual_seed(seed)
    embeds = torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=generator, dtype=dtype)
    pooled = torch.randn(1, TEXT_DIM, generator=generator, dtype=dtype)
    channels = pipe.transformer.config.in_channels
    if isinstance(pipe, FluxPipeline):  # packed 2x2 patches of a (in_channels / 4)-channel latent: 4 tokens
        latents = torch.randn(1, (IMAGE_SIZE // 16) ** 2, channels, generator=generator, dtype=dtype)
    else:
        latents = torch.randn(1, channels, IMAGE_SIZE // 8, IMAGE_SIZE // 8, generator=generator, dtype=dtype)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "latents": latents}


def run(pipe, steps=None, sigmas=None, **inputs):
    """The final latents of a txt2img run without guidance."""
    extra = {} if isinstance(pipe, FluxPipeline) else {"guidance_scale": 1.0}
    with torch.no_grad():
        out = pipe(
            num_inference_steps=steps,
            sigmas=sigmas,
            height=IMAGE_SIZE,
            width=IMAGE_SIZE,
            output_type="latent",
            **extra,
            **inputs,
        )
    return out.images
