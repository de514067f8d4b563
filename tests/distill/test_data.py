"""Teacher data: pairs come from the teacher's full trajectory, at the clocked steps, with the previous step's r_out."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cw_export.contract.schedule import SamplingSchedule, adaptor_steps
from cw_export.distill.data import TeacherSettings, collect_teacher_data, unit_noise
from cw_export.prompts import prompt_set_hash
from cw_export.reference import text_embeddings, torch_split_trajectory, torch_trajectory

PROMPTS = ["a red square at the top left", "a small green circle in the center"]


def _settings(model, steps=6, clock=3, seed=5) -> TeacherSettings:
    return TeacherSettings(model_sha256=model.source["sha256"], prompts_sha256=prompt_set_hash(PROMPTS),
                           num_prompts=len(PROMPTS), schedule=SamplingSchedule("dpmpp_2m", steps, clock, 7.5),
                           latent_shape=(1, 4, 16, 16), seed=seed)


def _hooked_teacher(model, prompt: str, noise: np.ndarray, steps: int) -> dict[str, list[torch.Tensor]]:
    """r_in / temb / r_out of every step of the ORIGINAL UNet's clock-1 trajectory, read by hooks (no split)."""
    unet = model.unet
    seen: dict[str, list[torch.Tensor]] = {"r_in": [], "temb": [], "r_out": []}
    handles = [
        unet.down_blocks[0].register_forward_hook(lambda m, i, o: seen["r_in"].append(o[0].clone())),
        unet.time_embedding.register_forward_hook(lambda m, i, o: seen["temb"].append(o.clone())),
        unet.up_blocks[-2].upsamplers[0].register_forward_pre_hook(lambda m, a: seen["r_out"].append(a[0].clone())),
    ]
    try:
        hidden, _ = text_embeddings(model, prompt)
        torch_trajectory(model, hidden, torch.from_numpy(noise), steps, clock=1, guidance_scale=7.5)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _rel(actual: np.ndarray, expected: torch.Tensor) -> float:
    expected = expected.numpy() if isinstance(expected, torch.Tensor) else expected
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def _close(actual: np.ndarray, expected: torch.Tensor) -> None:
    """Equal up to float order: the teacher unrolls prompts in batches, the hooks here one prompt at a time."""
    assert _rel(actual, expected) <= 1e-4


def test_adaptor_steps_follow_the_clock():
    assert adaptor_steps(8, 2) == [1, 3, 5, 7]  # PAPER.md: steps 2, 4, 6, 8 (1-indexed)
    assert adaptor_steps(6, 3) == [1, 2, 4, 5]
    assert adaptor_steps(4, 1) == []


def test_pairs_are_the_teachers_features_at_clocked_steps(tiny_model, tmp_path):
    settings = _settings(tiny_model)
    data = collect_teacher_data(tiny_model, PROMPTS, settings, cache=tmp_path)
    assert not data.reused and len(data) == len(PROMPTS) * 4
    assert data.step_index.tolist() == [1, 2, 4, 5] * 2 and data.prompt_index.tolist() == [0] * 4 + [1] * 4
    assert data.shapes() == {"r_in": (2, 32, 8, 8), "r_out_prev": (2, 64, 8, 8), "temb": (2, 128),
                             "pooled_text": (2, 32), "r_out": (2, 64, 8, 8)}
    for k, prompt in enumerate(PROMPTS):
        seen = _hooked_teacher(tiny_model, prompt, unit_noise(settings.latent_shape, settings.seed + k), settings.schedule.steps)
        _, pooled = text_embeddings(tiny_model, prompt)
        for row in np.flatnonzero(data.prompt_index == k):
            i = int(data.step_index[row])
            pair = {name: array[row] for name, array in data.arrays.items()}
            _close(pair["r_in"], seen["r_in"][i])
            _close(pair["temb"], seen["temb"][i])
            _close(pair["r_out"], seen["r_out"][i])
            # r_out(t+1): the previous step's teacher r_out (a full step or not: the teacher runs clock 1)
            _close(pair["r_out_prev"], seen["r_out"][i - 1])
            assert _rel(pair["r_out_prev"], seen["r_out"][i]) > 1e-2, "consecutive steps' r_out must differ"
            _close(pair["pooled_text"], pooled)
            assert pair["r_out"].shape[0] == 2, "the CFG batch [uncond, cond] is kept"
    again = collect_teacher_data(tiny_model, PROMPTS, settings, cache=tmp_path)
    assert again.reused and again.folder == data.folder
    other = collect_teacher_data(tiny_model, PROMPTS, _settings(tiny_model, steps=4, clock=2), cache=tmp_path)
    assert not other.reused and other.step_index.tolist() == [1, 3] * 2


def test_split_reference_with_identity_equals_the_hook_reference(tiny_model):
    """reference.torch_split_trajectory (split + cache) against the hook-based clocked reference (no split)."""
    hidden, pooled = text_embeddings(tiny_model, PROMPTS[0])
    noise = torch.from_numpy(unit_noise((1, 4, 16, 16), 3))
    ours = torch_split_trajectory(tiny_model, hidden, pooled, noise, 6, clock=3)
    ref = torch_trajectory(tiny_model, hidden, noise, 6, clock=3)
    assert ours.timesteps == ref.timesteps
    np.testing.assert_allclose(ours.latents, ref.latents, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [0, 1])
def test_teacher_noise_is_the_runtime_seed_draw(k):
    assert np.array_equal(unit_noise((1, 4, 16, 16), 7 + k),
                          np.random.default_rng(7 + k).standard_normal((1, 4, 16, 16), dtype=np.float32))
