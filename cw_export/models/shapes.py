"""Procedural captioned shapes: the data set the built-in model and the evaluator's classifier are trained on.

Every sample is one coloured shape (circle, square, triangle, cross) of one of two sizes at one of five positions on a
plain, slightly tinted background with a faint gradient, rendered anti-aliased at ``IMAGE_SIZE`` pixels, plus a caption
that names its colour, shape and position and, half the time, its size ("a small red triangle on the left").

Nothing is stored: a batch is a pure function of its seed (``make_batch(seed, n)``), so training, evaluation and the
tests all draw from the same generator. A fixed set of (colour, shape, position) triples, ``HELD_OUT``, never appears
in the ``"train"`` split; evaluating on it measures whether a model composes attributes rather than memorising captions.

Steps of one sample: 1. draw the labels (``sample_specs``); 2. draw the background, jitter of the colour, centre and
radius; 3. rasterise the shape's mask at ``SUPERSAMPLE``x resolution and box-filter it down; 4. blend shape over background.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 32
SUPERSAMPLE = 4

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow", "purple")
POSITIONS = ("left", "right", "top", "bottom", "center")
SIZES = ("small", "large")

# Nominal RGB (0..1) of each colour word; each sample jitters it by up to COLOUR_JITTER per channel.
COLOUR_RGB = {
    "red": (0.86, 0.15, 0.15),
    "green": (0.15, 0.68, 0.22),
    "blue": (0.16, 0.30, 0.88),
    "yellow": (0.95, 0.85, 0.15),
    "purple": (0.60, 0.20, 0.78),
}
COLOUR_JITTER = 0.06
# Centre of each position word as (x, y) fractions of the image side (y grows downwards); jittered by CENTRE_JITTER.
POSITION_XY = {
    "left": (0.27, 0.50),
    "right": (0.73, 0.50),
    "top": (0.50, 0.27),
    "bottom": (0.50, 0.73),
    "center": (0.50, 0.50),
}
CENTRE_JITTER = 0.04
POSITION_PHRASE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
# Radius (fraction of the side) of each size word, jittered by +-RADIUS_JITTER.
SIZE_RADIUS = {"small": 0.14, "large": 0.23}
RADIUS_JITTER = 0.02
SIZE_WORD_PROBABILITY = 0.5  # how often a caption names the size

# (colour, shape, position) triples never drawn for the "train" split: every colour, shape and position occurs among
# them, and each still occurs in many training triples. 10 of the 100 triples.
HELD_OUT: tuple[tuple[str, str, str], ...] = (
    ("red", "triangle", "right"),
    ("red", "cross", "top"),
    ("green", "circle", "bottom"),
    ("green", "square", "center"),
    ("blue", "triangle", "left"),
    ("blue", "cross", "center"),
    ("yellow", "square", "top"),
    ("yellow", "circle", "right"),
    ("purple", "cross", "bottom"),
    ("purple", "triangle", "top"),
)
SPLITS = ("train", "held_out", "all")


@dataclass(frozen=True)
class ShapeSpec:
    """The labels of one sample; ``size_in_caption`` says whether its caption names the size."""

    shape: str
    colour: str
    position: str
    size: str
    size_in_caption: bool = True

    @property
    def caption(self) -> str:
        size = f"{self.size} " if self.size_in_caption else ""
        return f"a {size}{self.colour} {self.shape} {POSITION_PHRASE[self.position]}"

    @property
    def labels(self) -> dict[str, int]:
        """Class indices, one per attribute (the classifier's targets)."""
        return {
            "shape": SHAPES.index(self.shape),
            "colour": COLOURS.index(self.colour),
            "position": POSITIONS.index(self.position),
            "size": SIZES.index(self.size),
        }


ATTRIBUTES = {"shape": SHAPES, "colour": COLOURS, "position": POSITIONS, "size": SIZES}


def triples(split: str) -> list[tuple[str, str, str]]:
    """The (colour, shape, position) triples a split draws from, in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    every = list(itertools.product(COLOURS, SHAPES, POSITIONS))
    held = set(HELD_OUT)
    if split == "train":
        return [t for t in every if t not in held]
    if split == "held_out":
        return [t for t in every if t in held]
    return every


def parse_caption(caption: str) -> dict[str, str]:
    """The attributes a caption of this generator names (size only when it does); unknown text gives {}."""
    words = caption.lower().replace(",", " ").split()
    found: dict[str, str] = {}
    for attribute, values in (("shape", SHAPES), ("colour", COLOURS), ("size", SIZES)):
        hits = [w for w in words if w in values]
        if len(hits) == 1:
            found[attribute] = hits[0]
    hits = [p for p in POSITIONS if p in words]
    if len(hits) == 1:
        found["position"] = hits[0]
    return found


def sample_specs(rng: np.random.Generator, n: int, split: str = "train") -> list[ShapeSpec]:
    """``n`` label sets drawn uniformly over the split's triples, sizes and caption variants."""
    pool = triples(split)
    picks = rng.integers(len(pool), size=n)
    sizes = rng.integers(len(SIZES), size=n)
    named = rng.random(n) < SIZE_WORD_PROBABILITY
    return [
        ShapeSpec(shape=pool[k][1], colour=pool[k][0], position=pool[k][2], size=SIZES[s], size_in_caption=bool(w))
        for k, s, w in zip(picks, sizes, named)
    ]


def _mask(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Boolean inside-test on offsets (u, v) from the centre, in pixels, for a shape of nominal radius r."""
    if shape == "circle":
        return u * u + v * v <= r * r
    if shape == "square":
        h = 0.86 * r  # about the circle's area
        return (np.abs(u) <= h) & (np.abs(v) <= h)
    if shape == "triangle":
        # Upright equilateral triangle inscribed in a circle of radius 1.2 r, centroid at the centre.
        rt = 1.2 * r
        return (v <= 0.5 * rt) & (v >= -rt + np.sqrt(3.0) * np.abs(u))
    if shape == "cross":
        w = 0.34 * r
        return ((np.abs(u) <= w) & (np.abs(v) <= r)) | ((np.abs(v) <= w) & (np.abs(u) <= r))
    raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A dark or light, slightly tinted colour with a faint linear gradient, HxWx3 in 0..1."""
    base = rng.uniform(0.08, 0.32) if rng.random() < 0.5 else rng.uniform(0.68, 0.92)
    tint = rng.uniform(-0.06, 0.06, size=3)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    strength = rng.uniform(0.0, 0.08)
    ys, xs = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
    ramp = strength * (np.cos(angle) * xs + np.sin(angle) * ys)
    return np.clip(base + tint[None, None, :] + ramp[..., None], 0.0, 1.0)


def render(spec: ShapeSpec, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """One image of ``spec`` as float32 HxWx3 in 0..1; the jitter comes from ``rng``."""
    image = _background(rng, size)
    colour = np.clip(np.array(COLOUR_RGB[spec.colour]) + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, 3), 0.0, 1.0)
    cx, cy = (np.array(POSITION_XY[spec.position]) + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER, 2)) * size
    r = (SIZE_RADIUS[spec.size] + rng.uniform(-RADIUS_JITTER, RADIUS_JITTER)) * size
    # Sample points at the centres of SUPERSAMPLE x SUPERSAMPLE sub-pixels, then average each pixel's block.
    s = SUPERSAMPLE
    grid = (np.arange(size * s) + 0.5) / s
    v, u = np.meshgrid(grid - cy, grid - cx, indexing="ij")
    coverage = _mask(spec.shape, u, v, r).reshape(size, s, size, s).mean(axis=(1, 3))
    image = image * (1.0 - coverage[..., None]) + colour[None, None, :] * coverage[..., None]
    return image.astype(np.float32)


@dataclass
class Batch:
    """Images as float32 N x 3 x H x W in -1..1 (the VAE's input convention), captions and integer labels."""

    images: np.ndarray
    captions: list[str]
    labels: dict[str, np.ndarray]
    specs: list[ShapeSpec]


def make_batch(seed: int, n: int, split: str = "train", size: int = IMAGE_SIZE) -> Batch:
    """A deterministic batch: the same (seed, n, split, size) always gives the same images and captions."""
    rng = np.random.default_rng(seed)
    specs = sample_specs(rng, n, split)
    images = np.stack([render(spec, rng, size) for spec in specs]).transpose(0, 3, 1, 2) * 2.0 - 1.0
    labels = {name: np.array([spec.labels[name] for spec in specs], dtype=np.int64) for name in ATTRIBUTES}
    return Batch(images.astype(np.float32), [spec.caption for spec in specs], labels, specs)


def eval_captions(split: str = "held_out") -> list[str]:
    """Every caption of a split's triples: without a size word, then small, then large (3 per triple)."""
    out = []
    for colour, shape, position in triples(split):
        out.append(ShapeSpec(shape, colour, position, "small", size_in_caption=False).caption)
        for size in SIZES:
            out.append(ShapeSpec(shape, colour, position, size).caption)
    return out
