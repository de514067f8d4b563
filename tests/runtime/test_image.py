"""PNG encoding, grids and image metrics of the torch-free runtime."""

from __future__ import annotations

import io

import numpy as np
import pytest

from cw_export.runtime.image import decode_png, encode_png, image_grid, psnr, ssim, to_uint8


def test_png_round_trip_and_pillow_reads_it():
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    data = encode_png(rgb)
    assert np.array_equal(decode_png(data), rgb)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), rgb)
    assert encode_png(rgb) == data  # deterministic bytes


def test_to_uint8_rounds_and_clips():
    image = np.array([[[-0.5, 0.0, 0.5 / 255, 1.0, 2.0]]] * 3, dtype=np.float32)
    assert to_uint8(image)[0, :, 0].tolist() == [0, 0, 1, 255, 255]
    with pytest.raises(ValueError):
        to_uint8(np.zeros((1, 2, 2)))


def test_grid_layout():
    a = np.zeros((2, 2, 3), np.uint8)
    b = np.full((2, 2, 3), 9, np.uint8)
    grid = image_grid([[a, b], [b, a]], pad=1, background=255)
    assert grid.shape == (7, 7, 3)
    assert grid[1, 4, 0] == 9 and grid[4, 1, 0] == 9 and grid[1, 1, 0] == 0 and grid[0, 0, 0] == 255


def test_metrics():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (16, 16, 3)).astype(np.uint8)
    noisy = np.clip(image.astype(int) + rng.integers(-20, 21, image.shape), 0, 255).astype(np.uint8)
    assert psnr(image, image) == 999.0 and ssim(image, image) == pytest.approx(1.0)
    assert 20 < psnr(image, noisy) < 40
    assert ssim(image, noisy) < 0.99
