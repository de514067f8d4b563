"""The initial noise of a trajectory: what ``cw-export run --seed N`` draws, and every other place that must draw
the same (calibration, parity, distillation's teacher, validate, evaluate, the grid)."""

from __future__ import annotations

import numpy as np


def seeded_noise(shape: list[int] | tuple[int, ...], seed: int) -> np.ndarray:
    """Unit Gaussian float32 noise of ``shape`` from numpy's PCG64 seeded ``seed``, drawn directly in float32
    (``standard_normal(shape, dtype=float32)``: drawing float64 and casting gives other values)."""
    return np.random.default_rng(seed).standard_normal(tuple(shape), dtype=np.float32)
