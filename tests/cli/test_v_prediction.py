"""A v-prediction model (SD 2.1's parameterisation) end to end: a model folder whose scheduler config says
``v_prediction`` builds, its manifest records it, and ``cw-export run`` at clock 1 is diffusers'
StableDiffusionPipeline step for step (issue #21 part 3)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

STEPS = 4
GUIDANCE = 7.5
PROMPT = "a red circle on the left"


def cw(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cw_export.cli", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def v_folder(tiny_model, tmp_path_factory) -> Path:
    """The tiny-random pipeline written as a folder, its scheduler switched to v-prediction (as SD 2.1 768 ships)."""
    from cw_export.models.pipeline import save_model

    folder = save_model(tiny_model, tmp_path_factory.mktemp("vpred") / "model")
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    assert config["prediction_type"] == "epsilon"
    config_path.write_text(json.dumps({**config, "prediction_type": "v_prediction"}))
    return folder


def _diffusers_pipeline(folder: Path, sampler_config: dict, **overrides):
    """StableDiffusionPipeline from the folder, its scheduler DPM++ 2M configured as the bundle's sampler."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config({**sampler_config, **overrides})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline_latents(pipe, embeds: tuple[torch.Tensor, torch.Tensor], init: np.ndarray) -> list[np.ndarray]:
    """Latents after each step of diffusers' own denoising loop (output_type='latent': no VAE)."""
    seen: list[np.ndarray] = []

    def record(pipeline, i, t, kwargs):
        seen.append(kwargs["latents"].numpy().copy())
        return kwargs

    cond, uncond = embeds
    with torch.no_grad():
        final = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=torch.from_numpy(init),
                     num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="latent",
                     callback_on_step_end=record).images.numpy()
    np.testing.assert_array_equal(seen[-1], final)
    return seen


def test_v_prediction_folder_builds_and_runs_as_diffusers_pipeline(v_folder, tmp_path):
    from cw_export.models.pipeline import load_model_folder
    from cw_export.reference import torch_split_trajectory, torch_trajectory
    from cw_export.runtime.pipeline import BundleRunner

    torch.set_num_threads(1)
    bundle = tmp_path / "bundle"
    built = cw("--model", str(v_folder), "--target", "cpu-fp32", "--steps", str(STEPS), "--guidance", str(GUIDANCE),
               "--out", str(bundle), "--quiet")
    assert built.returncode == 0, built.stderr
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["sampler"]["config"]["prediction_type"] == "v_prediction"
    assert manifest["sampler"]["step_table"]["prediction_type"] == "v_prediction"
    assert manifest["schedule"]["step_kinds"] == ["full", "clocked", "full", "clocked"]

    pipe = _diffusers_pipeline(v_folder, manifest["sampler"]["config"])
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(PROMPT, "cpu", 1, True, negative_prompt="")
    init = np.random.default_rng(7).standard_normal(manifest["latent"]["shape"]).astype(np.float32)
    expected = _pipeline_latents(pipe, (cond, uncond), init)

    embeds, init_file = tmp_path / "embeds.npz", tmp_path / "init.npy"
    np.savez(embeds, cond=cond.numpy(), uncond=uncond.numpy())
    np.save(init_file, init)
    finals = {}
    for clock in (1, 2):
        out = tmp_path / f"clock{clock}.npy"
        ran = cw("run", str(bundle), "--text-embeds", str(embeds), "--init-latents", str(init_file),
                 "--clock", str(clock), "--latents-out", str(out))
        assert ran.returncode == 0, ran.stderr
        finals[clock] = np.load(out)
    scale = float(np.abs(expected[-1]).max())
    np.testing.assert_allclose(finals[1], expected[-1], rtol=0, atol=1e-5 * scale)

    # step for step: the runtime's latents after every step (the run command's loop, via its Python API)
    hidden = torch.cat([uncond, cond]).numpy()
    steps = BundleRunner(bundle).generate(hidden, None, init, clock=1).step_latents
    assert len(steps) == len(expected) == STEPS
    for i, (ours, theirs) in enumerate(zip(steps, expected)):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5 * scale, err_msg=f"step {i + 1}")

    # the torch reference (validate's ground truth) and the distillation teacher's split loop read v as well
    model = load_model_folder(v_folder)
    reference = torch_trajectory(model, torch.cat([uncond, cond]), torch.from_numpy(init), STEPS, clock=1,
                                 guidance_scale=GUIDANCE)
    teacher = torch_split_trajectory(model, torch.cat([uncond, cond]), None, torch.from_numpy(init), STEPS, clock=1,
                                     guidance_scale=GUIDANCE)
    for name, run in (("torch_trajectory", reference), ("torch_split_trajectory", teacher)):
        np.testing.assert_allclose(run.latents, expected[-1], rtol=0, atol=1e-5 * scale, err_msg=name)

    # clock 2 skips low_res on steps 2 and 4: it must move the result well beyond the parity tolerance
    assert float(np.abs(finals[2] - finals[1]).max()) > 1e-2 * scale
    # and the prediction type matters: the same pipeline read as epsilon lands elsewhere
    as_epsilon = _pipeline_latents(_diffusers_pipeline(v_folder, manifest["sampler"]["config"],
                                                       prediction_type="epsilon"), (cond, uncond), init)
    assert float(np.abs(as_epsilon[-1] - finals[1]).max()) > 1e-1 * scale
