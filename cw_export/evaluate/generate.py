"""Generate images for evaluation: full FP32 (clock 1), the Clockwork reference (clock N) and a bundle.

Clock 1 runs diffusers' ``StableDiffusionPipeline`` with the model's own sampler config (DPM++ 2M by default); clock N
runs ``cw_export.reference.torch_trajectory`` (identity adaptor: up_blocks[-2]'s output cached on full steps), or
``torch_split_trajectory`` with a learned adaptor, and decodes with the VAE exactly as the pipeline does.
``bundle_images`` runs a bundle through the numpy + onnxruntime runtime. All start from the same initial noise, one
seed per image (``seed + index``), so the variants of one caption are directly comparable and batching does not
change results. ``initial_noise`` draws it with torch (tools/eval_builtin.py, docs/builtin_model.md);
``runtime_noise`` with numpy exactly as ``cw-export run --seed`` does, so a bundle image can be reproduced by hand.
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


def runtime_noise(shape: list[int] | tuple[int, ...], n: int, seed: int) -> np.ndarray:
    """N x C x h x w float32 unit noise; image i is what ``cw-export run --seed (seed + i)`` draws for ``shape``
    [1, C, h, w] (numpy PCG64), so any evaluated bundle image can be regenerated with the run command."""
    from ..runtime.noise import seeded_noise

    return np.concatenate([seeded_noise(shape, seed + i) for i in range(n)])


def _pipeline(model, sampler: str = "dpmpp_2m"):
    from diffusers import StableDiffusionPipeline

    from ..reference import make_scheduler

    pipe = StableDiffusionPipeline(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
        scheduler=make_scheduler(model, sampler), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
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
                    width: int | None = None, noise: np.ndarray | torch.Tensor | None = None,
                    sampler: str = "dpmpp_2m", adaptor: torch.nn.Module | None = None) -> np.ndarray:
    """N x H x W x 3 float32 images in 0..1, one per caption.

    ``noise``: the N initial latents (default ``initial_noise(model, N, seed)``); ``adaptor``: a learned adaptor for
    the clocked steps (clock > 1; default the identity adaptor).
    """
    from ..reference import torch_split_trajectory, torch_trajectory

    if noise is None:
        noise = initial_noise(model, len(captions), seed, height, width)
    noise = torch.as_tensor(noise, dtype=torch.float32)
    if len(noise) != len(captions):
        raise ValueError(f"{len(noise)} initial latents for {len(captions)} captions")
    out = []
    pipe = _pipeline(model, sampler) if clock == 1 else None
    split = None
    if adaptor is not None and clock > 1:
        from ..split import split_unet

        split = split_unet(model.unet)
    for start in range(0, len(captions), batch_size):
        chunk, latents = captions[start:start + batch_size], noise[start:start + batch_size]
        if pipe is not None:
            result = pipe(chunk, latents=latents.clone(), num_inference_steps=steps, guidance_scale=guidance_scale,
                          height=latents.shape[-2] * model.vae_scale_factor,
                          width=latents.shape[-1] * model.vae_scale_factor, output_type="np")
            out.append(np.asarray(result.images, dtype=np.float32))
            continue
        ids = model.tokenize([""] * len(chunk) + list(chunk))
        encoded = model.text_encoder(input_ids=ids)
        if split is None:
            traj = torch_trajectory(model, encoded.last_hidden_state, latents, steps, clock=clock,
                                    guidance_scale=guidance_scale, sampler=sampler)
        else:
            traj = torch_split_trajectory(model, encoded.last_hidden_state, encoded.pooler_output, latents, steps,
                                          clock=clock, guidance_scale=guidance_scale, sampler=sampler,
                                          adaptor=adaptor, split=split)
        out.append(decode(model, torch.from_numpy(traj.latents)))
    return np.concatenate(out)


def bundle_images(runner, captions: list[str], noise: np.ndarray, on_image=None) -> np.ndarray:
    """N x H x W x 3 uint8 images from a bundle (``runtime.pipeline.BundleRunner``; its steps, clock, guidance),
    one caption and one [1, C, h, w] slice of ``noise`` per image: exactly what ``cw-export run`` computes.
    ``on_image(i)`` is called after each image (progress)."""
    out = []
    for i, caption in enumerate(captions):
        hidden, pooled = runner.encode_prompt(caption)
        trajectory = runner.generate(hidden, pooled, noise[i:i + 1])
        out.append(runner.decode(trajectory.latents))
        if on_image is not None:
            on_image(i)
    return np.stack(out)
