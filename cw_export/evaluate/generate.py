"""Generate images from an SDModel in torch, for evaluation: full FP32 (clock 1) and the Clockwork reference (clock N).

Clock 1 runs diffusers' ``StableDiffusionPipeline`` with the model's own sampler config (DPM++ 2M by default); clock N
runs ``cw_export.reference.torch_trajectory`` (identity adaptor: up_blocks[-2]'s output cached on full steps) and decodes
with the VAE exactly as the pipeline does. Both start from the same initial noise, one seed per image
(``seed + index``), so the two variants of one caption are directly comparable and batching does not change results.
"""

from __future__ import annotations

import numpy as np
import torch

DEFAULT_STEPS = 8
DEFAULT_GUIDANCE = 7.5


def initial_noise(model, n: int, seed: int, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """N x C x h x w standard normal latents, image i drawn from torch.Generator seeded ``seed + i``."""
    factor = model.vae_scale_factor
    h = (height or model.default_latent_size * factor) // factor
    w = (width or model.default_latent_size * factor) // factor
    c = model.unet.config.in_channels
    return torch.stack([torch.randn((c, h, w), generator=torch.Generator().manual_seed(seed + i)) for i in range(n)])


def _pipeline(model):
    from diffusers import StableDiffusionPipeline

    from ..reference import make_scheduler

    pipe = StableDiffusionPipeline(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
        scheduler=make_scheduler(model), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def decode(model, latents: torch.Tensor) -> np.ndarray:
    """Latents -> N x H x W x 3 float32 in 0..1 (StableDiffusionPipeline's ``output_type="np"`` post-processing)."""
    images = model.vae.decode(latents / model.vae.config.scaling_factor).sample
    return (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().numpy()


@torch.no_grad()
def generate_images(model, captions: list[str], seed: int = 0, steps: int = DEFAULT_STEPS, clock: int = 1,
                    guidance_scale: float = DEFAULT_GUIDANCE, batch_size: int = 64, height: int | None = None,
                    width: int | None = None) -> np.ndarray:
    """N x H x W x 3 float32 images in 0..1, one per caption."""
    from ..reference import torch_trajectory

    noise = initial_noise(model, len(captions), seed, height, width)
    out = []
    pipe = _pipeline(model) if clock == 1 else None
    for start in range(0, len(captions), batch_size):
        chunk, latents = captions[start:start + batch_size], noise[start:start + batch_size]
        if pipe is not None:
            result = pipe(chunk, latents=latents.clone(), num_inference_steps=steps, guidance_scale=guidance_scale,
                          height=latents.shape[-2] * model.vae_scale_factor,
                          width=latents.shape[-1] * model.vae_scale_factor, output_type="np")
            out.append(np.asarray(result.images, dtype=np.float32))
        else:
            ids = model.tokenize([""] * len(chunk) + list(chunk))
            embeds = model.text_encoder(input_ids=ids).last_hidden_state
            traj = torch_trajectory(model, embeds, latents, steps, clock=clock, guidance_scale=guidance_scale)
            out.append(decode(model, torch.from_numpy(traj.latents)))
    return np.concatenate(out)
