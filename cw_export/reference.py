"""Torch reference trajectories: diffusers' scheduler + the original UNet, optionally clocked.

Used as ground truth for the bundle runtime (tests, ``validate``) and as the teacher in calibration and
distillation. The clocked reference does not use ``split``: a forward hook on ``up_blocks[-2]`` caches its output on
full steps and replaces it on clocked steps (the official Clockwork wrapper's identity adaptor), so it checks the
split independently.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .contract.schedule import CLOCKED, step_kinds


@dataclass
class TorchTrajectory:
    latents: np.ndarray
    step_latents: list[np.ndarray] = field(default_factory=list)
    timesteps: list[int] = field(default_factory=list)


def make_scheduler(model, sampler: str = "dpmpp_2m"):
    """The diffusers scheduler our numpy sampler ports (checked step by step in the tests)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    classes = {"dpmpp_2m": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler, "ddim": DDIMScheduler}
    config = {k: v for k, v in model.scheduler_config.items() if not k.startswith("_")}
    return classes[sampler].from_config(config)


class _IdentityClockHook:
    """Caches up_blocks[-2]'s output on full steps; returns the cached tensor on clocked steps."""

    def __init__(self) -> None:
        self.clocked = False
        self.cached: torch.Tensor | None = None

    def __call__(self, module, inputs, output):
        if self.clocked:
            return self.cached
        self.cached = output
        return output


def added_conditioning(model, pooled_text: torch.Tensor | None, latents: torch.Tensor) -> dict | None:
    """SDXL's ``added_cond_kwargs`` for the UNet (pooled text + StableDiffusionXLPipeline's default time ids for
    the image size of ``latents``); None for a UNet without text_time conditioning."""
    from .split import has_text_time, sdxl_time_ids

    if not has_text_time(model.unet):
        return None
    if pooled_text is None:
        raise ValueError("an SDXL-style UNet needs the pooled text (text_embeds)")
    height, width = (int(d) * model.vae_scale_factor for d in latents.shape[-2:])
    time_ids = torch.tensor([sdxl_time_ids(height, width)] * pooled_text.shape[0], device=pooled_text.device)
    return {"text_embeds": pooled_text, "time_ids": time_ids}


def torch_trajectory(
    model,
    encoder_hidden_states: torch.Tensor,
    init_latents: torch.Tensor,
    steps: int,
    clock: int = 1,
    guidance_scale: float = 7.5,
    sampler: str = "dpmpp_2m",
    pooled_text: torch.Tensor | None = None,
) -> TorchTrajectory:
    """Sample with the original UNet; clock > 1 reuses up_blocks[-2]'s cached output (identity adaptor).
    ``pooled_text``: needed by SDXL-style UNets (their added conditioning), unread otherwise."""
    added = added_conditioning(model, pooled_text, init_latents)
    scheduler = make_scheduler(model, sampler)
    scheduler.set_timesteps(steps)
    kinds = step_kinds(steps, clock)
    hook = _IdentityClockHook()
    handle = model.unet.up_blocks[-2].register_forward_hook(hook)
    latents = init_latents.float() * scheduler.init_noise_sigma
    trajectory = TorchTrajectory(latents=np.empty(0), timesteps=[int(t) for t in scheduler.timesteps])
    try:
        with torch.no_grad():
            for i, t in enumerate(scheduler.timesteps):
                hook.clocked = kinds[i] == CLOCKED
                model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
                noise = model.unet(model_input, t, encoder_hidden_states=encoder_hidden_states,
                                   added_cond_kwargs=added).sample
                uncond, cond = noise.chunk(2)
                noise = uncond + guidance_scale * (cond - uncond)
                latents = scheduler.step(noise, t, latents).prev_sample
                trajectory.step_latents.append(latents.numpy().copy())
    finally:
        handle.remove()
    trajectory.latents = latents.numpy()
    return trajectory


