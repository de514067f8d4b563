"""bench/peers.py's torch loops on the tiny random model: the Clockwork loop against the project's torch reference."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from cw_export.reference import text_embeddings, torch_trajectory

PEERS = Path(__file__).resolve().parents[2] / "bench" / "peers.py"


@pytest.fixture(scope="module")
def peers():
    spec = importlib.util.spec_from_file_location("bench_peers", PEERS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def inputs(tiny_model):
    hidden, _ = text_embeddings(tiny_model, "a small blue circle at the top")
    shape = [1, tiny_model.unet.config.in_channels, 16, 16]
    return hidden, torch.from_numpy(np.random.default_rng(3).standard_normal(shape, dtype=np.float32))


def _loop(peers, model, inputs, clock, steps=6, **kwargs):
    hidden, noise = inputs
    return peers.torch_loop(model.unet, model.scheduler_config, hidden, noise, steps, clock, 7.5, **kwargs).numpy()


def test_clock1_is_the_pipeline_loop(peers, tiny_model, inputs):
    hidden, noise = inputs
    ref = torch_trajectory(tiny_model, hidden, noise, 6, clock=1, guidance_scale=7.5).latents
    np.testing.assert_allclose(_loop(peers, tiny_model, inputs, 1), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("clock", [2, 3])
def test_clockwork_loop_matches_the_cache_and_reuse_reference(peers, tiny_model, inputs, clock):
    """The reference runs the whole UNet and swaps up_blocks[-2]'s output for the cached one on clocked steps; the
    bench's loop skips the low-res blocks instead: the latents must agree, and differ from clock 1's."""
    hidden, noise = inputs
    ours = _loop(peers, tiny_model, inputs, clock)
    ref = torch_trajectory(tiny_model, hidden, noise, 6, clock=clock, guidance_scale=7.5).latents
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5 * float(np.max(np.abs(ref))))
    assert np.max(np.abs(ours - _loop(peers, tiny_model, inputs, 1))) > 1e-3


def test_clocked_steps_skip_the_low_res_blocks(peers, tiny_model, inputs):
    calls: list[tuple[int, str]] = []
    step = [0]
    handles = [block.register_forward_hook(lambda *_, name=name: calls.append((step[0], name)))
               for name, block in (("down1", tiny_model.unet.down_blocks[1]), ("mid", tiny_model.unet.mid_block),
                                   ("up0", tiny_model.unet.up_blocks[0]), ("up_last", tiny_model.unet.up_blocks[-1]))]
    try:
        _loop(peers, tiny_model, inputs, 2, steps=4, on_step=lambda i, kind: step.__setitem__(0, i + 1))
    finally:
        for handle in handles:
            handle.remove()
    assert sorted({s for s, name in calls if name == "down1"}) == [0, 2]
    assert sorted({s for s, name in calls if name == "mid"}) == [0, 2]
    assert sorted({s for s, name in calls if name == "up_last"}) == [0, 1, 2, 3]
