"""The evaluator's shape classifier: a small CNN trained on cw_export.models.shapes (tools/train_classifier.py).

It predicts every attribute of the generator (shape, colour, position, size) from a 32x32 RGB image and exposes its
penultimate layer (``FEATURE_DIM`` values) as the feature space of the Fréchet distance — the role Inception-v3 plays
in FID, with a network that knows this data and needs no download. The weights ship as ``classifier.safetensors``
beside this file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..models import shapes

WEIGHTS = Path(__file__).with_name("classifier.safetensors")
FEATURE_DIM = 64
HEADS = {name: len(values) for name, values in shapes.ATTRIBUTES.items()}


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
        nn.MaxPool2d(2),
    )


class ShapeClassifier(nn.Module):
    """Images N x 3 x 32 x 32 in -1..1 -> (features N x FEATURE_DIM, {attribute: logits})."""

    def __init__(self) -> None:
        super().__init__()
        # 32 -> 16 -> 8 -> 4; position needs the spatial layout, so the last map is flattened, not pooled.
        self.body = nn.Sequential(_block(3, 16), _block(16, 32), _block(32, 64))
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, FEATURE_DIM), nn.ReLU())
        self.heads = nn.ModuleDict({name: nn.Linear(FEATURE_DIM, n) for name, n in HEADS.items()})

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if images.shape[-2:] != (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE):
            images = nn.functional.interpolate(images, size=(shapes.IMAGE_SIZE,) * 2, mode="bilinear",
                                               antialias=True, align_corners=False)
        feats = self.features(self.body(images))
        return feats, {name: head(feats) for name, head in self.heads.items()}


def load_classifier(path: str | Path = WEIGHTS) -> ShapeClassifier:
    """The committed classifier, in eval mode."""
    from safetensors.torch import load_file

    model = ShapeClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval().requires_grad_(False)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Perturbations generated images show (noise, blur, slight colour shift), so the classifier is not brittle."""
    n = images.shape[0]
    out = images
    blur = torch.rand(n, 1, 1, 1, generator=generator) < 0.3
    blurred = nn.functional.avg_pool2d(nn.functional.pad(out, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    out = torch.where(blur, 0.5 * out + 0.5 * blurred, out)
    sigma = torch.rand(n, 1, 1, 1, generator=generator) * 0.12
    out = out + sigma * torch.randn(out.shape, generator=generator)
    shift = (torch.rand(n, 3, 1, 1, generator=generator) - 0.5) * 0.1
    return (out + shift).clamp(-1.0, 1.0)
