"""The numpy time features equal diffusers' Timesteps projection (the graph input replacing the raw timestep)."""

import numpy as np
import pytest
import torch
from diffusers.models.embeddings import Timesteps

from cw_export.errors import BundleError
from cw_export.runtime.time_features import sinusoidal_time_features


class _Unet:
    def __init__(self, proj):
        self.time_proj = proj


@pytest.mark.parametrize("dim,flip,shift", [(320, True, 0.0), (24, False, 1.0), (33, True, 0.5)])
def test_matches_diffusers_timesteps(dim, flip, shift):
    from cw_export.split import time_features_spec

    proj = Timesteps(dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    spec = time_features_spec(_Unet(proj))
    timesteps = np.array([999.0, 801.0, 1.0, 0.0, 437.5], dtype=np.float32)
    expected = proj(torch.from_numpy(timesteps)).numpy()
    actual = sinusoidal_time_features(timesteps, spec)
    assert actual.shape == expected.shape == (5, dim) and actual.dtype == np.float32
    np.testing.assert_allclose(actual, expected, atol=2e-4)  # diffusers' float32 argument rounding: 6e-5 at t = 999


def test_unknown_function_is_a_bundle_error():
    with pytest.raises(BundleError, match="time_features function 'learned'"):
        sinusoidal_time_features(np.zeros(2), {"function": "learned"})
