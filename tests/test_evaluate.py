"""Tests for cw_export.evaluate: the committed classifier, the Fréchet distance, image generation, the builtin folder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cw_export.evaluate import metrics  # noqa: E402
from cw_export.evaluate.classifier import WEIGHTS, load_classifier  # noqa: E402
from cw_export.models import shapes  # noqa: E402

BUILTIN_DIR = Path(__file__).resolve().parents[1] / "cw_export" / "models" / "builtin"
TEST_SEED = 31_337  # not a seed the classifier was trained on (tools/train_classifier.py draws SEED * 1_000_003 + step)


def _real(seed: int, n: int, split: str = "all"):
    batch = shapes.make_batch(seed, n, split=split)
    return (batch.images.transpose(0, 2, 3, 1) + 1) / 2, batch


@pytest.fixture(scope="module")
def classifier():
    assert WEIGHTS.is_file(), "classifier weights missing: run tools/train_classifier.py"
    return load_classifier()


def test_classifier_is_accurate_on_real_samples(classifier):
    images, batch = _real(TEST_SEED, 400)
    _, preds = metrics.classify(images, classifier)
    for name, values in shapes.ATTRIBUTES.items():
        accuracy = np.mean([values[k] == p for k, p in zip(batch.labels[name], preds[name])])
        assert accuracy >= 0.97, (name, accuracy)


def test_prompt_accuracy_of_real_images_is_high(classifier):
    images, batch = _real(TEST_SEED + 1, 300)
    result = metrics.evaluate_images(images, batch.captions, classifier=classifier)
    assert result["prompt_accuracy"] >= 0.95
    assert set(result) >= {"prompt_accuracy", "frechet", "attribute_accuracy", "n"}


def test_frechet_real_vs_real_is_small_and_real_vs_noise_is_large(classifier):
    images_a, batch_a = _real(TEST_SEED + 2, 300)
    images_b, _ = _real(TEST_SEED + 3, 300)
    noise = np.random.default_rng(0).random(images_a.shape).astype(np.float32)
    feats_a, _ = metrics.classify(images_a, classifier)
    feats_b, _ = metrics.classify(images_b, classifier)
    feats_n, _ = metrics.classify(noise, classifier)
    assert metrics.frechet_distance(feats_a, feats_a) == pytest.approx(0.0, abs=1e-3)
    real_real = metrics.frechet_distance(feats_a, feats_b)
    real_noise = metrics.frechet_distance(feats_a, feats_n)
    assert real_real < 0.1 * real_noise, (real_real, real_noise)
    # Noise matches no prompt.
    assert metrics.evaluate_images(noise[:50], batch_a.captions[:50], classifier=classifier)["prompt_accuracy"] < 0.2


def test_frechet_distance_of_known_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20000, 3))
    b = rng.normal(size=(20000, 3)) * 2.0 + 1.0
    # ||mu||^2 = 3; Tr(I + 4I - 2 * 2I) = 3 -> 6.
    assert metrics.frechet_distance(a, b) == pytest.approx(6.0, rel=0.05)


def test_captions_outside_the_data_set_are_rejected(classifier):
    with pytest.raises(ValueError, match="does not name"):
        metrics.evaluate_images(np.zeros((1, 32, 32, 3), np.float32), ["a photo of a cat"], classifier=classifier)


def test_generate_full_steps_matches_the_clocked_reference_at_clock_1():
    """StableDiffusionPipeline (clock 1) and the torch reference loop give the same images from the same noise."""
    from cw_export.evaluate.generate import generate_images
    from cw_export.models.pipeline import build_tiny_random_model

    model = build_tiny_random_model()
    captions = ["a red circle on the left", "a small blue square at the top"]
    full = generate_images(model, captions, seed=3, steps=3, clock=1)
    assert full.shape == (2, 32, 32, 3) and full.min() >= 0.0 and full.max() <= 1.0
    from cw_export.evaluate.generate import decode, initial_noise
    from cw_export.reference import torch_trajectory

    ids = model.tokenize(["", ""] + captions)
    with torch.no_grad():
        embeds = model.text_encoder(input_ids=ids).last_hidden_state
    traj = torch_trajectory(model, embeds, initial_noise(model, 2, seed=3), steps=3, clock=1)
    np.testing.assert_allclose(decode(model, torch.from_numpy(traj.latents)), full, atol=1e-4)
    clocked = generate_images(model, captions, seed=3, steps=3, clock=2)
    assert clocked.shape == full.shape


@pytest.mark.skipif(not (BUILTIN_DIR / "model_index.json").is_file(), reason="trained builtin weights not present")
def test_committed_builtin_pipeline_loads_and_splits():
    from cw_export.models.pipeline import load_model_folder
    from cw_export.split import split_unet

    model = load_model_folder(BUILTIN_DIR)
    size = sum(p.stat().st_size for p in BUILTIN_DIR.rglob("*") if p.is_file())
    assert size < 30 * 2**20
    assert model.vae_scale_factor * model.default_latent_size == shapes.IMAGE_SIZE
    parts = split_unet(model.unet)
    sample = torch.randn(2, 4, model.default_latent_size, model.default_latent_size)
    text = model.text_encoder(input_ids=model.tokenize(["", "a red circle on the left"])).last_hidden_state
    t = torch.full((2,), 500.0)  # the split takes one timestep per sample, as the runtime feeds it
    with torch.no_grad():
        expected = model.unet(sample, t, encoder_hidden_states=text).sample
        got = parts.unet_forward(sample, t, text)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
