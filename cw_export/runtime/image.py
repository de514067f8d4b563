"""Images without Pillow: PNG encoding (zlib, stdlib) and grids, so the runtime needs only numpy + onnxruntime."""

from __future__ import annotations

import struct
import zlib

import numpy as np


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[1, 3, H, W] or [3, H, W] floats in [0, 1] -> [H, W, 3] uint8 (round half up, clipped)."""
    array = np.asarray(image, dtype=np.float32)
    if array.ndim == 4:
        array = array[0]
    if array.ndim != 3 or array.shape[0] != 3:
        raise ValueError(f"expected an RGB image [3, H, W], got {list(array.shape)}")
    return np.clip(np.floor(array.transpose(1, 2, 0) * 255.0 + 0.5), 0, 255).astype(np.uint8)


def encode_png(rgb: np.ndarray) -> bytes:
    """Encode an [H, W, 3] uint8 array as a PNG (8-bit truecolour, no filter, deterministic bytes)."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected [H, W, 3] uint8, got {rgb.dtype} {list(rgb.shape)}")
    height, width, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[row].tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def decode_png(data: bytes) -> np.ndarray:
    """Decode PNGs written by :func:`encode_png` (used by tests and the grid reader)."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
            if body[8:10] != b"\x08\x02":
                raise ValueError("only 8-bit RGB PNGs are supported")
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    rows = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(height, 1 + width * 3)
    if np.any(rows[:, 0] != 0):
        raise ValueError("only unfiltered PNG rows are supported")
    return rows[:, 1:].reshape(height, width, 3).copy()


def image_grid(rows: list[list[np.ndarray]], pad: int = 2, background: int = 255, scale: int = 1) -> np.ndarray:
    """Tile [H, W, 3] uint8 images into one grid (rows x columns), optionally upscaled by ``scale`` (nearest)."""
    height, width, _ = rows[0][0].shape
    cols = max(len(r) for r in rows)
    h, w = height * scale, width * scale
    grid = np.full((pad + len(rows) * (h + pad), pad + cols * (w + pad), 3), background, np.uint8)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            tile = image.repeat(scale, axis=0).repeat(scale, axis=1)
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[y:y + h, x:x + w] = tile
    return grid


def psnr(reference: np.ndarray, actual: np.ndarray, peak: float = 255.0) -> float:
    """PSNR in dB between two images of the same shape (999 when identical)."""
    mse = float(np.mean((reference.astype(np.float64) - actual.astype(np.float64)) ** 2))
    return 999.0 if mse == 0 else float(10 * np.log10(peak**2 / mse))


def ssim(reference: np.ndarray, actual: np.ndarray, peak: float = 255.0) -> float:
    """Mean SSIM (Wang et al. 2004) over 7x7 uniform windows on the grey-level images."""
    def grey(x):
        return (x.astype(np.float64) @ np.array([0.299, 0.587, 0.114])) if x.ndim == 3 else x.astype(np.float64)

    a, b = grey(reference), grey(actual)
    k = 7
    if min(a.shape) < k:
        k = min(a.shape)

    def box(x):
        c = np.cumsum(np.cumsum(np.pad(x, ((1, 0), (1, 0))), 0), 1)
        return (c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]) / (k * k)

    mu_a, mu_b = box(a), box(b)
    var_a, var_b = box(a * a) - mu_a**2, box(b * b) - mu_b**2
    cov = box(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(np.mean(s))
