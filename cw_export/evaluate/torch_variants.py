"""Evaluate a model's images per sampling variant (torch side): full FP32 (clock 1) and Clockwork FP32 (clock N).

``evaluate_model(model, captions)`` generates one image per caption and variant from the same initial noise and scores
each variant with ``metrics.evaluate_images``. The INT8 bundle variant needs the onnxruntime bundle runtime and is
scored by passing its decoded images to ``evaluate_images`` directly.
"""

from __future__ import annotations

import time

import numpy as np

from ..models import shapes
from .generate import DEFAULT_GUIDANCE, DEFAULT_STEPS, generate_images
from .metrics import evaluate_images, reference_images


def held_out_captions(repeats: int = 4) -> list[str]:
    """Every held-out caption (10 unseen triples x 3 size wordings), ``repeats`` times: one image per entry."""
    return shapes.eval_captions("held_out") * repeats


def train_captions(repeats: int = 1) -> list[str]:
    return shapes.eval_captions("train") * repeats


def evaluate_model(model, captions: list[str], clocks: tuple[int, ...] = (1, 2), seed: int = 0,
                   steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE) -> dict:
    """{"clock_1": {...metrics, "seconds"}, "clock_2": {...}, "settings": {...}}; images of all clocks share noise."""
    from .classifier import load_classifier

    classifier = load_classifier()
    reference = reference_images(captions)
    out: dict = {"settings": {"n": len(captions), "seed": seed, "steps": steps, "guidance_scale": guidance_scale,
                              "sampler": model.scheduler_config.get("algorithm_type", "?")}}
    out["real"] = evaluate_images(reference_images(captions, seed=seed + 1), captions, classifier=classifier,
                                  reference=reference)
    for clock in clocks:
        start = time.time()
        images = generate_images(model, captions, seed=seed, steps=steps, clock=clock, guidance_scale=guidance_scale)
        result = evaluate_images(images, captions, classifier=classifier, reference=reference)
        result["seconds"] = round(time.time() - start, 1)
        out[f"clock_{clock}"] = result
    return out


def image_grid(images: np.ndarray, columns: int) -> np.ndarray:
    """N x H x W x 3 -> one (rows*H) x (columns*W) x 3 uint8 grid (blank cells at the end)."""
    n, h, w, _ = images.shape
    rows = -(-n // columns)
    grid = np.ones((rows * h, columns * w, 3), np.float32)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = image
    return (grid * 255).round().clip(0, 255).astype(np.uint8)
