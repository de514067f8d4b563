"""a8_mac_share (cw_export.bundle.flops): MACs whose activation inputs are 8-bit, counted from the ONNX graph."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from cw_export.bundle.flops import count_onnx, schedule_costs
from qdq_graphs import save_graph


def _qdq(name: str, out: str, zero_point_type: int, nodes: list, inits: list) -> None:
    """name -> QuantizeLinear -> DequantizeLinear -> out, with a zero point of ``zero_point_type``."""
    scale, zp = f"{name}_scale", f"{name}_zp"
    inits += [numpy_helper.from_array(np.array(0.01, np.float32), scale),
              helper.make_tensor(zp, zero_point_type, [], [0])]
    nodes += [helper.make_node("QuantizeLinear", [name, scale, zp], [f"{name}_q"]),
              helper.make_node("DequantizeLinear", [f"{name}_q", scale, zp], [out])]


def _weight(name: str, shape: tuple[int, ...], nodes: list, inits: list) -> str:
    """An INT8 weight initializer behind its DequantizeLinear (a constant: never an activation)."""
    rng = np.random.default_rng(len(inits))
    inits += [numpy_helper.from_array(rng.integers(-8, 8, shape).astype(np.int8), f"{name}_i8"),
              numpy_helper.from_array(np.array(0.02, np.float32), f"{name}_scale"),
              numpy_helper.from_array(np.array(0, np.int8), f"{name}_zp")]
    nodes.append(helper.make_node("DequantizeLinear", [f"{name}_i8", f"{name}_scale", f"{name}_zp"], [name]))
    return name


def two_convs(path, first_bits: int, second_bits: int):
    """x [1,4,8,8] -> Conv(4->8, 3x3) -> Conv(8->8, 1x1), each fed through a QDQ pair of the given bit width."""
    types = {8: TensorProto.UINT8, 16: TensorProto.UINT16}
    nodes: list = []
    inits: list = []
    _qdq("x", "x_dq", types[first_bits], nodes, inits)
    w1 = _weight("w1", (8, 4, 3, 3), nodes, inits)
    nodes.append(helper.make_node("Conv", ["x_dq", w1], ["c1"], pads=[1, 1, 1, 1]))
    _qdq("c1", "c1_dq", types[second_bits], nodes, inits)
    w2 = _weight("w2", (8, 8, 1, 1), nodes, inits)
    nodes.append(helper.make_node("Conv", ["c1_dq", w2], ["y"]))
    return save_graph(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])], inits, path)


CONV1_MACS = 8 * 8 * 8 * (4 * 3 * 3)  # output elements x inputs each reads
CONV2_MACS = 8 * 8 * 8 * 8


@pytest.mark.parametrize("bits, share", [((8, 8), 1.0), ((16, 16), 0.0),
                                          ((8, 16), CONV1_MACS / (CONV1_MACS + CONV2_MACS)),
                                          ((16, 8), CONV2_MACS / (CONV1_MACS + CONV2_MACS))])
def test_a8_share_counts_the_macs_behind_8_bit_dequantize(tmp_path, bits, share):
    cost = count_onnx(two_convs(tmp_path / "g.onnx", *bits))
    assert cost.flops == 2 * (CONV1_MACS + CONV2_MACS)
    assert cost.a8_mac_share == pytest.approx(share, abs=1e-4)
    assert cost.to_dict()["a8_mac_share"] == cost.a8_mac_share


def test_schedule_share_weights_graphs_by_how_often_they_run(tmp_path):
    a8 = count_onnx(two_convs(tmp_path / "a8.onnx", 8, 8))
    a16 = count_onnx(two_convs(tmp_path / "a16.onnx", 16, 16))
    costs = {"high_res_in": a16, "low_res": a8, "adaptor": a8, "high_res_out": a16}
    steps = {"full": ["high_res_in", "low_res", "high_res_out"], "clocked": ["high_res_in", "adaptor", "high_res_out"]}
    assert schedule_costs(costs, steps, 4, 2)["a8_mac_share"] == pytest.approx(1 / 3, abs=1e-4)
    steps["clocked"] = ["high_res_in", "high_res_out"]  # identity adaptor: clocked steps run no 8-bit graph
    assert schedule_costs(costs, steps, 4, 2)["a8_mac_share"] == pytest.approx(2 / 10, abs=1e-4)


def test_fp32_bundle_has_no_8_bit_macs(fp32_bundle):
    from cw_export.bundle.flops import inspect_bundle

    report = inspect_bundle(fp32_bundle)
    assert report["schedule"]["a8_mac_share"] == 0.0
    assert all(g["a8_mac_share"] == 0.0 for g in report["graphs"].values())
