"""cw_export.bundle.flops: the torch count and the independent ONNX count agree; SD 1.5 reproduces the paper's numbers."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cw_export.bundle import flops
from cw_export.cli import main

# PAPER.md "Split": SD 1.5 at 512², batch 1. DeepSpeed (conv + linear): full 677.8, high-res + identity 228.4 GFLOPs;
# FlopCounterMode (attention included): full 803 GFLOPs, low-res 58.0% without UP-2's upsampler conv.
PAPER_SD15 = {"full_conv_linear": 677.8e9, "clocked_conv_linear": 228.4e9, "full": 803e9, "low_res_fraction": 0.580,
              "unet_params": 859.5e6, "saving_pct_paper": 32.0}


def test_onnx_counter_on_hand_computed_graph(tmp_path):
    """Conv, ConvTranspose, weight MatMul, activation MatMul and Gemm MACs, counted by hand (batch 2 -> per item)."""
    rng = np.random.default_rng(0)
    def w(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    conv_w, convt_w, lin_w, gemm_w = w("conv", 8, 3, 3, 3), w("convt", 8, 4, 2, 2), w("lin", 12, 16), w("gemm", 5, 7)
    nodes = [
        helper.make_node("Conv", ["x", conv_w.name], ["c"], pads=[1, 1, 1, 1]),                 # [2,8,6,6]
        helper.make_node("ConvTranspose", ["c", convt_w.name], ["t"], strides=[2, 2]),          # [2,4,12,12]
        helper.make_node("Reshape", ["t", "shape"], ["r"]),                                     # [2,48,12]
        helper.make_node("Transpose", [lin_w.name], ["lin_T"], perm=[1, 0]),                    # [16,12]
        helper.make_node("Transpose", ["lin_T"], ["lin_TT"], perm=[1, 0]),                      # [12,16] derived weight
        helper.make_node("MatMul", ["r", "lin_TT"], ["m"]),                                     # [2,48,16] weight
        helper.make_node("Transpose", ["m"], ["mt"], perm=[0, 2, 1]),                           # [2,16,48]
        helper.make_node("MatMul", ["m", "mt"], ["attn"]),                                      # [2,48,48] activations
        helper.make_node("Gemm", ["g", gemm_w.name], ["gy"], transB=1),                         # [2,5]
    ]
    shape = numpy_helper.from_array(np.array([2, 48, 12], dtype=np.int64), "shape")
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 6, 6]),
                     helper.make_tensor_value_info("g", TensorProto.FLOAT, [2, 7])],
        [helper.make_tensor_value_info("attn", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("gy", TensorProto.FLOAT, None)],
        initializer=[conv_w, convt_w, lin_w, gemm_w, shape])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    cost = flops.count_onnx(path)
    conv_macs = 2 * 8 * 6 * 6 * 3 * 9 + 2 * 8 * 6 * 6 * 4 * 4  # Conv: out x Cin*k*k; ConvTranspose: in x Cout*k*k
    linear_macs = 2 * 48 * 16 * 12 + 2 * 5 * 7
    attention_macs = 2 * 48 * 48 * 16
    assert (cost.conv_flops, cost.linear_flops, cost.attention_flops) == (conv_macs, linear_macs, attention_macs)
    assert cost.params == 8 * 27 + 8 * 16 + 16 * 12 + 35


def test_inspect_numbers_match_independent_onnx_count(fp32_bundle, tiny_model):
    """torch FlopCounterMode on the split modules (CPU, real weights) == ONNX shape-inference count of the bundle."""
    manifest = json.loads((fp32_bundle / "manifest.json").read_text())
    onnx_costs = flops.count_bundle(fp32_bundle, manifest)
    latent = tuple(manifest["latent"]["shape"][2:])
    torch_costs = flops.count_model(tiny_model, latent)
    assert set(onnx_costs) <= set(torch_costs)
    for name, ours in onnx_costs.items():
        theirs = torch_costs[name]
        assert ours.flops > 0
        assert (ours.conv_flops, ours.linear_flops, ours.attention_flops) == \
            (theirs.conv_flops, theirs.linear_flops, theirs.attention_flops), name
        # ONNX stores identical tensors (e.g. freshly initialised norm weights) once: params may only be fewer
        assert 0.95 * theirs.params <= ours.params <= theirs.params, name


def test_meta_device_count_equals_cpu_count(tiny_model):
    """Counting shapes only (meta) gives what real tensors give, including the CPU attention kernel."""
    meta = flops.load_for_counting("tiny-random")
    assert flops.count_model(meta, (16, 16)) == flops.count_model(tiny_model, (16, 16))


@pytest.fixture(scope="module")
def sd15_meta():
    """SD 1.5's published architecture on the meta device: shapes only, built in about a second."""
    return flops.load_for_counting("sd15-arch")


