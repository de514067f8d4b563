"""Image-quality metrics for the built-in shapes model: prompt accuracy and a Fréchet distance (an FID analogue).

Both use the shape classifier (``classifier.py``), so nothing is downloaded:
  * prompt accuracy — the fraction of images whose predicted attributes match every attribute their caption names
    (colour, shape, position and, where the caption says it, size);
  * Fréchet distance — ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)) between Gaussians fitted to the
    classifier's features of the generated images and of real generator samples drawn for the same captions
    (Heusel et al. 2017, eq. in Sec. 3 "FID"; features from our classifier instead of Inception-v3, so the values are
    not comparable with published FIDs).
"""

from __future__ import annotations

import numpy as np
import torch

from ..models import shapes
from .classifier import ShapeClassifier, load_classifier

REFERENCE_SEED = 20_240_101


def to_model_input(images: np.ndarray) -> torch.Tensor:
    """N x H x W x 3 (float 0..1 or uint8, as pipelines output) -> N x 3 x H x W float in -1..1."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images N x H x W x 3, got shape {images.shape}")
    x = images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))) * 2.0 - 1.0


@torch.no_grad()
def classify(images: np.ndarray, classifier: ShapeClassifier | None = None, batch_size: int = 256):
    """(features N x D float64, {attribute: predicted value names}) for N x H x W x 3 images."""
    classifier = classifier or load_classifier()
    x = to_model_input(images)
    feats, preds = [], {name: [] for name in shapes.ATTRIBUTES}
    for start in range(0, len(x), batch_size):
        f, logits = classifier(x[start:start + batch_size])
        feats.append(f.double().numpy())
        for name, values in shapes.ATTRIBUTES.items():
            preds[name].extend(values[k] for k in logits[name].argmax(1).tolist())
    return np.concatenate(feats) if feats else np.zeros((0, 0)), preds


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (rows = samples)."""
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    cov_a, cov_b = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)
    # Tr((S_a S_b)^(1/2)) = sum of sqrt(eigenvalues of S_a^(1/2) S_b S_a^(1/2)), a symmetric PSD matrix.
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    eig = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a)
    tr_covmean = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_covmean)


def reference_images(captions: list[str], seed: int = REFERENCE_SEED) -> np.ndarray:
    """One real generator sample per caption (N x H x W x 3 in 0..1); a caption without a size gets a random one."""
    rng = np.random.default_rng(seed)
    out = []
    for caption in captions:
        attrs = parse_or_raise(caption)
        size = attrs.get("size") or shapes.SIZES[int(rng.integers(len(shapes.SIZES)))]
        spec = shapes.ShapeSpec(attrs["shape"], attrs["colour"], attrs["position"], size)
        out.append(shapes.render(spec, rng))
    return np.stack(out)


def parse_or_raise(caption: str) -> dict[str, str]:
    attrs = shapes.parse_caption(caption)
    missing = [a for a in ("shape", "colour", "position") if a not in attrs]
    if missing:
        raise ValueError(f"caption {caption!r} does not name exactly one {', '.join(missing)} of the shapes data set")
    return attrs


def evaluate_images(images: np.ndarray, captions: list[str], classifier: ShapeClassifier | None = None,
                    reference: np.ndarray | None = None) -> dict:
    """Prompt accuracy (+ per attribute) and the Fréchet distance to real samples of the same captions.

    ``images``: N x H x W x 3 (float 0..1 or uint8); ``captions``: N captions of the shapes data set.
    ``reference``: real images to compare with (default: ``reference_images(captions)``).
    """
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    classifier = classifier or load_classifier()
    wanted = [parse_or_raise(c) for c in captions]
    feats, preds = classify(images, classifier)
    correct = [all(preds[a][i] == v for a, v in attrs.items()) for i, attrs in enumerate(wanted)]
    per_attribute = {}
    for name in shapes.ATTRIBUTES:
        hits = [preds[name][i] == attrs[name] for i, attrs in enumerate(wanted) if name in attrs]
        if hits:
            per_attribute[name] = float(np.mean(hits))
    ref = reference_images(captions) if reference is None else reference
    ref_feats, _ = classify(ref, classifier)
    return {
        "prompt_accuracy": float(np.mean(correct)),
        "frechet": frechet_distance(feats, ref_feats),
        "attribute_accuracy": per_attribute,
        "n": len(captions),
    }
