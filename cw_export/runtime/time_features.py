"""The sinusoidal timestep features high_res_in takes as input (``manifest["time_features"]``), in numpy.

Computed on the host, not in the quantized graph: at t ~ 1000 the sin/cos arguments are ~1000, where the NPU's
reduced float precision leaves no correct digit (docs/qnn_htp.md). The formula of diffusers'
``get_timestep_embedding``, evaluated in float64 and rounded to float32: diffusers' own float32 arithmetic is off by
up to one float32 step of the argument (6e-5 at t = 999), so values agree with it to ~1e-4
(tests/runtime/test_time_features.py).
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import BundleError


def sinusoidal_time_features(timesteps: np.ndarray, spec: dict) -> np.ndarray:
    """[N] timesteps -> [N, spec["dim"]] float32: sin/cos of t * max_period^(-k / (half - shift)), k < dim/2."""
    if spec.get("function") != "sinusoidal":
        raise BundleError(f"manifest time_features function {spec.get('function')!r} is not supported (sinusoidal)")
    dim = int(spec["dim"])
    half = dim // 2
    exponent = -math.log(spec["max_period"]) * np.arange(half, dtype=np.float64) / (half - spec["downscale_freq_shift"])
    args = spec["scale"] * np.asarray(timesteps, dtype=np.float64)[:, None] * np.exp(exponent)[None, :]
    emb = np.concatenate([np.sin(args), np.cos(args)], axis=-1)
    if spec["flip_sin_to_cos"]:
        emb = np.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return emb.astype(np.float32)