def test_sd15_arch_reproduces_paper_flops(sd15_meta):
    from cw_export.contract.graphs import make_wiring

    steps = make_wiring(len(sd15_meta.unet.up_blocks[-1].resnets), "identity")["steps"]
    report = flops.inspect_report(flops.count_model(sd15_meta, (64, 64)), steps, 8, 2, {"model": "sd15-arch"})
    graphs, s = report["graphs"], report["schedule"]
    full, clocked = s["per_step"]["full"], s["per_step"]["clocked"]
    unet_params = sum(graphs[n]["params"] for n in ("high_res_in", "low_res", "high_res_out"))
    assert unet_params == pytest.approx(PAPER_SD15["unet_params"], rel=1e-3)
    assert full["flops"] == pytest.approx(PAPER_SD15["full"], rel=5e-3)
    assert full["conv_linear_flops"] == pytest.approx(PAPER_SD15["full_conv_linear"], rel=5e-3)
    assert clocked["conv_linear_flops"] == pytest.approx(PAPER_SD15["clocked_conv_linear"], rel=5e-3)
    assert graphs["low_res"]["flops"] / full["flops"] == pytest.approx(PAPER_SD15["low_res_fraction"], abs=2e-3)
    assert s["saving_pct"] == pytest.approx(29.0, abs=0.5)  # = 4/8 x 58.0% low-res share (r_out before the upsampler)
    assert s["conv_linear"]["saving_pct"] == pytest.approx(33.0, abs=0.5)
    # paper's headline: 10.8 -> 7.3 TFLOPs = conv+linear, 8 steps, CFG batch 2
    assert s["conv_linear"]["full_flops_cfg"] == pytest.approx(10.8e12, rel=5e-3)
    assert s["conv_linear"]["clocked_flops_cfg"] == pytest.approx(7.3e12, rel=1e-2)


def test_schedule_totals():
    cost = flops.GraphCost(params=1, conv_flops=10, linear_flops=0, attention_flops=0)
    costs = {"high_res_in": cost, "low_res": flops.GraphCost(1, 20, 10, 10), "high_res_out": cost}
    steps = {"full": ["high_res_in", "low_res", "high_res_out"], "clocked": ["high_res_in", "high_res_out"]}
    s = flops.schedule_costs(costs, steps, steps=8, clock=2)
    assert (s["full_flops"], s["clocked_flops"]) == (8 * 60, 4 * 60 + 4 * 20)
    assert s["saving_pct"] == pytest.approx(100 * 160 / 480, abs=0.01)
    assert s["conv_linear"]["saving_pct"] == pytest.approx(100 * 4 * 30 / (8 * 50), abs=0.01)
    assert s["full_flops_cfg"] == 2 * s["full_flops"]
    assert flops.schedule_costs(costs, steps, steps=8, clock=1)["saving_pct"] == 0.0


def test_cli_inspect_bundle_writes_json(fp32_bundle, tmp_path, capsys):
    out = tmp_path / "inspect.json"
    assert main(["inspect", str(fp32_bundle), "--steps", "8", "--clock", "4", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {"high_res_in", "low_res", "high_res_out", "text_encoder"} <= set(data["graphs"])
    assert all({"params", "flops", "conv_linear_flops"} <= set(g) for g in data["graphs"].values())
    assert {"full_flops", "clocked_flops", "saving_pct"} <= set(data["schedule"])
    assert data["schedule"]["step_kinds"].count("full") == 2
    assert "saving" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["inspect"], ["inspect", "some_bundle", "--model", "tiny-random"],
                                  ["inspect", "--model", "no-such-model"], ["inspect", "--model", "tiny-random",
                                                                            "--steps", "2", "--clock", "3"]])
def test_cli_inspect_user_errors_are_one_line(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cw-export: error:") and "\n" not in err


def test_sd15_per_block_macs_match_paper_table(sd15_meta):
    """PAPER.md: DOWN-0 32.9, DOWN-1 31.3, DOWN-2 31.5, DOWN-3 3.78, MID 6.03, UP-0 12.9, UP-1 75.1, UP-2 79.1,
    UP-3 66.0 GMACs per pass (DeepSpeed: conv + linear only)."""
    paper = {"DOWN-0": 32.9, "DOWN-1": 31.3, "DOWN-2": 31.5, "DOWN-3": 3.78, "MID": 6.03, "UP-0": 12.9, "UP-1": 75.1,
             "UP-2": 79.1, "UP-3": 66.0}
    blocks = flops.per_block_costs(sd15_meta.unet, (64, 64))
    assert {label: round(c.conv_linear_flops / 2e9, 2) for label, c in blocks.items()} == pytest.approx(paper, abs=0.06)
