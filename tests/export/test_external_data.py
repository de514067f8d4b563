"""The export's external-data step for graphs over 2 GB: the exporter's one-file-per-tensor output is gathered into
one page-aligned ``.data`` file without loading every tensor at once (issue #21: SDXL's 10 GB low_res)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from cw_export.export.to_onnx import ort_session
from cw_export.external_data import EXTERNAL_THRESHOLD, PAGE, gather_external_data


def _two_matmuls(rng: np.random.Generator) -> onnx.ModelProto:
    """y = (x @ W1 + b) @ W2 with two large weights and one bias below the external threshold."""
    w1 = rng.standard_normal((64, 48)).astype(np.float32)  # 12,288 bytes
    w2 = rng.standard_normal((48, 40)).astype(np.float32)  # 7,680 bytes: not a multiple of the page
    bias = rng.standard_normal((48,)).astype(np.float32)  # 192 bytes: stays inline
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "bias"], ["hb"]),
             helper.make_node("MatMul", ["hb", "w2"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 40])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(bias, "bias")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_per_tensor_files_become_one_aligned_data_file_with_the_same_outputs(tmp_path):
    rng = np.random.default_rng(0)
    model = _two_matmuls(rng)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    path = tmp_path / "low_res.onnx"
    # what the TorchScript exporter writes for a large graph: one file per tensor beside the graph
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert len(list(tmp_path.iterdir())) == 4  # the graph and a file per tensor, the bias included

    gather_external_data(path)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["low_res.onnx", "low_res.onnx.data"]
    gathered = onnx.load(str(path), load_external_data=False)
    by_name = {t.name: t for t in gathered.graph.initializer}
    for name in ("w1", "w2", "bias"):  # what was external stays external, whatever its size
        info = ExternalDataInfo(by_name[name])
        assert info.location == "low_res.onnx.data" and info.offset % PAGE == 0
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, expected)
    onnx.checker.check_model(str(path))
    # the export's parity session over such a graph reads the mapped weights unpacked: the same numbers
    unpacked = ort_session(path, prepack=False).run(None, {"x": x})[0]
    np.testing.assert_allclose(unpacked, expected, rtol=1e-5, atol=1e-5)


def test_inline_large_tensors_move_out_too(tmp_path):
    """A graph saved with its weights inside the protobuf: the large ones move to the data file."""
    rng = np.random.default_rng(1)
    model = _two_matmuls(rng)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    path = tmp_path / "g.onnx"
    onnx.save_model(model, str(path))
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    gather_external_data(path)

    gathered = onnx.load(str(path), load_external_data=False)
    external = sorted(t.name for t in gathered.graph.initializer if uses_external_data(t))
    assert external == ["w1", "w2"]  # the bias (192 bytes) stays inline
    bias = next(t for t in gathered.graph.initializer if t.name == "bias")
    assert 0 < len(bias.raw_data) < EXTERNAL_THRESHOLD
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, expected)
