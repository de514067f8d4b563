"""Rewrites of a QDQ graph into the forms the QNN HTP accepts, each keeping the graph's numerics.

Measured on onnxruntime-qnn 2.7.0 (emulated HTP, docs/qnn_htp.md): a ``LayerNormalization`` whose beta is a
per-channel INT32 ``DequantizeLinear`` (aimet's export: one bias scale per channel, gamma scale x input scale) fails
QNN's graphAddNode with error 1000, while a per-tensor INT32 beta (onnxruntime's quantizer's form) runs.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ...onnx_index import consumers, inferred_shapes, producers


def per_tensor_layernorm_betas(model: onnx.ModelProto, base_dir: str = "") -> int:
    """Requantize every per-channel INT32 LayerNormalization beta to one scale (in place); returns how many.

    The new scale is the largest channel scale, so no value overflows; INT32 keeps the rounding error below
    max_scale / 2, about 2^-31 of the range the 16-bit activations around it resolve."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = producers(graph)
    readers = consumers(graph)
    changed = 0
    for node in graph.node:
        if node.op_type != "LayerNormalization" or len(node.input) < 3 or node.input[2] not in producer:
            continue
        dq = producer[node.input[2]]
        if dq.op_type != "DequantizeLinear" or not all(name in inits for name in dq.input[:3]):
            continue
        q, scale, zero = (numpy_helper.to_array(inits[name], base_dir) for name in dq.input[:3])
        if q.dtype != np.int32 or scale.size == 1 or np.any(zero != 0):
            continue
        if any(len(readers.get(name, [])) > 1 for name in dq.input[:3]):
            continue  # shared with another node: leave it
        new_scale = np.float32(scale.max())
        values = np.rint(q.astype(np.float64) * scale.astype(np.float64) / np.float64(new_scale))
        values = np.clip(values, np.iinfo(np.int32).min, np.iinfo(np.int32).max).astype(np.int32)
        for name, array in zip(dq.input[:3], (values, np.array(new_scale, np.float32), np.array(0, np.int32))):
            inits[name].CopyFrom(numpy_helper.from_array(array, name))
        for attr in [a for a in dq.attribute if a.name == "axis"]:
            dq.attribute.remove(attr)
        changed += 1
    return changed


def _shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Static shapes of the graph's tensors (shape inference on the structure; weights are not needed)."""
    return {name: dims for name, dims in inferred_shapes(model, initializers=False).items()
            if dims and all(d >= 0 for d in dims)}


def reshape_quantized_silus(model: onnx.ModelProto) -> int:
    """Give every quantized 4-D SiLU (x * sigmoid(x)) a 3-D view of its input (in place); returns how many.

    Measured on the emulated HTP (onnxruntime-qnn 2.7.0, SM8650), HTP vs CPU EP: a 4-D ``Q/DQ -> Sigmoid, Mul``
    gives 0.2-1 dB at 8x8 and 4x4 spatial sizes after an Add with 24-64 channels (the GroupNorm tail of every
    low-res ResNet block of the built-in model), and -0.5 dB when a 320-channel 3x3 Conv reads it at 8x8 (SD 1.5's
    first ResNet, whose GroupNorm ends in a Reshape), whatever produced x; with a Reshape to [N, C, H*W] around the
    SiLU it gives 80-85 dB in every case measured. The views are quantized with the parameters of the tensors they
    view, so the graph's values are unchanged (bit-identical on the CPU EP; tests/quantize/test_htp_forms.py)."""
    graph = model.graph
    producer = producers(graph)
    readers = consumers(graph)
    shapes = _shapes(model)

    def chain(name: str, *ops: str):
        """The nodes producing ``name`` backwards through ``ops`` (e.g. DQ <- Q <- Sigmoid), or None."""
        nodes = []
        for op in ops:
            node = producer.get(name)
            if node is None or node.op_type != op:
                return None
            nodes.append(node)
            name = node.input[0]
        return nodes

    order = {id(n): i for i, n in enumerate(graph.node)}
    before: dict[int, list] = {}  # id(node) -> nodes to insert before it
    after: dict[int, list] = {}
    count = 0
    for mul in [n for n in graph.node if n.op_type == "Mul" and len(n.input) == 2]:
        for k in (0, 1):
            sig = chain(mul.input[1 - k], "DequantizeLinear", "QuantizeLinear", "Sigmoid")
            x = mul.input[k]
            if sig is not None and sig[2].input[0] == x:
                break
        else:
            continue
        source = chain(x, "DequantizeLinear", "QuantizeLinear")
        outs = readers.get(mul.output[0], [])
        shape = shapes.get(x)
        if source is None or shape is None or len(shape) != 4 or len(outs) != 1 or outs[0].op_type != "QuantizeLinear":
            continue
        x_dq, y_q, sigmoid, y = source[0], outs[0], sig[2], mul.output[0]
        tag = f"{mul.name or y}_htp_view{count}"
        view, back = f"{tag}_shape3", f"{tag}_shape4"
        graph.initializer.extend([numpy_helper.from_array(np.array(shape[:2] + [shape[2] * shape[3]], np.int64), view),
                                  numpy_helper.from_array(np.array(shape, np.int64), back)])
        first = sigmoid if order[id(sigmoid)] < order[id(mul)] else mul
        before.setdefault(id(first), []).extend([
            onnx.helper.make_node("Reshape", [x, view], [f"{tag}_x"], name=f"{tag}_x_reshape"),
            onnx.helper.make_node("QuantizeLinear", [f"{tag}_x", *x_dq.input[1:3]], [f"{tag}_x_q"], name=f"{tag}_x_q"),
            onnx.helper.make_node("DequantizeLinear", [f"{tag}_x_q", *x_dq.input[1:3]], [f"{tag}_x_dq"],
                                  name=f"{tag}_x_dq")])
        sigmoid.input[0] = f"{tag}_x_dq"
        mul.input[k] = f"{tag}_x_dq"
        mul.output[0] = f"{tag}_y"
        after.setdefault(id(mul), []).extend([
            onnx.helper.make_node("QuantizeLinear", [f"{tag}_y", *y_q.input[1:3]], [f"{tag}_y_q"], name=f"{tag}_y_q"),
            onnx.helper.make_node("DequantizeLinear", [f"{tag}_y_q", *y_q.input[1:3]], [f"{tag}_y_dq"],
                                  name=f"{tag}_y_dq"),
            onnx.helper.make_node("Reshape", [f"{tag}_y_dq", back], [y], name=f"{tag}_y_reshape")])
        count += 1
    if count:
        nodes = []
        for node in graph.node:
            nodes.extend(before.get(id(node), []))
            nodes.append(node)
            nodes.extend(after.get(id(node), []))
        del graph.node[:]
        graph.node.extend(nodes)
    return count


def apply_htp_forms_file(path) -> dict:
    """Both rewrites on the QDQ graph at ``path`` (in place), then its value_info inferred anew (the quantizer's and
    the rewrites' annotations describe graphs that no longer exist: ``onnx_index.refresh_value_info``); returns
    what changed, for the graph's details."""
    from pathlib import Path

    from ...onnx_index import refresh_value_info

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    counts = {"per_tensor_layernorm_betas": per_tensor_layernorm_betas(model, str(path.parent)),
              "reshaped_silu_inputs": reshape_quantized_silus(model)}
    onnx.save_model(refresh_value_info(model), str(path))
    return counts
