"""A 4-step schedule with its own distilled adaptor (issue #21 part 3; PAPER.md: unrolled distillation matters most
at 4 steps, and the adaptor is tied to the step count): ``cw-export distill --steps 4`` then a ``--steps 4`` build
with it, run by the runtime as the torch split loop runs it; an adaptor of the other step count is refused by the
build, and the 4-step bundle by ``cw-export run --steps 8``, each with one line and exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import torch

from cw_export.distill.checkpoint import read_checkpoint, save_checkpoint


def _cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cw_export.cli", *args], capture_output=True, text=True, env=env)


def _refused(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], result.stderr


def test_four_step_adaptor_is_distilled_built_run_and_tied_to_its_steps(tiny_model, tmp_path):
    from cw_export.adaptor import build_adaptor
    from cw_export.reference import text_embeddings, torch_split_trajectory
    from cw_export.runtime.noise import seeded_noise

    env = {**os.environ, "CW_EXPORT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    four = tmp_path / "adaptor4.safetensors"
    distilled = _cli(env, "distill", "--model", "tiny-random", "--target", "cpu-fp32", "--steps", "4", "--num-prompts", "4", "--epochs", "2",
                     "--lr", "3e-3", "--out", str(four), "--quiet")
    assert distilled.returncode == 0, distilled.stderr
    checkpoint = read_checkpoint(four)
    assert (checkpoint.training["steps"], checkpoint.training["clock"]) == (4, 2)
    assert checkpoint.training["adaptor_steps"] == [1, 3]

    bundle = tmp_path / "bundle"
    built = _cli(env, "--model", "tiny-random", "--target", "cpu-fp32", "--steps", "4", "--adaptor", "learned", "--adaptor-checkpoint",
                 str(four), "--out", str(bundle), "--quiet")
    assert built.returncode == 0, built.stderr
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["schedule"]["step_kinds"] == ["full", "clocked", "full", "clocked"]
    assert manifest["adaptor"]["kind"] == "learned"
    assert manifest["adaptor"]["checkpoint_sha256"] == checkpoint.sha256
    assert manifest["adaptor"]["training"]["steps"] == 4
    assert "adaptor" in manifest["wiring"]["steps"]["clocked"]

    out = tmp_path / "latents.npy"
    ran = _cli(env, "run", str(bundle), "--prompt", "a red circle", "--seed", "3", "--latents-out", str(out))
    assert ran.returncode == 0, ran.stderr
    hidden, pooled = text_embeddings(tiny_model, "a red circle")
    noise = torch.from_numpy(seeded_noise(manifest["latent"]["shape"], 3))
    adaptor = build_adaptor(checkpoint.config, checkpoint.state_dict)
    guidance = manifest["guidance_scale"]
    learned = torch_split_trajectory(tiny_model, hidden, pooled, noise, 4, clock=2, guidance_scale=guidance,
                                     adaptor=adaptor).latents
    identity = torch_split_trajectory(tiny_model, hidden, pooled, noise, 4, clock=2, guidance_scale=guidance).latents
    scale = float(np.abs(learned).max())
    ours = np.load(out)
    assert float(np.abs(ours - learned).max()) <= 1e-4 * scale
    assert float(np.abs(ours - identity).max()) > 1e-3 * scale, "the 4-step adaptor must act on steps 2 and 4"

    # the adaptor is tied to its step count, both ways
    _refused(_cli(env, "--model", "tiny-random", "--target", "cpu-fp32", "--steps", "8", "--adaptor", "learned", "--adaptor-checkpoint",
                  str(four), "--out", str(tmp_path / "b8"), "--quiet"),
             "distilled for steps 4 but the build uses steps 8")
    eight = tmp_path / "adaptor8.safetensors"
    save_checkpoint(eight, checkpoint.state_dict, checkpoint.config,
                    {**checkpoint.training, "steps": 8, "adaptor_steps": [1, 3, 5, 7]}, checkpoint.epochs_done)
    _refused(_cli(env, "--model", "tiny-random", "--target", "cpu-fp32", "--steps", "4", "--adaptor", "learned", "--adaptor-checkpoint",
                  str(eight), "--out", str(tmp_path / "b4"), "--quiet"),
             "distilled for steps 8 but the build uses steps 4")
    _refused(_cli(env, "run", str(bundle), "--prompt", "x", "--seed", "0", "--steps", "8",
                  "--latents-out", str(tmp_path / "o8.npy")),
             "learned adaptor was distilled for 4 steps at clock 2, not 8 steps at clock 2")
    clock1 = _cli(env, "run", str(bundle), "--prompt", "x", "--seed", "0", "--steps", "8", "--clock", "1",
                  "--latents-out", str(tmp_path / "o1.npy"))  # clock 1 never calls the adaptor
    assert clock1.returncode == 0, clock1.stderr
    assert not (tmp_path / "b8").exists() and not (tmp_path / "b4").exists() and not (tmp_path / "o8.npy").exists()
