"""quantize.fold: QuantizeLinear(float initializer) folded into an integer initializer, same outputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from cw_export.quantize.fold import fold_weight_quantizers, fold_weight_quantizers_file, quantize_constant


def _graph(shared: bool) -> onnx.ModelProto:
    """x -> Conv(W: float -> Q(per-channel int8) -> DQ) -> Add(b: float -> Q(per-tensor uint16) -> DQ) -> y;
    with ``shared`` the float W is also read by a second, unquantized Conv."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    w_scale = (np.abs(w).reshape(4, -1).max(axis=1) / 127).astype(np.float32)
    b = rng.standard_normal((1, 4, 1, 1)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(w_scale, "w_scale"),
             numpy_helper.from_array(np.zeros(4, np.int8), "w_zero"), numpy_helper.from_array(b, "B"),
             numpy_helper.from_array(np.array(np.ptp(b) / 65535, np.float32), "b_scale"),
             numpy_helper.from_array(np.array(30000, np.uint16), "b_zero")]
    nodes = [helper.make_node("QuantizeLinear", ["W", "w_scale", "w_zero"], ["W_q"], axis=0),
             helper.make_node("DequantizeLinear", ["W_q", "w_scale", "w_zero"], ["W_dq"], axis=0),
             helper.make_node("Conv", ["x", "W_dq"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("QuantizeLinear", ["B", "b_scale", "b_zero"], ["B_q"]),
             helper.make_node("DequantizeLinear", ["B_q", "b_scale", "b_zero"], ["B_dq"]),
             helper.make_node("Add", ["c", "B_dq"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])]
    if shared:
        nodes.append(helper.make_node("Conv", ["x", "W"], ["z"], pads=[1, 1, 1, 1]))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4, 8, 8]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})


@pytest.mark.parametrize("shared", [False, True], ids=["weight-read-once", "weight-also-read-in-float"])
def test_fold_stores_integers_and_keeps_outputs(shared):
    model = _graph(shared)
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    before = _run(model, x)
    assert fold_weight_quantizers(model) == 2
    onnx.checker.check_model(model)
    assert not [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    stored = "W_q" if shared else "W"  # a float weight read elsewhere stays; the integer one takes the Q output name
    assert inits[stored].dtype == np.int8 and inits["B"].dtype == np.uint16
    assert ("W" in inits and inits["W"].dtype == np.float32) == shared
    for a, b in zip(before, _run(model, x)):
        np.testing.assert_array_equal(a, b)  # the same integers, so bit-identical outputs


def test_quantize_constant_rounds_half_to_even_and_saturates():
    scale, zero = np.array([1.0, 0.5], np.float32), np.array([0, 10], np.int8)
    x = np.array([[2.5, 200.0], [-3.5, 100.0]], np.float32)  # per column (axis 1)
    q = quantize_constant(x, scale, zero, axis=1)
    assert q.tolist() == [[2, 127], [-4, 127]]


def test_fold_file_round_trip(tmp_path):
    path = tmp_path / "g.onnx"
    onnx.save(_graph(False), str(path))
    size = path.stat().st_size
    assert fold_weight_quantizers_file(path) == 2
    assert path.stat().st_size < size  # int8 weights: smaller file
    assert fold_weight_quantizers_file(path) == 0  # nothing left to fold


def test_fold_sees_through_identity_of_a_shared_initializer():
    """torch's exporter deduplicates equal parameters through Identity nodes (e.g. all-ones LayerNorm gammas);
    the QuantizeLinear behind such an Identity folds too, so the HTP gets a static gamma."""
    ones = numpy_helper.from_array(np.ones(4, np.float32), "gamma")
    nodes = [helper.make_node("Identity", ["gamma"], ["gamma_dup"]),
             helper.make_node("QuantizeLinear", ["gamma_dup", "s", "z"], ["gamma_q"]),
             helper.make_node("DequantizeLinear", ["gamma_q", "s", "z"], ["gamma_dq"]),
             helper.make_node("QuantizeLinear", ["gamma", "s", "z"], ["gamma_q2"]),
             helper.make_node("DequantizeLinear", ["gamma_q2", "s", "z"], ["gamma_dq2"]),
             helper.make_node("Mul", ["x", "gamma_dq"], ["m"]),
             helper.make_node("Mul", ["m", "gamma_dq2"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                              [ones, numpy_helper.from_array(np.array(1 / 255, np.float32), "s"),
                               numpy_helper.from_array(np.array(0, np.uint8), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    before = _run(model, x)
    assert fold_weight_quantizers(model) == 2
    assert not [n for n in model.graph.node if n.op_type in ("Identity", "QuantizeLinear")]
    stored = {t.name: t.data_type for t in model.graph.initializer}
    assert stored["gamma_dup"] == stored["gamma"] == TensorProto.UINT8  # the names AIMET's encodings use
    onnx.checker.check_model(model)
    np.testing.assert_array_equal(_run(model, x)[0], before[0])
