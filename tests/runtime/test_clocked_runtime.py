"""The numpy + onnxruntime runtime against diffusers' scheduler and the original torch UNet."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from cw_export.reference import make_scheduler, text_embeddings, torch_trajectory
from cw_export.runtime.pipeline import BundleRunner


def _rel(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


@pytest.fixture(scope="module")
def inputs(tiny_model, fp32_bundle):
    hidden, pooled = text_embeddings(tiny_model, "a small blue circle at the top")
    shape = BundleRunner(fp32_bundle).latent_shape()
    noise = np.random.default_rng(7).standard_normal(shape, dtype=np.float32)
    return hidden, pooled, noise


@pytest.mark.parametrize("steps", [4, 8])
def test_clock1_matches_diffusers_step_for_step(tiny_model, fp32_bundle, inputs, steps):
    hidden, pooled, noise = inputs
    ours = BundleRunner(fp32_bundle).generate(hidden.numpy(), pooled.numpy(), noise, steps=steps, clock=1)
    ref = torch_trajectory(tiny_model, hidden, torch.from_numpy(noise), steps, clock=1, guidance_scale=7.5)
    assert ours.timesteps == ref.timesteps
    for i, (a, b) in enumerate(zip(ours.step_latents, ref.step_latents)):
        assert _rel(a, b) <= 1e-4, f"step {i}"
    assert _rel(ours.latents, ref.latents) <= 1e-4


def test_timesteps_equal_diffusers(tiny_model, fp32_bundle):
    import json

    manifest = json.loads((fp32_bundle / "manifest.json").read_text())
    scheduler = make_scheduler(tiny_model)
    scheduler.set_timesteps(manifest["schedule"]["steps"])
    assert manifest["sampler"]["step_table"]["timesteps"] == [int(t) for t in scheduler.timesteps]


def test_identity_clock2_matches_torch_cache_and_reuse_reference(tiny_model, fp32_bundle, inputs):
    """Reference: the original UNet with a hook that caches up_blocks[-2]'s output and reuses it on clocked steps."""
    hidden, pooled, noise = inputs
    ours = BundleRunner(fp32_bundle).generate(hidden.numpy(), pooled.numpy(), noise, steps=8, clock=2)
    ref = torch_trajectory(tiny_model, hidden, torch.from_numpy(noise), 8, clock=2, guidance_scale=7.5)
    assert ours.kinds == ["full", "clocked"] * 4
    assert _rel(ours.latents, ref.latents) <= 1e-4
    full = torch_trajectory(tiny_model, hidden, torch.from_numpy(noise), 8, clock=1, guidance_scale=7.5)
    assert _rel(ours.latents, full.latents) > 1e-3, "clocked steps must actually skip low_res"


def test_identity_clock3_matches_torch_reference(tiny_model, fp32_bundle, inputs):
    """Clock 3: the second clocked step of a run reads the cache its clocked predecessor refreshed (the README)."""
    hidden, pooled, noise = inputs
    ours = BundleRunner(fp32_bundle).generate(hidden.numpy(), pooled.numpy(), noise, steps=7, clock=3)
    ref = torch_trajectory(tiny_model, hidden, torch.from_numpy(noise), 7, clock=3, guidance_scale=7.5)
    assert ours.kinds == ["full", "clocked", "clocked"] * 2 + ["full"]
    assert _rel(ours.latents, ref.latents) <= 1e-4
    clock2 = torch_trajectory(tiny_model, hidden, torch.from_numpy(noise), 7, clock=2, guidance_scale=7.5)
    assert _rel(ours.latents, clock2.latents) > 1e-3


def test_clocked_steps_do_not_run_low_res(fp32_bundle, inputs):
    hidden, pooled, noise = inputs
    runner = BundleRunner(fp32_bundle)
    ran: list[tuple[int, str]] = []
    original = runner.run_graph

    def spy(graph, slots):
        ran.append((len([g for g in ran if g[1] == "high_res_in"]), graph))
        original(graph, slots)

    runner.run_graph = spy
    runner.generate(hidden.numpy(), pooled.numpy(), noise, steps=4, clock=2)
    low_res_steps = [step for step, graph in ran if graph == "low_res"]
    assert low_res_steps == [1, 3]  # counted after high_res_in of steps 1 and 3 (1-indexed)


def test_runtime_imports_no_torch_diffusers_or_transformers(fp32_bundle, tmp_path):
    code = (
        "import sys\n"
        "from cw_export.cli.run import run_command\n"
        "from cw_export.runtime.pipeline import BundleRunner\n"
        f"r = BundleRunner({str(fp32_bundle)!r})\n"
        "h, p = r.encode_prompt('a red square')\n"
        "import numpy as np\n"
        "t = r.generate(h, p, np.zeros(r.latent_shape(), np.float32), steps=2, clock=2)\n"
        "from cw_export.runtime.image import encode_png\n"
        "encode_png(r.decode(t.latents))\n"
        "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
        "print('LOADED', bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_runtime_tokenizer_plus_text_encoder_match_torch(tiny_model, fp32_bundle):
    runner = BundleRunner(fp32_bundle)
    hidden, pooled = runner.encode_prompt("a large green square in the center")
    ref_hidden, ref_pooled = text_embeddings(tiny_model, "a large green square in the center")
    assert _rel(hidden, ref_hidden.numpy()) <= 1e-5
    assert _rel(pooled, ref_pooled.numpy()) <= 1e-5


def test_vae_decoder_graph_matches_diffusers_postprocessing(tiny_model, fp32_bundle, inputs):
    """Bundle decode == diffusers: vae.decode(latents / scaling_factor), then (x / 2 + 0.5).clamp(0, 1) -> uint8."""
    from diffusers.image_processor import VaeImageProcessor

    hidden, pooled, noise = inputs
    runner = BundleRunner(fp32_bundle)
    latents = runner.generate(hidden.numpy(), pooled.numpy(), noise, steps=4, clock=2).latents
    ours = runner.decode(latents)
    with torch.no_grad():
        decoded = tiny_model.vae.decode(torch.from_numpy(latents) / tiny_model.vae.config.scaling_factor).sample
    expected = VaeImageProcessor().postprocess(decoded, output_type="np")[0]
    assert ours.shape == (32, 32, 3) and ours.dtype == np.uint8
    assert np.max(np.abs(ours.astype(int) - np.round(expected * 255).astype(int))) <= 1


def test_runner_from_sessions_runs_the_same_loop(fp32_bundle, inputs):
    """``BundleRunner.from_sessions`` (calibration and parity, before a bundle exists) runs the loop of a bundle
    runner over the same sessions bit for bit, and only the graphs it was given."""
    hidden, pooled, noise = inputs
    loaded = BundleRunner(fp32_bundle)
    ours = loaded.generate(hidden.numpy(), pooled.numpy(), noise, steps=4, clock=2)
    sessions = {g: loaded.session(g) for g in ("high_res_in", "low_res", "high_res_out")}
    given = BundleRunner.from_sessions(loaded.manifest, sessions)
    again = given.generate(hidden.numpy(), pooled.numpy(), noise, steps=4, clock=2)
    assert np.array_equal(ours.latents, again.latents) and given.bundle is None
    with pytest.raises(KeyError, match="vae_decoder"):
        given.decode(ours.latents)