def torch_split_trajectory(
    model,
    encoder_hidden_states: torch.Tensor,
    pooled_text: torch.Tensor | None,
    init_latents: torch.Tensor,
    steps: int,
    clock: int = 1,
    guidance_scale: float = 7.5,
    sampler: str = "dpmpp_2m",
    adaptor: torch.nn.Module | None = None,
    on_step=None,
    split=None,
) -> TorchTrajectory:
    """Sample through the Clockwork split the way the bundle runtime does, with diffusers' scheduler.

    Full steps run high_res_in -> low_res -> high_res_out; clocked steps replace low_res by
    ``adaptor(r_in, r_out_prev, temb, pooled_text)`` (a learned adaptor), or by r_out_prev when ``adaptor`` is None
    (identity). r_out_prev is the previous step's r_out, whichever produced it (the runtime's ``cache`` slot).
    ``on_step(i, kind, tensors)`` sees r_in, temb, r_out_prev (None at step 0) and r_out of each step, batch
    [uncond, cond]: with clock 1 these are the teacher's features that model-step distillation trains on.
    Runs on the device of ``init_latents`` (the split must live there too).
    """
    if split is None:
        from .split import split_unet

        split = split_unet(model.unet)
    added = added_conditioning(model, pooled_text, init_latents)
    time_ids = None if added is None else added["time_ids"]
    scheduler = make_scheduler(model, sampler)
    scheduler.set_timesteps(steps)
    kinds = step_kinds(steps, clock)
    latents = init_latents.float() * scheduler.init_noise_sigma
    trajectory = TorchTrajectory(latents=np.empty(0), timesteps=[int(t) for t in scheduler.timesteps])
    r_out_prev = None
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            timestep = torch.full((model_input.shape[0],), float(t), device=model_input.device)  # as the runtime feeds it
            temb, r_in, *skips = split.high_res_in(model_input, timestep, encoder_hidden_states, pooled_text, time_ids)
            if kinds[i] != CLOCKED:
                r_out = split.low_res(r_in, temb, encoder_hidden_states)
            elif adaptor is None:
                r_out = r_out_prev
            else:
                r_out = adaptor(r_in, r_out_prev, temb, pooled_text)
            if on_step is not None:
                on_step(i, kinds[i], {"r_in": r_in, "temb": temb, "r_out_prev": r_out_prev, "r_out": r_out})
            noise = split.high_res_out(r_out, temb, encoder_hidden_states, *skips)
            uncond, cond = noise.chunk(2)
            noise = uncond + guidance_scale * (cond - uncond)
            latents = scheduler.step(noise, t, latents).prev_sample
            trajectory.step_latents.append(latents.cpu().numpy().copy())
            r_out_prev = r_out
    trajectory.latents = latents.cpu().numpy()
    return trajectory


def decode_image(model, latents: np.ndarray) -> np.ndarray:
    """Final latents -> [H, W, 3] uint8 RGB through the torch VAE (the FP32 reference image)."""
    from .runtime.image import to_uint8

    with torch.no_grad():
        image = model.vae.decode(torch.from_numpy(latents) / model.vae.config.scaling_factor).sample
    return to_uint8((image / 2 + 0.5).clamp(0, 1).numpy())


def text_embeddings(model, prompt: str, negative_prompt: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """(encoder_hidden_states, pooled) for [uncond, cond], as diffusers' pipeline encodes them (SDXL: both
    encoders; an empty negative prompt is zeros where the model forces that, as StableDiffusionXLPipeline does)."""
    from .export.wrappers import text_graph

    with torch.no_grad():
        hidden, pooled = text_graph(model)(**model.text_feeds([negative_prompt, prompt]))
    if model.force_zeros_for_empty_prompt and not negative_prompt:
        hidden, pooled = hidden.clone(), pooled.clone()
        hidden[0], pooled[0] = 0.0, 0.0
    return hidden, pooled
