"""Shape tables on the structure only: onnx shape inference serialises its input, and a model with its weights in
memory can pass protobuf's 2 GB limit (SD 1.5's low_res graph, 3.3 GB, failed the split-shortcut rewrite there)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from cw_export.onnx_index import inferred_shapes, structure_only


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((64, 32, 3, 3)).astype(np.float32), "W")  # 18432 values
    bias = numpy_helper.from_array(np.zeros(64, np.float32), "B")  # small: kept
    shape = numpy_helper.from_array(np.array([1, 64, -1], np.int64), "shape")  # read by Reshape's inference
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["c", "shape"], ["r"]),
             helper.make_node("Concat", ["r", "r"], ["y"], axis=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight, bias, shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_the_structure_keeps_every_shape_but_not_the_weights():
    model = _model()
    light = structure_only(model)
    assert light.ByteSize() < model.ByteSize() / 20  # the 73 KB weight is not in it
    assert {i.name for i in light.graph.initializer} == {"B", "shape"}
    direct = onnx.shape_inference.infer_shapes(model).graph
    expected = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in direct.value_info}
    expected["y"] = [1, 128, 64]
    shapes = inferred_shapes(model)
    for name, dims in expected.items():
        assert shapes[name] == dims, name
    assert shapes["W"] == [64, 32, 3, 3] and shapes["shape"] == [3]
    without = inferred_shapes(model, initializers=False)
    assert "W" not in without and "B" not in without and without["r"] == [1, 64, 64]
    assert len(model.graph.initializer) == 3 and model.graph.initializer[0].raw_data  # the model is untouched
