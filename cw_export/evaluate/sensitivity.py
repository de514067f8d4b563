"""The paper's sensitivity experiment: perturb low-res vs high-res UNet features at one sampling step.

Why: Clockwork rests on the observation (PAPER.md "Observation") that the low-resolution features change little and
tolerate perturbation, while high-resolution ones do not; this measures it on a model of ours. At step ``i`` only, one
site of the Clockwork split (``cw_export.split``) is perturbed as in the paper,

    f <- mu + sqrt(alpha) (f - mu) + sqrt(1 - alpha) z,   z ~ N(0, sigma^2)

with mu, sigma the mean and standard deviation of f per sample and channel (over the spatial positions), so the
perturbed feature keeps its first two moments but only alpha of its content (the paper: alpha = 0.3). Sites:

  r_out          the low-res part's output (up_blocks[-2] before its upsampler): what the adaptor replaces
  skips          the high-res skip connections (conv_in and down_blocks[0] outputs) that high_res_out reads
  high_res_up    the output of the last, high-res up block (up_blocks[-1]), just before the output convolution

The rest of the trajectory runs unperturbed (full UNet every step, the model's DPM++ 2M sampler, classifier-free
guidance). Damage is measured against the unperturbed trajectory from the same noise: final-latent PSNR (the parity
report's convention, ``10 log10(max|ref|^2 / MSE)``), decoded-image PSNR, and the prompt accuracy of the images.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..runtime.image import psnr

SITES = ("r_out", "skips", "high_res_up")
LOW_RES_SITES = ("r_out",)
PAPER_ALPHA = 0.3


def perturb(feature: torch.Tensor, alpha: float, generator: torch.Generator) -> torch.Tensor:
    """PAPER.md's perturbation with per-(sample, channel) mean and std over the spatial positions."""
    mu = feature.mean(dim=(-2, -1), keepdim=True)
    sigma = feature.std(dim=(-2, -1), keepdim=True)
    z = torch.randn(feature.shape, generator=generator, dtype=feature.dtype) * sigma
    return mu + math.sqrt(alpha) * (feature - mu) + math.sqrt(1.0 - alpha) * z


@torch.no_grad()
def perturbed_latents(model, split, hidden: torch.Tensor, noise: torch.Tensor, steps: int, site: str | None = None,
                      at_step: int = -1, alpha: float = PAPER_ALPHA, guidance_scale: float = 7.5,
                      seed: int = 0) -> np.ndarray:
    """Final latents of a full-UNet trajectory (batch: ``hidden`` = [uncond x B, cond x B], ``noise`` B latents)
    with ``site`` perturbed at step ``at_step`` only; ``site=None`` is the unperturbed reference."""
    from ..reference import make_scheduler

    if site is not None and site not in SITES:
        raise ValueError(f"unknown site {site!r}; valid: {', '.join(SITES)}")
    scheduler = make_scheduler(model)
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    latents = noise.float() * scheduler.init_noise_sigma
    state = {"active": False}

    def hook(module, inputs, output):  # high_res_up: the last up block's output
        return perturb(output, alpha, generator) if state["active"] else output

    handle = split.high_res_out.up_block.register_forward_hook(hook) if site == "high_res_up" else None
    try:
        for i, t in enumerate(scheduler.timesteps):
            active = i == at_step
            model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            timestep = torch.full((model_input.shape[0],), float(t))
            temb, r_in, *skips = split.high_res_in(model_input, timestep, hidden)
            r_out = split.low_res(r_in, temb, hidden)
            if active and site == "r_out":
                r_out = perturb(r_out, alpha, generator)
            if active and site == "skips":
                skips = [perturb(s, alpha, generator) for s in skips]
            state["active"] = active
            noise_pred = split.high_res_out(r_out, temb, hidden, *skips)
            uncond, cond = noise_pred.chunk(2)
            latents = scheduler.step(uncond + guidance_scale * (cond - uncond), t, latents).prev_sample
    finally:
        if handle is not None:
            handle.remove()
    return latents.numpy()


def sensitivity_sweep(model, captions: list[str], steps: int = 8, sites: tuple[str, ...] = SITES,
                      alpha: float = PAPER_ALPHA, guidance_scale: float = 7.5, seed: int = 0,
                      on_run=None) -> dict:
    """{"reference": {...}, site: {"latent_psnr_db": [per step], "image_psnr_db": [...], "prompt_accuracy": [...]}}.

    Image k starts from ``runtime_noise`` seed ``seed + k`` (as ``cw-export run --seed``); each (site, step) is one
    batched trajectory of all captions. ``on_run(site, step)`` is called after each (progress).
    """
    from ..split import split_unet
    from .classifier import load_classifier
    from .generate import decode, runtime_noise
    from .metrics import evaluate_images

    c, h = model.unet.config.in_channels, model.default_latent_size
    noise = torch.from_numpy(runtime_noise([1, c, h, h], len(captions), seed))
    ids = model.tokenize([""] * len(captions) + list(captions))
    with torch.no_grad():
        hidden = model.text_encoder(input_ids=ids).last_hidden_state
    split = split_unet(model.unet)
    classifier = load_classifier()

    reference = perturbed_latents(model, split, hidden, noise, steps, guidance_scale=guidance_scale)
    ref_images = decode(model, torch.from_numpy(reference))
    peak = float(np.max(np.abs(reference)))
    report: dict = {"settings": {"steps": steps, "alpha": alpha, "guidance_scale": guidance_scale, "seed": seed,
                                 "n": len(captions)},
                    "reference": {"prompt_accuracy": evaluate_images(ref_images, captions,
                                                                     classifier=classifier)["prompt_accuracy"]}}
    for site in sites:
        rows = {"latent_psnr_db": [], "image_psnr_db": [], "prompt_accuracy": []}
        for step in range(steps):
            latents = perturbed_latents(model, split, hidden, noise, steps, site, step, alpha, guidance_scale,
                                        seed=seed * 1000 + step)
            images = decode(model, torch.from_numpy(latents))
            rows["latent_psnr_db"].append(round(psnr(reference, latents, peak), 3))
            rows["image_psnr_db"].append(round(psnr(ref_images, images, 1.0), 3))
            rows["prompt_accuracy"].append(evaluate_images(images, captions, classifier=classifier)["prompt_accuracy"])
            if on_run is not None:
                on_run(site, step)
        report[site] = rows
    return report
