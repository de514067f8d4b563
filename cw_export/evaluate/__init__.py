"""Quality evaluation of generated images with a classifier trained on the shapes generator (no download).

``evaluate_images(images, captions)`` -> {"prompt_accuracy", "frechet", ...}; ``generate_images(model, captions)``
samples a model in torch (diffusers' StableDiffusionPipeline for full steps, the identity-adaptor reference for clock > 1).
Torch is imported by the submodules; importing this package alone stays cheap.
"""

from __future__ import annotations


def evaluate_images(images, captions, **kwargs):
    from .metrics import evaluate_images as _evaluate

    return _evaluate(images, captions, **kwargs)


def generate_images(model, captions, **kwargs):
    from .generate import generate_images as _generate

    return _generate(model, captions, **kwargs)


__all__ = ["evaluate_images", "generate_images"]
