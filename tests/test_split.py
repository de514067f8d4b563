"""The three Clockwork parts compose to the original UNet, in torch and in onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cw_export.errors import ModelError
from cw_export.export.to_onnx import export_graph
from cw_export.models import configs
from cw_export.split import split_unet


def _inputs(unet, latent: int, seq: int = 77, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn((2, unet.config.in_channels, latent, latent), generator=generator)
    timestep = torch.tensor([801.0, 801.0])
    text = torch.randn((2, seq, unet.config.cross_attention_dim), generator=generator)
    return sample, timestep, text


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    scale = expected.abs().max().item()
    assert (actual - expected).abs().max().item() <= rel * scale, "split output differs from the UNet"


def test_tiny_split_equals_unet_in_torch(tiny_model):
    unet = tiny_model.unet
    split = split_unet(unet)
    sample, timestep, text = _inputs(unet, 16)
    with torch.no_grad():
        expected = unet(sample, timestep, encoder_hidden_states=text).sample
        actual = split.unet_forward(sample, timestep, text)
    _assert_close(actual, expected)


def test_split_cut_is_at_the_paper_stage1_points(tiny_model):
    """r_in = down_blocks[0] output (after its downsampler); r_out = up_blocks[-2] output before its upsampler."""
    unet = tiny_model.unet
    split = split_unet(unet)
    sample, timestep, text = _inputs(unet, 16)
    captured = {}
    unet.down_blocks[0].register_forward_hook(lambda m, i, o: captured.__setitem__("down0", o[0]))
    handle = unet.up_blocks[-2].upsamplers[0].register_forward_pre_hook(
        lambda m, args: captured.__setitem__("pre_upsample", args[0]))
    try:
        with torch.no_grad():
            unet(sample, timestep, encoder_hidden_states=text)
            temb, r_in, *skips = split.high_res_in(sample, timestep, text)
            r_out = split.low_res(r_in, temb, text)
    finally:
        unet.down_blocks[0]._forward_hooks.clear()
        handle.remove()
    assert torch.equal(r_in, captured["down0"])
    assert torch.allclose(r_out, captured["pre_upsample"], atol=1e-6)
    assert r_in.shape[-1] == 8 and r_out.shape[-1] == 8  # both at the low resolution
    assert len(skips) == len(unet.up_blocks[-1].resnets)


def test_split_shares_weights_with_the_unet(tiny_model):
    split = split_unet(tiny_model.unet)
    unet_params = {p.data_ptr() for p in tiny_model.unet.parameters()}
    for part in (split.high_res_in, split.low_res, split.high_res_out):
        assert {p.data_ptr() for p in part.parameters()} <= unet_params


def test_tiny_split_parts_match_in_onnxruntime(tiny_model, tmp_path):
    unet = tiny_model.unet
    split = split_unet(unet)
    sample, timestep, text = _inputs(unet, 16, seed=3)
    with torch.no_grad():
        expected = unet(sample, timestep, encoder_hidden_states=text).sample
    composed = _run_split_in_ort(split, sample, timestep, text, tmp_path)
    scale = expected.abs().max().item()
    assert np.max(np.abs(composed - expected.numpy())) <= 1e-5 * scale


def _run_split_in_ort(split, sample, timestep, text, folder) -> np.ndarray:
    """Export each part, then compose the three ONNX graphs in onnxruntime."""
    from cw_export.export.to_onnx import ort_session

    with torch.no_grad():
        temb, r_in, *skips = split.high_res_in(sample, timestep, text)
        r_out = split.low_res(r_in, temb, text)
    names = split.skip_names
    exports = {
        "high_res_in": (split.high_res_in, {"sample": sample, "timestep": timestep, "encoder_hidden_states": text},
                        ["temb", "r_in", *names]),
        "low_res": (split.low_res, {"r_in": r_in, "temb": temb, "encoder_hidden_states": text}, ["r_out"]),
        "high_res_out": (split.high_res_out, {"r_out": r_out, "temb": temb, "encoder_hidden_states": text,
                                              **dict(zip(names, skips))}, ["noise_pred"]),
    }
    paths = {}
    for name, (module, inputs, outputs) in exports.items():
        result = export_graph(module, inputs, outputs, folder / name / f"{name}.onnx", simplify=False)
        assert result.parity["max_rel_diff"] <= 1e-5, (name, result.parity)
        paths[name] = result.file
    text_np = text.numpy()
    hi = ort_session(paths["high_res_in"]).run(None, {"sample": sample.numpy(), "timestep": timestep.numpy(),
                                                       "encoder_hidden_states": text_np})
    temb_o, r_in_o, *skips_o = hi
    (r_out_o,) = ort_session(paths["low_res"]).run(None, {"r_in": r_in_o, "temb": temb_o,
                                                          "encoder_hidden_states": text_np})
    feeds = {"r_out": r_out_o, "temb": temb_o, "encoder_hidden_states": text_np, **dict(zip(names, skips_o))}
    return ort_session(paths["high_res_out"]).run(None, feeds)[0]


@pytest.mark.slow  # SD 1.5-size export: ~3 minutes
def test_sd15_config_split_equals_unet_torch_and_onnxruntime(tmp_path):
    """Stable Diffusion v1.5's published UNet config, random weights, latent 16x16 (export uses external data)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**configs.SD15_UNET).eval().requires_grad_(False)
    split = split_unet(unet)
    sample, timestep, text = _inputs(unet, 16, seq=8)
    with torch.no_grad():
        expected = unet(sample, timestep, encoder_hidden_states=text).sample
        actual = split.unet_forward(sample, timestep, text)
    _assert_close(actual, expected)
    composed = _run_split_in_ort(split, sample, timestep, text, tmp_path)
    scale = expected.abs().max().item()
    assert np.max(np.abs(composed - expected.numpy())) <= 1e-5 * scale
    assert (tmp_path / "low_res" / "low_res.onnx.data").is_file(), "the >2 GB low_res graph must use external data"


def test_unet_with_two_levels_is_refused():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, cross_attention_dim=32,
        attention_head_dim=4, norm_num_groups=8)
    with pytest.raises(ModelError, match="at least 3"):
        split_unet(unet)
